"""The refusal metric (PAPER.md section 2): log-odds of the first token of a refusal, no generation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from refusalkit.errors import RefusalkitError

# First words of typical refusals. The paper's code uses "I" for most families and "I" + "As" for Qwen.
DEFAULT_REFUSAL_STRINGS = ("I", "As")
EPS = 1e-8
PAPER_KL_EPS = 1e-6  # the paper's code's KL smoothing (see paper_kl_div)


def refusal_token_ids(
    tokenizer: Any, strings: list[str] | tuple[str, ...] = DEFAULT_REFUSAL_STRINGS
) -> list[int]:
    """The first token id of each refusal string, as the model would emit it at the start of a reply."""
    ids: list[int] = []
    for s in strings:
        toks = tokenizer.encode(s, add_special_tokens=False)
        if not toks:
            raise RefusalkitError(
                f"refusal string {s!r} encodes to no tokens; choose another --refusal-tokens"
            )
        if toks[0] not in ids:
            ids.append(toks[0])
    return ids


def refusal_metric(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """log P - log(1 - P), P = total probability of ``token_ids``; > 0 means a refusal is likely.

    logits: [batch, vocab] -> [batch] float64.
    """
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, token_ids].sum(-1).clamp(0.0, 1.0)
    return torch.log(p + EPS) - torch.log(1 - p + EPS)


def kl_div(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || other) of next-token distributions, per row, float64. [batch, vocab] -> [batch]."""
    logp = torch.log_softmax(base_logits.double(), dim=-1)
    logq = torch.log_softmax(other_logits.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def paper_kl_div(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """The paper's code's KL score: sum p (log(p + 1e-6) - log(q + 1e-6)), float64, per row.

    Not the exact KL: the epsilon shrinks the contribution of rare tokens, so it reads a few percent
    lower on real models, enough to flip a candidate near the 0.1 threshold. [batch, vocab] -> [batch].
    """
    p = torch.softmax(base_logits.double(), dim=-1)
    q = torch.softmax(other_logits.double(), dim=-1)
    return (p * (torch.log(p + PAPER_KL_EPS) - torch.log(q + PAPER_KL_EPS))).sum(-1)


KL_DEFINITIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "exact": kl_div,
    "paper": paper_kl_div,
}


def kl_function(definition: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The KL score for ``definition`` ("exact" or "paper"); an unknown name lists the known ones."""
    if definition not in KL_DEFINITIONS:
        raise RefusalkitError(
            f"unknown KL definition {definition!r}; choose one of {', '.join(sorted(KL_DEFINITIONS))}"
        )
    return KL_DEFINITIONS[definition]
