"""Instruction sets: files (json, jsonl, csv, txt), HF datasets (online), the built-in sets; seeded splits.

A data spec is one of:
  builtin:harmful | builtin:harmless       sets written for this project (160 each, 8 categories)
  PATH                                     .json, .jsonl, .csv or .txt file
  hf:DATASET_ID[:SPLIT[:COLUMN]]           a Hugging Face dataset (needs network and `datasets`)
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.utils import sha256_text

TEXT_KEYS = ("instruction", "prompt", "goal", "behavior", "Behavior", "question", "text", "query")
BUILTIN_SETS = ("harmful", "harmless")


@dataclass
class InstructionSet:
    name: str  # the spec it was read from
    instructions: list[str]
    categories: list[str | None]

    @property
    def sha256(self) -> str:
        return sha256_text("\n".join(self.instructions))

    def __len__(self) -> int:
        return len(self.instructions)


def _row_text(row: Any, where: str) -> tuple[str, str | None]:
    if isinstance(row, str):
        return row, None
    if isinstance(row, dict):
        for key in TEXT_KEYS:
            if isinstance(row.get(key), str):
                cat = row.get("category") or row.get("SemanticCategory")
                return row[key], cat if isinstance(cat, str) else None
        raise RefusalkitError(
            f"{where}: a row has none of the fields {list(TEXT_KEYS)}; name the instruction field one of those"
        )
    raise RefusalkitError(f"{where}: rows must be strings or objects, found {type(row).__name__}")


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (spreadsheet exports) is not data
    except UnicodeDecodeError:
        raise RefusalkitError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RefusalkitError(
                f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}; fix the file"
            ) from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise RefusalkitError(
                    f"{path}: expected a JSON list of instructions (or an object holding one list)"
                )
            data = lists[0]
        if not isinstance(data, list):
            raise RefusalkitError(f"{path}: expected a JSON list of instructions")
        return data
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RefusalkitError(
                        f"{path}: malformed JSON on line {i}: {exc.msg}; fix that line"
                    ) from None
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not any(k in reader.fieldnames for k in TEXT_KEYS):
            raise RefusalkitError(f"{path}: CSV needs a header with one of the columns {list(TEXT_KEYS)}")
        return list(reader)
    if suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()]
    raise RefusalkitError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv or .txt")


def _read_hf(spec: str) -> list[Any]:
    parts = spec.split(":")
    dataset_id, split = parts[1], parts[2] if len(parts) > 2 and parts[2] else "train"
    column = parts[3] if len(parts) > 3 else None
    try:
        import datasets
    except ImportError:
        raise RefusalkitError(
            "hf: data specs need the `datasets` package: pip install 'refusalkit[hub]'"
        ) from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise RefusalkitError(
            f"could not load dataset {dataset_id!r} ({exc}); check the id and your network"
        ) from None
    if column:
        return [{"instruction": x} for x in ds[column]]
    return list(ds)


def load_instructions(spec: str) -> InstructionSet:
    """Read an instruction set from a data spec (see the module docstring)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_SETS:
            raise RefusalkitError(f"unknown built-in set {name!r}; known: {', '.join(BUILTIN_SETS)}")
        rows = json.loads(resources.files("refusalkit.data").joinpath(f"builtin/{name}.json").read_text())
    elif spec.startswith("hf:"):
        rows = _read_hf(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise RefusalkitError(
                f"data file {spec!r} not found; give a .json/.jsonl/.csv/.txt path or builtin:NAME"
            )
        rows = _read_file(path)
    texts, cats, seen = [], [], set()
    for row in rows:
        text, cat = _row_text(row, spec)
        text = text.strip()
        if text and text not in seen:  # duplicates would leak across carved splits
            seen.add(text)
            texts.append(text)
            cats.append(cat)
    if not texts:
        raise RefusalkitError(f"{spec}: no instructions found (empty file?); add at least one instruction")
    return InstructionSet(spec, texts, cats)


def sample(items: list[str], n: int | None, seed: int) -> list[str]:
    """A seeded sample of ``n`` items (all of them, shuffled, if n is None or >= len)."""
    rng = random.Random(seed)
    if n is None or n >= len(items):
        out = list(items)
        rng.shuffle(out)
        return out
    return rng.sample(items, n)


def carve(sets: dict[str, tuple[str, int]], seed: int) -> dict[str, list[str]]:
    """Draw disjoint seeded samples for several splits, some of which share a source.

    sets: split name -> (data spec, size). Splits with the same spec get disjoint slices of one seeded
    shuffle of that source, in the order given; splits with their own spec get a seeded sample.
    """
    by_spec: dict[str, list[str]] = {}
    for split, (spec, _) in sets.items():
        by_spec.setdefault(spec, []).append(split)
    out: dict[str, list[str]] = {}
    for spec, splits in by_spec.items():
        pool = sample(load_instructions(spec).instructions, None, seed)
        need = sum(sets[s][1] for s in splits)
        if need > len(pool):
            sizes = ", ".join(f"{s}={sets[s][1]}" for s in splits)
            raise RefusalkitError(
                f"{spec} has {len(pool)} instructions but the splits drawn from it need {need} ({sizes}); "
                "lower the sizes (--n-train/--n-val/--n-test) or give separate files per split"
            )
        start = 0
        for s in splits:
            out[s] = pool[start : start + sets[s][1]]
            start += sets[s][1]
    return out
