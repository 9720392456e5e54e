"""The over-refusal prompt sets (DATA_DIR/over_refusal/*.json, ../shared/data/README.md): prompts that
look harmful but are not. Torch-free: the CLI checks them before loading any model.

Roles: the false-refusal direction's training prompts (OR-Bench-Hard train + OKTest train), its
selection's validation prompts (OR-Bench-Hard val) and the held-out measurement (OR-Bench-Hard test,
OKTest val). No prompt of one role is in another (the files are disjoint splits).
"""

from __future__ import annotations

import logging
from pathlib import Path

from refusalkit.errors import RefusalkitError

log = logging.getLogger(__name__)

FOLDER = "over_refusal"
TRAIN_SETS = ("or_bench_hard_train", "oktest_train")
VAL_SET = "or_bench_hard_val"
TEST_SETS = ("or_bench_hard_test", "oktest_val")


def path(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / FOLDER / f"{name}.json"


def missing(data_dir: str | Path, names: tuple[str, ...] | list[str]) -> list[Path]:
    return [p for p in (path(data_dir, n) for n in names) if not p.is_file()]


def require(data_dir: str | Path, names: tuple[str, ...] | list[str], what: str) -> None:
    """Raise, before any model work, unless every named set is in ``data_dir``."""
    gone = missing(data_dir, names)
    if gone:
        raise RefusalkitError(
            f"{what} needs the over-refusal prompt sets, and {', '.join(str(p) for p in gone)} "
            f"{'is' if len(gone) == 1 else 'are'} missing; pass --data-dir DIR (or set REFUSALKIT_DATA) "
            f"to a folder holding {FOLDER}/{{{','.join(names)}}}.json (the shared data sets, "
            "../shared/data/README.md: OR-Bench-Hard-1K and OKTest as split by Wang et al.)"
        )


def load(data_dir: str | Path, name: str, n: int | None = None, seed: int | None = None) -> list[str]:
    """The instructions of set ``name``: the first ``n``, or a seeded sample of ``n`` with ``seed``."""
    from refusalkit.data import load_instructions, sample

    require(data_dir, [name], f"the over-refusal set {name}")
    items = load_instructions(str(path(data_dir, name))).instructions
    if seed is not None:
        return sample(items, n, seed)
    return items if n is None else items[:n]


def held_out_sets(data_dir: str | Path, n: int | None, what: str) -> dict[str, list[str]]:
    """The held-out sets (``TEST_SETS``) found in ``data_dir``, the first ``n`` of each (None: all); each
    missing one is skipped with a warning naming ``what`` it was for."""
    out: dict[str, list[str]] = {}
    for name in TEST_SETS:
        if missing(data_dir, [name]):
            log.warning("over-refusal set %s skipped in %s: %s is missing", name, what, path(data_dir, name))
            continue
        out[name] = load(data_dir, name, n)
    return out


def load_many(data_dir: str | Path, names: tuple[str, ...], n: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` instructions from the named sets together (duplicates dropped)."""
    from refusalkit.data import sample

    pool = list(dict.fromkeys(x for name in names for x in load(data_dir, name)))
    return sample(pool, n, seed)
