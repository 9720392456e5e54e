"""Choosing the false-refusal vector's (layer, position): the least over-refusal on the validation
prompts, under a first-token KL limit, with the refusal of harmful requests kept.

Scores of a candidate v' (its ablation, all candidates sharing forward passes as selection's do):
  over          mean refusal metric of the pseudo-harmful validation prompts (OR-Bench-Hard val): lower
                is fewer false refusals
  over_rate     their fraction with refusal metric > 0 (the paper's filter's definition of refused)
  harmful_rate  the harmful validation prompts' fraction with refusal metric > 0
  kl            mean first-token KL(unedited || edited) on the harmless validation prompts
A candidate is kept when harmful_rate >= floor x the unedited model's harmful_rate and kl <= kl_max
(and its layer is below max_layer_frac of the depth, as the paper's selection); the pick is the kept
candidate with the lowest ``over``. Work, cheapest first: ``over`` of every candidate, then the other
two in order of increasing ``over`` until one is kept (the rest cannot win: pruned), unless exhaustive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from refusalkit.activations import PromptBatches, encode_batches, logits_for_batches
from refusalkit.errors import RefusalkitError
from refusalkit.metric import kl_div, refusal_metric
from refusalkit.models.loading import LoadedModel
from refusalkit.selection.passes import ablated_logits

SHARED = 8  # candidates per forward pass


@dataclass
class Score:
    position: int  # negative index from the end of the prompt
    layer: int
    over: float = math.nan
    over_rate: float = math.nan
    harmful_rate: float = math.nan
    kl: float = math.nan
    kept: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def of(cls, d: dict[str, Any]) -> Score:
        values: dict[str, Any] = {k: (math.nan if v is None else v) for k, v in d.items()}
        return cls(**values)


@dataclass(frozen=True)
class Limits:
    floor: float = 0.9  # harmful_rate kept at least floor x the unedited model's
    kl_max: float = 0.05
    max_layer_frac: float = 0.8


def reason(s: Score, base_harmful: float, limits: Limits) -> str:
    """Why a fully scored candidate is discarded ("" if it is kept)."""
    need = limits.floor * base_harmful
    if math.isnan(s.harmful_rate) or math.isnan(s.kl):
        return "not scored"
    if s.harmful_rate < need:
        return (
            f"harmful refusal {s.harmful_rate:.2f} < floor {need:.2f} ({limits.floor:g} x {base_harmful:.2f})"
        )
    if s.kl > limits.kl_max:
        return f"KL {s.kl:.3f} > {limits.kl_max:g}"
    return ""


def pick(scores: list[Score], base_harmful: float, limits: Limits) -> Score:
    """Mark each scored candidate kept or not and return the kept one with the lowest ``over``; a clear
    error when none is kept (the nearest candidates to each limit named)."""
    for s in scores:
        s.reason = reason(s, base_harmful, limits) if not math.isnan(s.kl) else (s.reason or "pruned")
        s.kept = not s.reason
    kept = [s for s in scores if s.kept]
    if kept:
        return min(kept, key=lambda s: s.over)
    scored = [s for s in scores if not math.isnan(s.harmful_rate)]
    best_h = max(scored, key=lambda s: s.harmful_rate, default=None)
    best_kl = min((s for s in scored if not math.isnan(s.kl)), key=lambda s: s.kl, default=None)
    near = []
    if best_h is not None:
        near.append(
            f"highest harmful refusal {best_h.harmful_rate:.2f} (layer {best_h.layer}, position {best_h.position}, KL {best_h.kl:.3f})"
        )
    if best_kl is not None:
        near.append(f"lowest KL {best_kl.kl:.3f} (harmful refusal {best_kl.harmful_rate:.2f})")
    raise RefusalkitError(
        f"no false-refusal candidate keeps harmful refusal at the floor ({limits.floor:g} x the unedited "
        f"model's {base_harmful:.2f} = {limits.floor * base_harmful:.2f}) within KL {limits.kl_max:g} among "
        f"{len(scored)} scored: {'; '.join(near) or 'none scored'}. Try a larger --lam (more of the refusal "
        "direction removed from the vector), a lower --floor or a higher --kl-max; the means computed "
        "so far are kept (calibrate/)"
    )


class Scorer:
    """The scores of candidates ``vectors`` ([n_positions, n_layers, d_model]), baselines computed once."""

    def __init__(
        self, lm: LoadedModel, vectors: torch.Tensor, pseudo_val: list[str], harmful_val: list[str],
        harmless_val: list[str], refusal_ids: list[int], batch_size: int,
    ) -> None:  # fmt: skip
        self.lm, self.vectors, self.ids = lm, vectors, refusal_ids
        self.pseudo = encode_batches(lm, pseudo_val, batch_size)
        self.harmful = encode_batches(lm, harmful_val, batch_size)
        self.harmless = encode_batches(lm, harmless_val, batch_size)
        self.base_harmless = logits_for_batches(lm, self.harmless)
        self.base = {
            "harmful_rate": float(
                (self._metric(logits_for_batches(lm, self.harmful), []) > 0).double().mean()
            ),
            "over_rate": float((self._metric(logits_for_batches(lm, self.pseudo), []) > 0).double().mean()),
        }

    def _metric(self, logits: torch.Tensor, _rows: list[int]) -> torch.Tensor:
        return refusal_metric(logits, self.ids)

    def vector(self, s: Score) -> torch.Tensor:
        return self.vectors[s.position + self.vectors.shape[0], s.layer].float()

    def _ablated(
        self, group: list[Score], enc: PromptBatches, score: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        return ablated_logits(self.lm, enc, torch.stack([self.vector(s) for s in group]), score)

    def over(self, group: list[Score]) -> None:
        for s, m in zip(group, self._ablated(group, self.pseudo, self._metric), strict=True):
            s.over, s.over_rate = float(m.mean()), float((m > 0).double().mean())

    def rest(self, group: list[Score]) -> None:
        k = len(group)
        for s, m in zip(group, self._ablated(group, self.harmful, self._metric), strict=True):
            s.harmful_rate = float((m > 0).double().mean())

        def kl(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
            return kl_div(self.base_harmless[torch.tensor(rows)].repeat(k, 1), logits)

        for s, v in zip(group, self._ablated(group, self.harmless, kl), strict=True):
            s.kl = float(v.mean())


def usable(v: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).all()) and float(v.norm()) > 1e-12


def score_candidates(
    scorer: Scorer, limits: Limits, *, done: list[Score] | None = None,
    checkpoint: Callable[[list[Score]], None] | None = None, exhaustive: bool = False,
) -> list[Score]:  # fmt: skip
    """Score the candidates below the layer cutoff (see the module docstring); ``done`` scores are reused
    (resume) and ``checkpoint`` sees progress."""
    n_pos, n_layers = scorer.vectors.shape[0], scorer.vectors.shape[1]
    cutoff = int(limits.max_layer_frac * n_layers)
    have = {(s.position, s.layer): s for s in done or []}
    scores = [
        have.get((p - n_pos, layer), Score(p - n_pos, layer)) for layer in range(cutoff) for p in range(n_pos)
    ]
    for s in scores:
        if not usable(scorer.vector(s)):
            s.reason = "zero vector (lambda 1 removed all of it)"
    todo = [s for s in scores if math.isnan(s.over) and not s.reason]
    for i in range(0, len(todo), SHARED):
        scorer.over(todo[i : i + SHARED])
        if checkpoint:
            checkpoint(scores)
    base = scorer.base["harmful_rate"]
    for s in sorted((s for s in scores if not s.reason or s.reason == "pruned"), key=lambda s: s.over):
        if math.isnan(s.kl):
            scorer.rest([s])
            if checkpoint:
                checkpoint(scores)
        if not exhaustive and not reason(s, base, limits):
            break
    return scores
