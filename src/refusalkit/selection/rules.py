"""The paper's selection rules (PAPER.md section 4), the scores they read, and the pick.

Each rule reads one score, checked in the order the scores are computed (bypass, induce, KL), so a
candidate discarded by an early rule carries the same reason whether or not its later scores were
computed: induce below the threshold discards a candidate whatever its KL.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from refusalkit.errors import RefusalkitError


@dataclass(frozen=True)
class SelectionRules:
    max_layer_frac: float = 0.8
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    score_late_layers: bool = False  # score candidates the layer rule discards anyway (slower; for plots)
    exhaustive: bool = False  # every score of every candidate, not only what can change the pick
    kl_definition: str = "exact"  # "exact" KL, or "paper": the paper's code's epsilon-smoothed sum


@dataclass
class CandidateScore:
    position: int  # negative index from the end of the prompt
    layer: int
    bypass: float
    induce: float
    kl: float  # NaN when not computed (a rule had already discarded the candidate, or pruned)
    kept: bool = False
    reason: str = ""  # why it was discarded, "" if kept
    complete: bool = True  # False: pruned, its bypass could not beat the pick (see score_candidates)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def layer_cutoff(n_layers: int, rules: SelectionRules) -> int:
    return int(rules.max_layer_frac * n_layers)


def discard_reason(s: CandidateScore, cutoff: int, n_layers: int, rules: SelectionRules) -> str:
    """Why the paper's rules discard a candidate ("" if they keep it), reading the scores in order."""
    if s.layer >= cutoff:
        return f"layer >= {cutoff} ({rules.max_layer_frac} * {n_layers})"
    if math.isnan(s.bypass) or math.isnan(s.induce):
        return "NaN score"
    if s.induce < rules.induce_threshold:
        return f"induce {s.induce:.2f} < {rules.induce_threshold}"
    if math.isnan(s.kl):
        return "NaN score"
    if s.kl > rules.kl_threshold:
        return f"KL {s.kl:.3f} > {rules.kl_threshold}"
    return ""


def induce_flag(value: float) -> float:
    """The loosened --induce-threshold that admits a candidate with induce ``value`` (2 decimals)."""
    return math.floor(value * 100) / 100


def kl_flag(value: float) -> float:
    """The loosened --kl-threshold that admits a candidate with KL ``value`` (3 decimals)."""
    return math.ceil(value * 1000) / 1000


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def loosened_picks(scores: list[CandidateScore], cutoff: int, rules: SelectionRules) -> list[str]:
    """When every candidate is discarded: the nearest loosening of each single rule that admits one,
    and what the pick would then be, from the scores computed (``score_candidates`` computes enough)."""
    eligible = [s for s in scores if s.layer < cutoff and _finite(s.bypass, s.induce)]
    hints = []
    kl_ok = [s for s in eligible if _finite(s.kl) and s.kl <= rules.kl_threshold]
    if kl_ok:
        flag = induce_flag(max(s.induce for s in kl_ok))
        pick = min((s for s in kl_ok if s.induce >= flag), key=lambda s: s.bypass)
        hints.append(f"with --induce-threshold {flag:g} the pick would be {_describe(pick)}")
    induce_ok = [s for s in eligible if s.induce >= rules.induce_threshold and _finite(s.kl)]
    if induce_ok:
        flag = kl_flag(min(s.kl for s in induce_ok))
        pick = min((s for s in induce_ok if s.kl <= flag), key=lambda s: s.bypass)
        hints.append(f"with --kl-threshold {flag:g} the pick would be {_describe(pick)}")
    return hints


def _describe(s: CandidateScore) -> str:
    return f"position {s.position}, layer {s.layer} (bypass {s.bypass:.2f}, induce {s.induce:.2f}, KL {s.kl:.3f})"


def apply_rules(scores: list[CandidateScore], n_layers: int, rules: SelectionRules) -> CandidateScore:
    """Mark each candidate kept or discarded (with the reason) and return the pick."""
    cutoff = layer_cutoff(n_layers, rules)
    for s in scores:
        s.reason = discard_reason(s, cutoff, n_layers, rules) if s.complete or s.layer >= cutoff else ""
        s.kept = s.complete and not s.reason
    kept = [s for s in scores if s.kept]
    pick = min(kept, key=lambda s: s.bypass) if kept else None
    for s in scores:
        if not s.complete and not s.reason:
            s.reason = "pruned: bypass not below the pick's (its other scores were not computed)"
    if pick is None:
        counts: dict[str, int] = {}
        for s in scores:
            key = s.reason.split(" ")[0]
            counts[key] = counts.get(key, 0) + 1
        hints = loosened_picks(scores, cutoff, rules)
        hint = "; ".join(hints) if hints else "no single loosened threshold admits a candidate"
        raise RefusalkitError(
            f"all {len(scores)} candidate directions were filtered out (by rule: {counts}). {hint}. "
            "Loosen the rules (--kl-threshold, --induce-threshold) or use more/other training prompts; "
            "the scores are saved in candidate_scores.json"
        )
    return pick
