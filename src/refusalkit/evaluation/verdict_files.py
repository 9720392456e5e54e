"""Saved verdicts without text: each completion's sha256 and every judge's verdict on it, one file per
judged batch (the search's verified points: RUN_DIR/search/completions/trial_N.json, baseline.json).

Completions of harmful prompts are never written as text by default; what is kept is enough to count
where the judges disagree (`refusalkit judges RUN_DIR`) and to tell whether a regenerated completion is
the one that was judged (its hash). The format:

  {"kind": "verdicts", "name": "trial_12", "max_new_tokens": 50,
   "judges": {"paper": {"classes": [...], ...identity}, "heretic": {...}, "llm": {...}},
   "rows": [{"setup": "helpful", "set": "jailbreakbench", "index": 0, "sha256": "...",
             "verdicts": {"paper": {"label": "refusal", "echo": false}, "llm": {"label": "compliance",
                          "logprobs": {"refusal": -3.1, ...}}}}]}

``index`` is the prompt's place in its prompt set; ``echo`` a keyword refusal whose every marker is in
the request; ``logprobs`` a model judge's class log-probabilities before its biases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.verdicts import Verdict
from refusalkit.utils import read_json, write_json

KIND = "verdicts"
TEXT_KEYS = frozenset({"completion", "text", "instruction", "request", "prompt"})  # never in such a file


def verdict_dict(v: Verdict) -> dict[str, Any]:
    out: dict[str, Any] = {"label": v.label}
    if v.echo:
        out["echo"] = True
    if v.logprobs is not None:
        out["logprobs"] = v.logprobs
    return out


def write_verdicts(
    path: str | Path,
    name: str,
    judges: Mapping[str, dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    **meta: Any,
) -> None:
    """Write one file (atomically). ``judges``: name -> identity with its ``classes``; ``rows``: each
    completion's place and sha256 and its ``verdicts`` by judge name (``verdict_dict``)."""
    for row in rows:
        leaked = TEXT_KEYS & set(row)
        if leaked:  # a guard on this module's one promise, not user input
            raise ValueError(f"a verdict file holds no text; row has {sorted(leaked)}")
    write_json(path, {"kind": KIND, "name": name, **meta, "judges": dict(judges), "rows": list(rows)})


def is_verdict_file(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == KIND and isinstance(data.get("rows"), list)


def read_verdicts(path: str | Path) -> tuple[dict[str, list[Verdict]], dict[str, tuple[str, ...]]]:
    """A saved file's verdicts by judge (every row, in order) and the classes each judge can give."""
    data = read_json(path)
    if not is_verdict_file(data):
        raise RefusalkitError(f"{path} is not a saved-verdicts file (kind {KIND!r})")
    judges = data.get("judges") or {}
    classes = {name: tuple(j.get("classes") or ()) for name, j in judges.items()}
    out: dict[str, list[Verdict]] = {name: [] for name in judges}
    for i, row in enumerate(data["rows"]):
        got = row.get("verdicts") or {}
        missing = [name for name in judges if name not in got]
        if missing:
            raise RefusalkitError(f"{path}: row {i} has no verdict of {missing}; the file is damaged")
        for name in judges:
            v = got[name]
            out[name].append(Verdict(str(v["label"]), echo=bool(v.get("echo")), logprobs=v.get("logprobs")))
    return out, classes


def verdict_files(folder: Path) -> list[Path]:
    """The saved-verdict files of a run folder (search/completions/*.json) or of a folder of them."""
    for where in (folder / "search" / "completions", folder):
        if where.is_dir():
            found = [p for p in sorted(where.glob("*.json")) if is_verdict_file(_quiet_read(p))]
            if found:
                return found
    return []


def _quiet_read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


__all__ = ["is_verdict_file", "read_verdicts", "verdict_dict", "verdict_files", "write_verdicts"]
