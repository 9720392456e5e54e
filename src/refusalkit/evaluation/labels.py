"""The labelled set: hand labels of completions, one JSON object per line (docs/judging.md).

Each row names the prompt (a data file under the data folder and an index into it, never the prompt's
text), the model and edit that wrote the completion, the generation settings, the label, the split
(``tune``: judges may be fitted on it; ``heldout``: never) and either the completion's text or, for a
completion that complies with a harmful request, only the sha256 of its text. Hash-only rows are
regenerated (greedy, as recorded) when the set is scored; a row whose regenerated text no longer hashes
to its label is STALE: reported and left out, never scored with another text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.verdicts import CLASSES
from refusalkit.utils import read_json, sha256_text

SPLITS = ("tune", "heldout")
PROMPT_SETS = ("harmful", "over_refusal", "harmless")
FIELDS = (
    "id", "prompt_id", "prompt_set", "model", "edit", "max_new_tokens", "greedy", "dtype", "label", "split",
)  # fmt: skip


@dataclass(frozen=True)
class LabelRow:
    id: str  # unique in the file
    prompt_id: str  # "FILE#INDEX": a JSON list under the data folder, e.g. refusal_direction/processed/jailbreakbench.json#17
    prompt_set: str  # harmful, over_refusal (looks harmful, is not) or harmless
    model: str  # the model spec that generated it (built-in name, folder, .gguf)
    edit: str  # "none", or "SETTING@RUN_DIR" (ablation, actadd, orthogonalized with that run's direction)
    max_new_tokens: int
    greedy: bool
    dtype: str
    label: str  # one of CLASSES
    split: str  # tune or heldout
    sha256: str  # of the completion's text
    text: str | None = None  # None: hash only (a completion that complies with a harmful request)
    system_prompt: str | None = None

    @property
    def source(self) -> tuple[str, int]:
        file, _, index = self.prompt_id.rpartition("#")
        return file, int(index)

    @property
    def generation(self) -> tuple[str, str, int, str, str | None]:
        """What regenerating it needs to share with others to run in one pass."""
        return (self.model, self.edit, self.max_new_tokens, self.dtype, self.system_prompt)


def _row_problems(n: int, row: Any) -> list[str]:
    if not isinstance(row, dict):
        return [f"line {n}: not a JSON object"]
    out = [f"line {n}: missing {k!r}" for k in FIELDS if k not in row]
    if out:
        return out
    if row["label"] not in CLASSES:
        out.append(f"line {n}: label {row['label']!r} is not one of {', '.join(CLASSES)}")
    if row["split"] not in SPLITS:
        out.append(f"line {n}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
    if row["prompt_set"] not in PROMPT_SETS:
        out.append(f"line {n}: prompt_set {row['prompt_set']!r} is not one of {', '.join(PROMPT_SETS)}")
    file, hash_, index = str(row["prompt_id"]).rpartition("#")
    if not file or not hash_ or not index.isdigit():
        out.append(f"line {n}: prompt_id {row['prompt_id']!r} is not FILE#INDEX")
    text, digest = row.get("text"), row.get("sha256")
    if text is None and not digest:
        out.append(f"line {n}: neither 'text' nor 'sha256'")
    if text is not None and digest and sha256_text(text) != digest:
        out.append(f"line {n}: 'sha256' is not the hash of 'text'")
    if text is not None and row["prompt_set"] == "harmful" and row["label"] == "compliance":
        out.append(
            f"line {n}: a compliant reply to a harmful request is stored as its sha256 only, never as text"
        )
    if text is None and not row["greedy"]:
        out.append(f"line {n}: a hash-only row must be greedy (it is regenerated to be scored)")
    return out


def load_labels(path: str | Path) -> list[LabelRow]:
    """Read and check a labelled set; every problem is reported at once (line numbers from 1)."""
    path = Path(path)
    if not path.is_file():
        raise RefusalkitError(f"label file {path} not found")
    rows: list[LabelRow] = []
    problems: list[str] = []
    seen: set[str] = set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {n}: not JSON ({exc.msg})")
            continue
        found = _row_problems(n, raw)
        if not found and raw["id"] in seen:
            found = [f"line {n}: id {raw['id']!r} repeats an earlier row"]
        problems += found
        if found:
            continue
        seen.add(raw["id"])
        text = raw.get("text")
        fields = {k: raw[k] for k in FIELDS} | {"sha256": raw.get("sha256") or sha256_text(text)}
        rows.append(LabelRow(**fields, text=text, system_prompt=raw.get("system_prompt")))
    if problems:
        shown = "\n  ".join(problems[:20]) + (
            f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise RefusalkitError(f"label file {path} has {len(problems)} problem(s):\n  {shown}")
    if not rows:
        raise RefusalkitError(f"label file {path} holds no labels; see docs/judging.md for the format")
    return rows


def label_row(**fields: Any) -> dict[str, Any]:
    """A row as written to the file: the text's sha256 always, the text itself only when allowed: never
    a compliant reply to a harmful request, nor a reply the labeller marked ``hash_only`` (a reply to a
    benign-looking request whose content is harmful all the same)."""
    text = fields.get("text")
    out = {k: fields[k] for k in FIELDS} | {"sha256": fields.get("sha256") or sha256_text(text or "")}
    harmful_text = fields["prompt_set"] == "harmful" and fields["label"] == "compliance"
    if text is not None and not harmful_text and not fields.get("hash_only"):
        out["text"] = text
    if fields.get("system_prompt"):
        out["system_prompt"] = fields["system_prompt"]
    return out


def split_for(prompt_id: str) -> str:
    """The split of every completion of one prompt: fixed by the prompt id's hash, so the completions
    that several models and edits wrote for one prompt never straddle the tune and held-out halves."""
    return SPLITS[int(sha256_text(prompt_id)[:8], 16) % 2]


def requests_of(rows: Sequence[LabelRow], data_dir: str | Path) -> dict[str, str]:
    """Each row's request text, read from its data file (a JSON list of {"instruction": ...})."""
    files: dict[str, list[Any]] = {}
    out: dict[str, str] = {}
    problems = []
    for row in rows:
        name, index = row.source
        if name not in files:
            path = Path(data_dir) / name
            files[name] = read_json(path) if path.is_file() else []
        items = files[name]
        if not 0 <= index < len(items):
            problems.append(f"{row.id}: {name} has no prompt {index} (data folder {data_dir})")
            continue
        item = items[index]
        out[row.id] = str(item["instruction"] if isinstance(item, dict) else item)
    if problems:
        raise RefusalkitError("labels name prompts that are not there:\n  " + "\n  ".join(problems[:20]))
    return out


