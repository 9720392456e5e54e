"""The prompt sets of `refusalkit optimize`: what the search scores on, and what verification holds out.

Search: the run's harmful validation split (the refusal proxy) and the first ``kl_n`` shared
``harmless_val`` prompts (its KL; never a test set). Verification: the run's held-out harmful split
and each benchmark of ``verify_benchmarks`` (JailbreakBench by default), counted apart, and the first
``verify_kl_n`` shared ``harmless_test`` prompts for KL. A benchmark whose file is absent (a fresh
clone without the shared data) is skipped with a warning that says where it goes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from refusalkit.data import load_instructions
from refusalkit.layout import RunLayout
from refusalkit.run import RunFolder
from refusalkit.search.options import OptimizeOptions
from refusalkit.settings import Settings

log = logging.getLogger(__name__)

HELD_OUT = "held-out"  # the name of the run's own held-out harmful split among the verification sets


def _spec_prompts(spec: str, n: int | None) -> list[str]:
    items = load_instructions(spec).instructions
    return items[:n] if n is not None else items


def data_root(s: Settings, o: OptimizeOptions) -> Path:
    """DATA_DIR/refusal_direction: --data-dir, else the run's."""
    return Path(o.data_dir or s.data_dir) / "refusal_direction"


def prompt_sets(layout: RunLayout, s: Settings, o: OptimizeOptions) -> dict[str, list[str]]:
    """Instructions for each role: harmful (proxy), harmless (search KL), harmful_test (the held-out
    split, or --verify-harmful) and harmless_test (verification KL)."""
    splits = RunFolder(layout).splits()  # the run reader's one error when extract has not run
    shared = data_root(s, o) / "splits"

    def default(file: str, fallback: list[str], n: int) -> list[str]:
        path = shared / file
        return _spec_prompts(str(path), n) if path.is_file() else fallback[:n]

    sets = {
        "harmful": _spec_prompts(o.harmful_prompts, None) if o.harmful_prompts else splits["harmful_val"],
        "harmless": _spec_prompts(o.kl_prompts, o.kl_n)
        if o.kl_prompts
        else default("harmless_val.json", splits["harmless_train"] + splits["harmless_val"], o.kl_n),
        "harmful_test": _spec_prompts(o.verify_harmful, None) if o.verify_harmful else splits["harmful_test"],
        "harmless_test": _spec_prompts(o.verify_harmless, o.verify_kl_n)
        if o.verify_harmless
        else default("harmless_test.json", splits["harmless_test"], o.verify_kl_n),
    }
    for name, n in (("harmless", o.kl_n), ("harmless_test", o.verify_kl_n)):
        if len(sets[name]) < n:
            log.warning("only %d %s prompts for KL (asked for %d)", len(sets[name]), name, n)
    return sets


def verify_sets(sets: dict[str, list[str]], s: Settings, o: OptimizeOptions) -> dict[str, list[str]]:
    """The harmful prompt sets verification counts apart, by name: the held-out split, then each
    benchmark found (one whose prompts equal an earlier set's is not repeated), each cut to
    ``verify_per_set``."""
    out = {HELD_OUT: sets["harmful_test"]}
    for name in o.verify_benchmarks:
        path = data_root(s, o) / "processed" / f"{name}.json"
        if not path.is_file():
            log.warning(
                "verification set %r skipped: %s is missing (put the shared data there, or pass --data-dir)",
                name,
                path,
            )
            continue
        prompts = _spec_prompts(str(path), None)
        if prompts not in out.values():
            out[name] = prompts
    return {k: v[: o.verify_per_set] for k, v in out.items() if v}


def over_refusal_sets(s: Settings, o: OptimizeOptions) -> dict[str, list[str]]:
    """The over-refusal sets verification also answers (``verify_over_refusal`` of each; none at 0), each
    missing one skipped with a warning."""
    from refusalkit.calibrate import data as ordata

    if not o.verify_over_refusal:
        return {}
    what = "verification (pass --data-dir, or --verify-over-refusal 0)"
    return ordata.held_out_sets(o.data_dir or s.data_dir, o.verify_over_refusal, what)


__all__ = ["HELD_OUT", "data_root", "over_refusal_sets", "prompt_sets", "verify_sets"]
