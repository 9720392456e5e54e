"""The search's cheap objectives (one forward pass each, last-token logits only) and KL statistics.

Refusal proxy: the refusal metric (PAPER.md section 2) on harmful validation prompts, read as a
probability P = sigmoid(metric) of starting with a refusal token; the objective is its mean over the
prompts ("expected refusals"), and the count of prompts with metric > 0 is recorded beside it. Harm is
first-token KL(original || edited) on harmless prompts (at least 100 by default), whose unedited logits
are computed once and reused by every trial.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.errors import RefusalkitError
from refusalkit.metric import kl_div, refusal_metric
from refusalkit.models.loading import LoadedModel


@dataclass
class KLStats:
    mean: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, per_prompt: torch.Tensor) -> KLStats:
        values = per_prompt.double().tolist()
        return cls(
            float(sum(values) / len(values)),
            float(statistics.median(values)),
            float(max(values)),
            len(values),
        )


def kl_stats(base_logits: torch.Tensor, other_logits: torch.Tensor) -> KLStats:
    """KL(base || other) of next-token distributions, summarized over prompts. [n, vocab] each."""
    return KLStats.of(kl_div(base_logits, other_logits))


@dataclass
class ProxyResult:
    refusal: float  # mean P(refusal token) over the harmful prompts: the objective
    refused: int  # prompts whose refusal metric is > 0
    n_harmful: int
    kl: KLStats
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class ProxyScorer:
    """Scores whatever edit is active on ``lm`` (weights or hooks) with two forward passes.

    harmful: formatted harmful validation prompts; harmless: formatted harmless prompts for KL.
    """

    def __init__(
        self,
        lm: LoadedModel,
        harmful: list[str],
        harmless: list[str],
        refusal_ids: list[int],
        batch_size: int = 32,
    ) -> None:
        if not harmful or not harmless:
            raise RefusalkitError("the search needs harmful validation prompts and harmless KL prompts")
        self.lm, self.harmful, self.harmless = lm, harmful, harmless
        self.refusal_ids, self.batch_size = refusal_ids, batch_size
        t0 = time.perf_counter()
        self.base_harmless = logits_for_prompts(lm, harmless, batch_size)
        self.baseline_seconds = time.perf_counter() - t0

    def harmful_metric(self) -> torch.Tensor:
        """[n_harmful] refusal metric under the active edit (float64)."""
        return refusal_metric(logits_for_prompts(self.lm, self.harmful, self.batch_size), self.refusal_ids)

    def __call__(self) -> ProxyResult:
        t0 = time.perf_counter()
        metric = self.harmful_metric()
        edited = logits_for_prompts(self.lm, self.harmless, self.batch_size)
        return ProxyResult(
            refusal=float(torch.sigmoid(metric).mean()),
            refused=int((metric > 0).sum()),
            n_harmful=len(self.harmful),
            kl=kl_stats(self.base_harmless, edited),
            seconds=time.perf_counter() - t0,
        )
