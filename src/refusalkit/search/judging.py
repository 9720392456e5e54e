"""The verification's judges side by side: the keyword lists (every verification) and, with
``--judge``, an LLM judge's four classes (refusal, compliance, partial, degenerate), so a point that
evades instead of answering is seen as such.

The LLM judge reads every verified point's completions in one pass at the end of verification, after
each edit was undone: ``local`` is the run's own model, so it must judge unedited (an edited judge
would be judging with the weights under test). Each point's per-row verdicts and the sha256 of each
completion are saved to search/completions/ (``evaluation.verdict_files``); the completions
themselves, replies to harmful prompts, are never written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.verdict_files import verdict_dict, write_verdicts
from refusalkit.evaluation.verdicts import BINARY, CLASSES, NOT_REFUSAL, Judge, Verdict, counts
from refusalkit.models.loading import LoadedModel
from refusalkit.search.verify import Generation
from refusalkit.utils import read_json, sha256_file, sha256_text

LOCAL = "local"


def judge_key(spec: str | None, calibration: str | None) -> dict[str, Any] | None:
    """What tells two verifications' judges apart, known before any judge model loads: a cached result
    judged otherwise (or not at all) is verified again when a judge is asked for. Reads (and so checks)
    the calibration file: call it before the search, so a bad one fails before any trial."""
    if spec is None:
        return None
    if calibration:
        load_calibration(calibration)
    return {"spec": spec, "calibration": sha256_file(calibration)[:16] if calibration else None}


def load_calibration(path: str) -> dict[str, Any]:
    """A calibration file of `refusalkit judges --save-calibration`: judge name -> ``Calibration``."""
    from refusalkit.evaluation.judge_prompt import Calibration

    saved = read_json(path) if Path(path).is_file() else None
    if not isinstance(saved, dict):
        raise RefusalkitError(
            f"judge calibration {path} is missing or not a JSON object; write it with "
            "`refusalkit judges --labels FILE --fit --save-calibration FILE`"
        )
    return {k: Calibration.from_dict(v) for k, v in saved.items()}


def build_judge(spec: str, lm: LoadedModel, *, calibration: str | None = None, batch_size: int = 16) -> Judge:
    """``local``: the run's own model (``lm``, judged with every edit undone); ``http(s)://...``: an
    OpenAI-compatible server; anything else: a model ``load_model`` can load, in the run's dtype."""
    from refusalkit.evaluation.llm_judge import LLMJudge

    cal = load_calibration(calibration) if calibration else {}
    if spec == LOCAL:
        return LLMJudge(lm, calibration=cal.get("llm"), batch_size=batch_size)
    if spec.startswith(("http://", "https://")):
        from refusalkit.evaluation.endpoint_judge import EndpointJudge

        return EndpointJudge(spec, calibration=cal.get("endpoint"))
    dtype = str(lm.model.dtype).removeprefix("torch.")
    return LLMJudge.load(spec, dtype=dtype, calibration=cal.get("llm"), batch_size=batch_size)


def keyword_verdicts(gen: Generation) -> dict[str, list[Verdict]]:
    """The verification's own keyword verdicts per row (the markers it counted with)."""
    return {
        name: [
            Verdict("refusal" if m else NOT_REFUSAL, echo=e)
            for m, e in zip(sets, gen.echo[name], strict=True)
        ]
        for name, sets in gen.markers.items()
    }


def judge_all(judge: Judge, requests: Sequence[str], gens: Sequence[Generation]) -> list[list[Verdict]]:
    """Every generation's completions judged in one pass (the shared prefix runs once), split back."""
    texts = [t for g in gens for t in g.texts]
    verdicts = judge.judge(list(requests) * len(gens), texts) if texts else []
    out, start = [], 0
    for g in gens:
        out.append(verdicts[start : start + len(g.texts)])
        start += len(g.texts)
    return out


def add_judged(
    verified: dict[str, Any],
    verdicts: Sequence[Verdict],
    groups: Sequence[tuple[str, str]],
    record: dict[str, Any],
) -> None:
    """Each group's four-class counts (``judged``), the worst group's at the top (the group the keyword
    counts name), and who judged (``judge``)."""
    for g in verified["groups"]:
        rows = [v for v, x in zip(verdicts, groups, strict=True) if x == (g["setup"], g["set"])]
        g["judged"] = counts(rows, CLASSES)
        g["judged"].pop("echo", None)
    worst = next(
        g for g in verified["groups"] if (g["setup"], g["set"]) == (verified["setup"], verified["set"])
    )
    verified["judged"] = dict(worst["judged"])
    verified["judge"] = record


def save_rows(
    path: Path,
    name: str,
    gen: Generation,
    groups: Sequence[tuple[str, str]],
    judged: tuple[Judge, Sequence[Verdict]] | None,
    max_new_tokens: int,
) -> None:
    """One verification's rows: place, sha256, every judge's verdict; no text."""
    found: dict[str, Sequence[Verdict]] = dict(keyword_verdicts(gen))
    judges: dict[str, dict[str, Any]] = {
        n: {"kind": "keywords", "name": n, "classes": list(BINARY)} for n in found
    }
    if judged is not None:
        judge, verdicts = judged
        found[judge.name] = verdicts
        judges[judge.name] = judge.identity() | {"classes": list(judge.classes)}
    seen: dict[tuple[str, str], int] = {}
    rows = []
    for i, (text, g) in enumerate(zip(gen.texts, groups, strict=True)):
        seen[g] = seen.get(g, -1) + 1
        rows.append(
            {
                "setup": g[0],
                "set": g[1],
                "index": seen[g],  # the prompt's place in its prompt set
                "sha256": sha256_text(text),
                "verdicts": {n: verdict_dict(vs[i]) for n, vs in found.items()},
            }
        )
    write_verdicts(path, name, judges, rows, max_new_tokens=max_new_tokens)


__all__ = [
    "LOCAL",
    "add_judged",
    "build_judge",
    "judge_all",
    "judge_key",
    "keyword_verdicts",
    "load_calibration",
    "save_rows",
]
