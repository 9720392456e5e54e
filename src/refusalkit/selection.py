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


@dataclass
class CandidateScore:
    position: int  # negative index from the end of the prompt
    layer: int
    bypass: float
    induce: float
    kl: float
    kept: bool = False
    reason: str = ""  # why it was discarded, "" if kept

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def layer_cutoff(n_layers: int, rules: SelectionRules) -> int:
    return int(rules.max_layer_frac * n_layers)


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
    """Score every candidate; ``done`` scores are reused (resume), ``checkpoint`` sees progress."""
    arch = lm.arch
    cutoff = layer_cutoff(candidates.n_layers, rules)
    results = {(s.position, s.layer): s for s in (done or [])}
    base_harmless = logits_for_prompts(lm, harmless_val, batch_size)
    both = harmful_val + harmless_val
    n_harmful = len(harmful_val)
    todo = [
        (p, layer)
        for layer in range(candidates.n_layers)
        for p in range(candidates.n_positions)
        if (candidates.position_label(p), layer) not in results
        and (rules.score_late_layers or layer < cutoff)
    ]
    dirs = candidates.directions
    for i, (p, layer) in enumerate(tqdm(todo, desc="scoring candidates", disable=None)):
        vector = dirs[p, layer].float()
        nan = float("nan")
        if not torch.isfinite(vector).all() or float(vector.norm()) == 0.0:
            score = CandidateScore(candidates.position_label(p), layer, nan, nan, nan)
        else:
            with ablate_direction(arch, vector):
                ablated = logits_for_prompts(lm, both, batch_size)
            with add_direction(arch, vector, layer, coeff=1.0):
                added = logits_for_prompts(lm, harmless_val, batch_size)
            score = CandidateScore(
                position=candidates.position_label(p),
                layer=layer,
                bypass=float(refusal_metric(ablated[:n_harmful], refusal_ids).mean()),
                induce=float(refusal_metric(added, refusal_ids).mean()),
                kl=float(kl_div(base_harmless, ablated[n_harmful:]).mean()),
            )
        results[(score.position, score.layer)] = score
        if checkpoint is not None and (i % 5 == 4 or i == len(todo) - 1):
            checkpoint(list(results.values()))
    for p in range(candidates.n_positions):
        for layer in range(
            cutoff if not rules.score_late_layers else candidates.n_layers, candidates.n_layers
        ):
            key = (candidates.position_label(p), layer)
            results.setdefault(key, CandidateScore(key[0], layer, math.nan, math.nan, math.nan))
    return sorted(results.values(), key=lambda s: (s.layer, s.position))


def apply_rules(scores: list[CandidateScore], n_layers: int, rules: SelectionRules) -> CandidateScore:
    """Mark each candidate kept or discarded (with the reason) and return the pick."""
    cutoff = layer_cutoff(n_layers, rules)
    for s in scores:
        if s.layer >= cutoff:
            s.reason = f"layer >= {cutoff} ({rules.max_layer_frac} * {n_layers})"
        elif any(math.isnan(v) for v in (s.bypass, s.induce, s.kl)):
            s.reason = "NaN score"
        elif s.kl > rules.kl_threshold:
            s.reason = f"KL {s.kl:.3f} > {rules.kl_threshold}"
        elif s.induce < rules.induce_threshold:
            s.reason = f"induce {s.induce:.2f} < {rules.induce_threshold}"
        else:
            s.reason = ""
        s.kept = not s.reason
    kept = [s for s in scores if s.kept]
    if not kept:
        counts: dict[str, int] = {}
        for s in scores:
            key = s.reason.split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
        raise RefusalkitError(
            f"all {len(scores)} candidate directions were filtered out (by rule: {counts}). Loosen the rules, "
            "e.g. --kl-threshold 0.2 or --induce-threshold -1, or use more/other training prompts; "
            "the scores are saved in candidate_scores.json"
        )
    return min(kept, key=lambda s: s.bypass)
