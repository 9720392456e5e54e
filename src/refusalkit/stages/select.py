"""The select stage: score every candidate (bypass, induce, KL) and apply the paper's rules.

Artifacts: select/candidate_scores.json, select/direction.{safetensors,json}; select/partial_scores.json
is a checkpoint while scoring runs, so an interrupted selection resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from refusalkit.activations import logits_for_prompts
from refusalkit.directions import Candidates, Direction
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.metric import refusal_metric
from refusalkit.models.loading import LoadedModel
from refusalkit.selection import CandidateScore, SelectionRules, apply_rules, score_candidates
from refusalkit.settings import Settings
from refusalkit.stages.common import MIN_PROMPTS, prompts, refusal_ids
from refusalkit.utils import read_json, write_json

log = logging.getLogger(__name__)


def rules(s: Settings) -> SelectionRules:
    return SelectionRules(
        max_layer_frac=s.max_layer_frac,
        kl_threshold=s.kl_threshold,
        induce_threshold=s.induce_threshold,
        score_late_layers=s.score_late_layers,
        exhaustive=s.exhaustive_selection,
        kl_definition=s.kl_definition,
    )


def inputs(extract_fingerprint: str, splits: Any, s: Settings) -> dict[str, Any]:
    return {
        "extract": extract_fingerprint,
        "rules": dataclasses.asdict(rules(s)),
        "val": [splits.sha256("harmful_val"), splits.sha256("harmless_val")],
        "filter": s.filter_val,
    }


def artifacts(layout: RunLayout) -> list[Path]:
    return [
        layout.direction.with_suffix(".json"),
        layout.direction.with_suffix(".safetensors"),
        layout.candidate_scores,
    ]


def filtered_val(lm: LoadedModel, splits: Any, s: Settings) -> tuple[list[str], list[str], dict[str, Any]]:
    """The validation prompts (formatted), without those the model already refuses (harmless) or obeys
    (harmful) when ``filter_val`` is on."""
    harmful, harmless = prompts(lm, splits["harmful_val"], s), prompts(lm, splits["harmless_val"], s)
    info: dict[str, Any] = {"harmful": len(harmful), "harmless": len(harmless)}
    if not s.filter_val:
        return harmful, harmless, info
    ids = refusal_ids(lm, s)
    mh = refusal_metric(logits_for_prompts(lm, harmful, s.batch_size), ids)
    ml = refusal_metric(logits_for_prompts(lm, harmless, s.batch_size), ids)
    harmful = [p for p, m in zip(harmful, mh.tolist(), strict=True) if m > 0]
    harmless = [p for p, m in zip(harmless, ml.tolist(), strict=True) if m < 0]
    info |= {"harmful_kept": len(harmful), "harmless_kept": len(harmless)}
    for name, kept in (("harmful", harmful), ("harmless", harmless)):
        if len(kept) < MIN_PROMPTS:
            raise RefusalkitError(
                f"only {len(kept)} {name} validation prompts passed the refusal filter (need {MIN_PROMPTS}); "
                "raise --n-val, use other data, or --no-filter-val"
            )
    return harmful, harmless, info


def select(
    lm: LoadedModel, cands: Candidates, splits: Any, s: Settings, layout: RunLayout, fingerprint: str
) -> Direction:
    """Score the candidates, pick the direction, write the stage's artifacts. ``fingerprint`` (of the
    stage's inputs) guards the partial-scores checkpoint."""
    harmful_val, harmless_val, val_info = filtered_val(lm, splits, s)
    sel_rules = rules(s)
    partial = layout.partial_scores
    done: list[CandidateScore] = []
    if partial.is_file() and read_json(partial).get("fingerprint") == fingerprint:
        done = [CandidateScore(**d) for d in read_json(partial)["scores"]]
        log.info("resuming selection: %d candidates already scored", len(done))

    def checkpoint(scores: list[CandidateScore]) -> None:
        write_json(partial, {"fingerprint": fingerprint, "scores": [x.as_dict() for x in scores]})

    scores = score_candidates(
        lm,
        cands,
        harmful_val,
        harmless_val,
        refusal_ids(lm, s),
        rules=sel_rules,
        batch_size=s.batch_size,
        done=done,
        checkpoint=checkpoint,
    )
    try:
        best = apply_rules(scores, cands.n_layers, sel_rules)
    finally:  # the scores are worth keeping even when every candidate was filtered out
        write_json(
            layout.candidate_scores,
            {
                "validation": val_info,
                "rules": dataclasses.asdict(sel_rules),
                "scores": [x.as_dict() for x in scores],
            },
        )
    direction = Direction(
        vector=cands.directions[best.position + cands.n_positions, best.layer].float(),
        layer=best.layer,
        position=best.position,
        model=lm.name,
        scores={"bypass": best.bypass, "induce": best.induce, "kl": best.kl},
        meta={
            "n_layers": cands.n_layers,
            "n_positions": cands.n_positions,
            "post_instruction_tokens": cands.post_instruction_tokens,
        },
    )
    direction.save(layout.direction)
    partial.unlink(missing_ok=True)
    return direction


def load(layout: RunLayout) -> Direction:
    return Direction.load(layout.direction)
