"""The extract stage: mean activations of harmful and harmless training prompts -> candidate directions.

Artifacts: extract/candidates.safetensors (the means), extract/summary.json (filter counts, metrics).
"""

from __future__ import annotations

from typing import Any

import torch

from refusalkit.activations import mean_activations
from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.metric import refusal_metric
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import post_instruction_ids
from refusalkit.settings import Settings
from refusalkit.stages.common import MIN_PROMPTS, content_fingerprint, prompts, refusal_ids
from refusalkit.utils import write_json


def inputs(model_fingerprint: str, splits: Any, s: Settings) -> dict[str, Any]:
    """What the candidates depend on: the model's weights (content, not name), how prompts are built,
    the training prompts and the filter."""
    return {
        "model": model_fingerprint,
        "dtype": s.dtype,
        "arch_override": s.arch_override,
        "system": s.system_prompt,
        "template": content_fingerprint(s.chat_template),
        "harmful": splits.sha256("harmful_train"),
        "harmless": splits.sha256("harmless_train"),
        "filter": s.filter_train,
        "tokens": s.refusal_tokens,
    }


def artifacts(layout: RunLayout) -> list[Any]:
    return [layout.candidates, layout.extract_summary]


def extract(lm: LoadedModel, splits: Any, s: Settings, layout: RunLayout) -> Candidates:
    """Means per class at every post-instruction position and layer; writes the stage's artifacts."""
    post_ids = post_instruction_ids(lm.tokenizer, s.system_prompt)
    ids = refusal_ids(lm, s)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return refusal_metric(logits, ids)

    stats: dict[str, Any] = {}
    means: dict[str, torch.Tensor] = {}
    for cls, sign in (("harmful", 1), ("harmless", -1)):
        acts = mean_activations(
            lm,
            prompts(lm, splits[f"{cls}_train"], s),
            len(post_ids),
            batch_size=s.batch_size,
            metric=metric,
            keep_sign=sign if s.filter_train else None,
            desc=f"{cls} activations",
        )
        if acts.kept < MIN_PROMPTS:
            raise RefusalkitError(
                f"only {acts.kept} of {acts.total} {cls} training prompts passed the refusal filter "
                f"(need {MIN_PROMPTS}); use more prompts (--n-train), other data, or --no-filter-train"
            )
        means[cls] = acts.mean
        metrics = acts.metrics
        stats[cls] = {
            "kept": acts.kept,
            "total": acts.total,
            "metric_mean": sum(metrics) / len(metrics) if metrics else float("nan"),
        }
    cands = Candidates(
        means["harmful"],
        means["harmless"],
        post_instruction_tokens=[lm.tokenizer.decode([i]) for i in post_ids],
    )
    cands.save(layout.candidates)
    write_json(layout.extract_summary, {"filter": stats, "refusal_token_ids": ids})
    return cands


def load(layout: RunLayout) -> Candidates:
    return Candidates.load(layout.candidates)
