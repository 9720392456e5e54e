"""The refusal metric and the two KL definitions (exact, and the paper's code's smoothed score)."""

from __future__ import annotations

import math

import pytest
import torch

from refusalkit.errors import RefusalkitError
from refusalkit.metric import kl_div, kl_function, paper_kl_div, refusal_metric


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = 4 * torch.randn(3, 50, generator=g)
    return base, base + torch.randn(3, 50, generator=g)


def test_exact_kl_is_the_kl() -> None:
    base, other = _logits()
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(other.double(), -1), torch.log_softmax(base.double(), -1), log_target=True,
        reduction="none",
    ).sum(-1)  # fmt: skip
    torch.testing.assert_close(kl_div(base, other), expected)
    assert kl_div(base, base).abs().max() < 1e-12


def test_paper_kl_is_the_papers_smoothed_sum() -> None:
    """sum p (log(p + 1e-6) - log(q + 1e-6)), by hand, and below the exact KL when rare tokens move."""
    base, other = _logits()
    p, q = torch.softmax(base.double(), -1), torch.softmax(other.double(), -1)
    by_hand = [
        sum(
            float(p[r, t]) * (math.log(float(p[r, t]) + 1e-6) - math.log(float(q[r, t]) + 1e-6))
            for t in range(50)
        )
        for r in range(3)
    ]
    torch.testing.assert_close(paper_kl_div(base, other), torch.tensor(by_hand, dtype=torch.float64))
    # Many rare tokens (a real vocabulary): the epsilon hides their share of the KL.
    g = torch.Generator().manual_seed(1)
    wide = 2 * torch.randn(2, 5000, generator=g)
    shifted = wide + 2 * torch.randn(2, 5000, generator=g)
    assert (paper_kl_div(wide, shifted) < 0.97 * kl_div(wide, shifted)).all()
    assert kl_function("paper") is paper_kl_div and kl_function("exact") is kl_div


def test_unknown_kl_definition_lists_the_known() -> None:
    with pytest.raises(RefusalkitError, match="exact, paper"):
        kl_function("symmetric")


def test_refusal_metric_is_log_odds() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    m = refusal_metric(logits, [0, 1])
    torch.testing.assert_close(m, torch.tensor([math.log(3.0), math.log(0.2 / 0.8)], dtype=torch.float64))
