"""Verification of front points on held-out prompts: full greedy generations judged by refusal markers,
and first-token KL on held-out harmless prompts (mean, median, max), so nobody has to trust the proxy.

Every completion is judged by both marker lists of ``search.markers`` (the paper's phrases and
heretic's markers); a claim must survive the stricter.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from refusalkit.activations import logits_for_prompts
from refusalkit.generation import generate
from refusalkit.models.loading import LoadedModel
from refusalkit.search.markers import JUDGES
from refusalkit.search.objectives import KLStats, kl_stats


@dataclass
class Verified:
    refused: dict[str, int]  # judge name -> completions judged refusals
    n: int
    kl: KLStats
    max_new_tokens: int
    seconds: float

    def rate(self) -> float:
        """The worst judge's refusal rate (the one a claim must survive)."""
        return max(self.refused.values()) / self.n

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Verifier:
    """Generates and judges under whatever edit is active; held-out baseline KL logits computed once.

    harmful, harmless: formatted held-out prompts.
    """

    def __init__(
        self,
        lm: LoadedModel,
        harmful: list[str],
        harmless: list[str],
        *,
        max_new_tokens: int,
        batch_size: int = 32,
        gen_batch_size: int = 128,
    ) -> None:
        self.lm, self.harmful, self.harmless = lm, harmful, harmless
        self.max_new_tokens, self.batch_size, self.gen_batch_size = max_new_tokens, batch_size, gen_batch_size
        self.base_harmless = logits_for_prompts(lm, harmless, batch_size)

    def _judged(self, _i: int, ids: list[int]) -> bool:
        """A completion every judge already calls a refusal keeps that verdict whatever follows (the
        judges match substrings anywhere, so a verdict only goes from no to yes as the text grows): its
        row leaves the batch. The counts equal those of full completions; refusing edits (and the
        unedited model) cost fewer decoding steps. An empty text waits for its tokens."""
        text = self.lm.tokenizer.decode(ids, skip_special_tokens=True)
        return bool(text.strip()) and all(judge(text) for judge in JUDGES.values())

    def __call__(self, desc: str = "verify") -> Verified:
        t0 = time.perf_counter()
        texts = generate(
            self.lm,
            self.harmful,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.gen_batch_size,
            desc=desc,
            done=self._judged,
        )
        refused = {name: sum(judge(t) for t in texts) for name, judge in JUDGES.items()}
        kl = kl_stats(self.base_harmless, logits_for_prompts(self.lm, self.harmless, self.batch_size))
        return Verified(refused, len(texts), kl, self.max_new_tokens, time.perf_counter() - t0)


__all__ = ["Verified", "Verifier"]
