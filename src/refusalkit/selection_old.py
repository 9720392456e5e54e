"""Direction selection, as in the paper's code (PAPER.md section 4).

For each candidate (position, layer): bypass = mean refusal metric on harmful validation prompts under
directional ablation; induce = mean refusal metric on harmless validation prompts under activation
addition at its layer; KL = mean KL(baseline || ablated) of the last-token distribution on harmless
validation prompts. Discard NaN scores, late layers (l >= max_layer_frac * L), KL > kl_threshold and
induce < induce_threshold; pick the lowest bypass score.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from refusalkit.activations import logits_for_prompts
from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import ablate_direction, add_direction
from refusalkit.metric import kl_div, refusal_metric
from refusalkit.models.loading import LoadedModel


@dataclass(frozen=True)
class SelectionRules:
    max_layer_frac: float = 0.8
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    score_late_layers: bool = False  # score candidates the layer rule discards anyway (slower; for plots)
    exhaustive: bool = False  # induce and KL for every candidate, not only until the pick is certain


@dataclass
class CandidateScore:
    position: int  # negative index from the end of the prompt
    layer: int
    bypass: float
    induce: float
    kl: float
    kept: bool = False
    reason: str = ""  # why it was discarded, "" if kept
    complete: bool = True  # False: only the bypass score was computed (pruned, see score_candidates)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def layer_cutoff(n_layers: int, rules: SelectionRules) -> int:
    return int(rules.max_layer_frac * n_layers)


def _reason(s: CandidateScore, cutoff: int, n_layers: int, rules: SelectionRules) -> str:
    """Why the paper's rules discard a fully scored candidate ("" if they keep it)."""
    if s.layer >= cutoff:
        return f"layer >= {cutoff} ({rules.max_layer_frac} * {n_layers})"
    if any(math.isnan(v) for v in (s.bypass, s.induce, s.kl)):
        return "NaN score"
    if s.kl > rules.kl_threshold:
        return f"KL {s.kl:.3f} > {rules.kl_threshold}"
    if s.induce < rules.induce_threshold:
        return f"induce {s.induce:.2f} < {rules.induce_threshold}"
    return ""


def score_candidates(
    lm: LoadedModel,
    candidates: Candidates,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_ids: list[int],
    *,
    rules: SelectionRules,
    batch_size: int = 16,
    done: list[CandidateScore] | None = None,
    checkpoint: Callable[[list[CandidateScore]], None] | None = None,
) -> list[CandidateScore]:
    """Score the candidates; ``done`` scores are reused (resume), ``checkpoint`` sees progress.

    Two passes. First the bypass score of every candidate (ablation on the harmful prompts). Then, in
    order of increasing bypass, induce and KL (ablation and addition on the harmless prompts). The pick
    is the kept candidate with the lowest bypass, so once one candidate passes the rules no later one
    can win: unless ``rules.exhaustive``, the second pass stops there and the rest are marked pruned.
    The pick is the same as scoring everything; the second pass is two thirds of the cost per candidate.
    """
    arch = lm.arch
    n_layers = candidates.n_layers
    cutoff = layer_cutoff(n_layers, rules)
    results = {(s.position, s.layer): s for s in (done or [])}
    dirs = candidates.directions
    nan = math.nan

    def vector(s: CandidateScore) -> torch.Tensor:
        return dirs[s.position + candidates.n_positions, s.layer].float()

    todo = [
        (candidates.position_label(p), layer)
        for layer in range(n_layers)
        for p in range(candidates.n_positions)
        if (candidates.position_label(p), layer) not in results
        and (rules.score_late_layers or layer < cutoff)
    ]
    for i, (pos, layer) in enumerate(tqdm(todo, desc="bypass scores", disable=None)):
        s = CandidateScore(pos, layer, nan, nan, nan, complete=False)
        v = vector(s)
        if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
            s.complete = True  # nothing to ablate: every score is NaN
        else:
            with ablate_direction(arch, v):
                s.bypass = float(
                    refusal_metric(logits_for_prompts(lm, harmful_val, batch_size), refusal_ids).mean()
                )
        results[(pos, layer)] = s
        if checkpoint is not None and (i % 10 == 9 or i == len(todo) - 1):
            checkpoint(list(results.values()))

    def kept(s: CandidateScore) -> bool:
        return s.complete and not _reason(s, cutoff, n_layers, rules)

    best = min((s for s in results.values() if kept(s)), key=lambda s: s.bypass, default=None)
    pending = sorted(
        (s for s in results.values() if not s.complete and not math.isnan(s.bypass)), key=lambda s: s.bypass
    )
    base_harmless: torch.Tensor | None = None
    for s in tqdm(pending, desc="induce and KL", disable=None):
        if not rules.exhaustive and (s.layer >= cutoff or (best is not None and s.bypass >= best.bypass)):
            continue  # cannot be the pick
        if base_harmless is None:
            base_harmless = logits_for_prompts(lm, harmless_val, batch_size)
        v = vector(s)
        with ablate_direction(arch, v):
            ablated = logits_for_prompts(lm, harmless_val, batch_size)
        with add_direction(arch, v, s.layer, coeff=1.0):
            added = logits_for_prompts(lm, harmless_val, batch_size)
        s.kl = float(kl_div(base_harmless, ablated).mean())
        s.induce = float(refusal_metric(added, refusal_ids).mean())
        s.complete = True
        if kept(s) and (best is None or s.bypass < best.bypass):
            best = s
        if checkpoint is not None:
            checkpoint(list(results.values()))
    for p in range(candidates.n_positions):
        for layer in range(n_layers):
            key = (candidates.position_label(p), layer)
            results.setdefault(key, CandidateScore(key[0], layer, nan, nan, nan))
    return sorted(results.values(), key=lambda s: (s.layer, s.position))


def apply_rules(scores: list[CandidateScore], n_layers: int, rules: SelectionRules) -> CandidateScore:
    """Mark each candidate kept or discarded (with the reason) and return the pick."""
    cutoff = layer_cutoff(n_layers, rules)
    for s in scores:
        s.reason = _reason(s, cutoff, n_layers, rules) if s.complete or s.layer >= cutoff else ""
        s.kept = s.complete and not s.reason
    kept = [s for s in scores if s.kept]
    pick = min(kept, key=lambda s: s.bypass) if kept else None
    for s in scores:
        if not s.complete and not s.reason:
            s.reason = "pruned: bypass not below the pick's (not scored for induce/KL)"
    if pick is None:
        counts: dict[str, int] = {}
        for s in scores:
            key = s.reason.split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
        raise RefusalkitError(
            f"all {len(scores)} candidate directions were filtered out (by rule: {counts}). Loosen the rules, "
            "e.g. --kl-threshold 0.2 or --induce-threshold -1, or use more/other training prompts; "
            "the scores are saved in candidate_scores.json"
        )
    return pick
