"""Judged refusal rates of prompt sets under an edit: greedy completions, the run's marker judges
(the paper's list and the broad one, as the measure stage's refusal_judges), a rate with its Wilson
interval per judge. One function for the over-refusal measurement, calibration's validation record and
bench/calibrate.py, so the numbers mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from refusalkit.evaluation.judges import REFUSAL_JUDGES, refusal_verdicts
from refusalkit.evaluation.refusal import matched_markers, rate
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import format_prompts

Edit = Callable[[], AbstractContextManager[Any]]  # enters the edit for a block (None: the unedited model)


def judged_rates(
    lm: LoadedModel,
    sets: Mapping[str, list[str]],
    *,
    edit: Edit | None = None,
    system: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "over-refusal",
    rows: bool = True,
) -> dict[str, Any]:
    """Per set: {"rates": {judge: rate record}, "rows": [{instruction, completion, verdicts}]} under
    ``edit``. A completion every judge already calls a refusal stops early (markers match anywhere, so
    the verdict cannot change as the text grows): the counts equal those of full completions."""
    from refusalkit.generation import generate

    def judged(_i: int, ids: list[int]) -> bool:
        text = lm.tokenizer.decode(ids, skip_special_tokens=True)
        return all(matched_markers(text, m) for m in REFUSAL_JUDGES.values())

    out: dict[str, Any] = {}
    with edit() if edit is not None else nullcontext():
        for name, instructions in sets.items():
            texts = generate(
                lm,
                format_prompts(lm.tokenizer, instructions, system),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                desc=f"{desc} {name}",
                done=judged,
            )
            verdicts = [refusal_verdicts(t) for t in texts]
            n = len(verdicts)
            rec: dict[str, Any] = {
                "rates": {j: rate(sum(bool(v[j]) for v in verdicts), n) for j in REFUSAL_JUDGES}
            }
            if rows:
                rec["rows"] = [
                    {"instruction": q, "completion": t, **v}
                    for q, t, v in zip(instructions, texts, verdicts, strict=True)
                ]
            out[name] = rec
    return out