# (rows sharing one generation, their requests) -> their completions, in order
Regenerate = Callable[[Sequence[LabelRow], Sequence[str]], list[str]]


@dataclass
class Materialized:
    """The completions a labelled set can be scored on: by row id, and the rows left out."""

    texts: dict[str, str]
    stale: list[str]  # rows whose regenerated text no longer matches their hash
    skipped: list[str]  # hash-only rows not regenerated (asked not to)

    def rows(self, rows: Sequence[LabelRow]) -> list[LabelRow]:
        return [r for r in rows if r.id in self.texts]


def materialize(
    rows: Sequence[LabelRow],
    requests: dict[str, str],
    regenerate: Regenerate | None,
    *,
    skip_hashed: bool = False,
) -> Materialized:
    """Every row's completion: its stored text, or regenerated and checked against its hash.

    Without ``regenerate``, hash-only rows are an error, or with ``skip_hashed`` listed as skipped:
    never left out quietly."""
    texts = {r.id: r.text for r in rows if r.text is not None}
    todo = [r for r in rows if r.text is None]
    if todo and regenerate is None:
        if skip_hashed:
            return Materialized(texts, [], [r.id for r in todo])
        raise RefusalkitError(
            f"{len(todo)} labels hold only a hash; scoring them needs their completions regenerated "
            "(let the models load, or pass --no-regenerate to score the rows stored as text only)"
        )
    groups: dict[tuple[Any, ...], list[LabelRow]] = {}
    for r in todo:
        groups.setdefault(r.generation, []).append(r)
    stale = []
    for group in groups.values():
        assert regenerate is not None
        new = regenerate(group, [requests[r.id] for r in group])
        for r, text in zip(group, new, strict=True):
            if sha256_text(text) == r.sha256:
                texts[r.id] = text
            else:
                stale.append(r.id)
    return Materialized({r.id: texts[r.id] for r in rows if r.id in texts}, stale, [])


__all__ = [
    "SPLITS",
    "LabelRow",
    "Materialized",
    "label_row",
    "load_labels",
    "materialize",
    "requests_of",
    "split_for",
]
