"""The search's cheap objectives and KL statistics.

Refusal proxy, on harmful validation prompts. From the last-token logits alone (``new_tokens=0``):
the refusal metric (PAPER.md section 2) read as a probability P = sigmoid(metric) of starting with a
refusal token; the objective is its mean over the prompts ("expected refusals"), and the count of
prompts with metric > 0 is recorded beside it. That proxy is blind to a reply that starts to comply and
then refuses, or calls the request illegal, a few tokens in; heretic's markers count those. With
``new_tokens=N`` each prompt also gets its first N greedy tokens (the same pass's first step gives the
logits above for free), judged by both marker lists (``search.markers``): a prompt whose tokens hold a
marker counts 1, any other its P, and ``refused`` counts the judged ones. A prompt stops generating
as soon as its tokens hold a marker (the verdict cannot change), so refusing edits cost less.

Harm is first-token KL(original || edited) on harmless prompts, whose unedited logits are computed once
and reused by every trial.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.errors import RefusalkitError
from refusalkit.generation import generate
from refusalkit.metric import kl_div, refusal_metric
from refusalkit.models.loading import LoadedModel
from refusalkit.search.markers import any_judge


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
    refusal: float  # the objective: mean over harmful prompts of P(refusal token), or 1 where judged
    refused: int  # prompts whose refusal metric is > 0 (new_tokens=0), else judged refusals
    n_harmful: int
    kl: KLStats
    seconds: float
    new_tokens: int = 0  # greedy tokens judged per harmful prompt (0: logits only)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class ProxyScorer:
    """Scores whatever edit is active on ``lm`` (weights or hooks): a harmful pass (one forward pass, or
    ``new_tokens`` greedy steps) and a harmless forward pass.

    harmful: formatted harmful validation prompts; harmless: formatted harmless prompts for KL.
    """

    def __init__(
        self,
        lm: LoadedModel,
        harmful: list[str],
        harmless: list[str],
        refusal_ids: list[int],
        batch_size: int = 32,
        new_tokens: int = 0,
        gen_batch_size: int = 64,
    ) -> None:
        if not harmful or not harmless:
            raise RefusalkitError("the search needs harmful validation prompts and harmless KL prompts")
        if new_tokens < 0:
            raise RefusalkitError(f"new_tokens must be 0 (logits only) or more, not {new_tokens}")
        self.lm, self.harmful, self.harmless = lm, harmful, harmless
        self.refusal_ids, self.batch_size = refusal_ids, batch_size
        self.new_tokens, self.gen_batch_size = new_tokens, gen_batch_size
        t0 = time.perf_counter()
        self.base_harmless = logits_for_prompts(lm, harmless, batch_size)
        self.baseline_seconds = time.perf_counter() - t0

    def harmful_scores(self) -> tuple[torch.Tensor, list[bool] | None]:
        """Under the active edit: the refusal metric per harmful prompt ([n], float64) and, with
        ``new_tokens``, whether a judge finds a refusal in the prompt's first greedy tokens."""
        if not self.new_tokens:
            logits = logits_for_prompts(self.lm, self.harmful, self.batch_size)
            return refusal_metric(logits, self.refusal_ids), None
        first: dict[int, torch.Tensor] = {}
        texts = generate(
            self.lm, self.harmful, max_new_tokens=self.new_tokens, batch_size=self.gen_batch_size,
            desc="proxy", first_logits=first, done=self._judged,
        )  # fmt: skip
        logits = torch.stack([first[i] for i in range(len(self.harmful))])
        return refusal_metric(logits, self.refusal_ids), [any_judge(t) for t in texts]

    def _judged(self, _i: int, ids: list[int]) -> bool:
        """A prompt whose tokens so far hold a marker is judged whatever follows (both judges match
        substrings anywhere, so a verdict can only go from no to yes as the text grows): its row leaves
        the generation batch. An empty text (which heretic counts as a refusal) waits for its tokens."""
        text = self.lm.tokenizer.decode(ids, skip_special_tokens=True)
        return bool(text.strip()) and any_judge(text)

    def refusing(self) -> list[bool]:
        """Which harmful prompts the model refuses under the active edit, by the proxy's own reading."""
        metric, judged = self.harmful_scores()
        flags = (metric > 0).tolist()
        return flags if judged is None else [a or b for a, b in zip(flags, judged, strict=True)]

    def __call__(self) -> ProxyResult:
        t0 = time.perf_counter()
        metric, judged = self.harmful_scores()
        p = torch.sigmoid(metric)
        if judged is None:
            refusal, refused = float(p.mean()), int((metric > 0).sum())
        else:
            hit = torch.tensor(judged, dtype=torch.bool)
            refusal, refused = float(torch.where(hit, torch.ones_like(p), p).mean()), int(hit.sum())
        edited = logits_for_prompts(self.lm, self.harmless, self.batch_size)
        return ProxyResult(
            refusal=refusal,
            refused=refused,
            n_harmful=len(self.harmful),
            kl=kl_stats(self.base_harmless, edited),
            seconds=time.perf_counter() - t0,
            new_tokens=self.new_tokens,
        )
