"""Direction selection, as in the paper's code (PAPER.md section 4).

For each candidate (position, layer): bypass = mean refusal metric on harmful validation prompts under
directional ablation; induce = mean refusal metric on harmless validation prompts under activation
addition at its layer; KL = mean KL(baseline || ablated) of the last-token distribution on harmless
validation prompts. Discard NaN scores, late layers (l >= max_layer_frac * L), induce <
induce_threshold and KL > kl_threshold; pick the lowest bypass score.

``rules`` holds the rules and the pick, ``search`` decides which scores to compute, ``passes`` runs
the forward passes cheaply.
"""

from refusalkit.selection.rules import (
    CandidateScore,
    SelectionRules,
    apply_rules,
    discard_reason,
    layer_cutoff,
    loosened_picks,
)
from refusalkit.selection.search import score_candidates

__all__ = [
    "CandidateScore",
    "SelectionRules",
    "apply_rules",
    "discard_reason",
    "layer_cutoff",
    "loosened_picks",
    "score_candidates",
]
