"""Verification of front points on held-out prompts: full greedy generations judged by refusal markers,
and first-token KL on held-out harmless prompts (mean, median, max), so nobody has to trust the proxy.

Every completion is judged by both marker lists of ``search.markers`` (the paper's phrases and
heretic's markers); a claim must survive the stricter. Given the requests themselves, each count also
says how many of its verdicts rest only on markers the request contains (a compliant reply restating a
request that says "illegal"), so a count can be read for what it is. ``Verifier.run`` also returns the
completions and each row's markers, for an LLM judge that reads them afterwards, with the edit undone
(``search.judging``).

Given over-refusal sets (prompts that only look harmful, ``search.promptsets.over_refusal_sets``), the
same edit also answers them, under one chat setup (the run's own system prompt), and ``Verified.
over_refusal`` holds each set's refusal rate per judge of the measure stage (the paper's phrases, the
broad list) with its Wilson interval: ``calibrate.rates.judged_rates``, the one function every
over-refusal count in refusalkit comes from.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.generation import generate_ids
from refusalkit.metric import kl_div
from refusalkit.models.loading import LoadedModel
from refusalkit.search.markers import EMPTY, MATCHERS
from refusalkit.search.objectives import KLStats


@dataclass
class Verified:
    refused: dict[str, int]  # judge name -> completions judged refusals (the worst group's)
    n: int  # the worst group's prompts
    kl: KLStats  # over every setup's harmless prompts
    max_new_tokens: int
    seconds: float
    # judge name -> of its refusals, those made only of markers the request itself contains (None: the
    # requests were not given)
    echoed: dict[str, int] | None = None
    setup: str = ""  # the worst group's chat setup and prompt set
    set: str = ""
    # every group: {"setup", "set", "refused", "n", "echoed"}; judged by an LLM judge afterwards
    # (``search.judging.add_judged``), each group's dict and the whole result's gain "judged" (the four
    # classes' counts; the worst group's at the top) and the result "judge" (who judged)
    groups: list[dict[str, Any]] = field(default_factory=list)
    kl_by_setup: dict[str, KLStats] = field(default_factory=dict)
    # over-refusal set -> {judge: rate record (k, n, rate, ci95)}; None: no over-refusal sets given
    over_refusal: dict[str, dict[str, Any]] | None = None

    def rate(self) -> float:
        """The worst judge's refusal rate (the one a claim must survive)."""
        return max(self.refused.values()) / self.n

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """One verification's numbers and what it generated: each harmful prompt's completion (in the order
    of ``Verifier.harmful``) and, per keyword judge, the markers found in it and whether they all echo
    the request. Kept in memory only: completions of harmful prompts are never written as text."""

    verified: Verified
    texts: list[str]
    markers: dict[str, list[set[str]]]
    echo: dict[str, list[bool]]
    ids: list[list[int]] | None = None  # each completion's new token ids (``Verifier.truncated``)


class Verifier:
    """Generates and judges under whatever edit is active; held-out baseline KL logits computed once.
    over_refusal: instructions per over-refusal set (unformatted; ``system``: the system prompt they are
    answered under), counted apart from the harmful groups.

    harmful, harmless: formatted held-out prompts (harmless: one list per setup, or one plain list).
    requests: the harmful instructions themselves (in the order of ``harmful``), to count verdicts that
    only echo the request's own words. groups: each harmful prompt's (setup, prompt set), counted apart
    (default: one group). early_stop: a row every keyword judge has marked leaves the generation
    (``_judged``); False when another judge will read the whole completions.
    """

    def __init__(
        self,
        lm: LoadedModel,
        harmful: list[str],
        harmless: list[str] | Mapping[str, list[str]],
        *,
        max_new_tokens: int,
        batch_size: int = 32,
        gen_batch_size: int = 128,
        requests: list[str] | None = None,
        groups: list[tuple[str, str]] | None = None,
        early_stop: bool = True,
        over_refusal: Mapping[str, list[str]] | None = None,
        system: str | None = None,
    ) -> None:
        if requests is not None and len(requests) != len(harmful):
            raise ValueError(f"{len(requests)} requests for {len(harmful)} harmful prompts; give one each")
        if groups is not None and len(groups) != len(harmful):
            raise ValueError(f"{len(groups)} groups for {len(harmful)} harmful prompts; give one each")
        self.lm, self.harmful, self.requests = lm, harmful, requests
        self.harmless = dict(harmless) if isinstance(harmless, Mapping) else {"": list(harmless)}
        self.groups = groups or [("", "")] * len(harmful)
        # per prompt, per judge: the markers its request contains (none without the requests)
        self._in_request: list[dict[str, frozenset[str]]]
        if requests is None:
            self._in_request = [dict.fromkeys(MATCHERS, frozenset())] * len(harmful)
        else:
            self._in_request = [
                {name: frozenset(find(r)) - {EMPTY} for name, find in MATCHERS.items()} for r in requests
            ]
        self.max_new_tokens, self.batch_size, self.gen_batch_size = max_new_tokens, batch_size, gen_batch_size
        self.early_stop = early_stop
        self.over_refusal, self.system = dict(over_refusal or {}), system
        self.base_harmless = {
            name: logits_for_prompts(lm, ps, batch_size) for name, ps in self.harmless.items()
        }

    def _judged(self, i: int, ids: list[int]) -> bool:
        """A completion every judge already calls a refusal keeps that verdict whatever follows (the
        judges match substrings anywhere, so a verdict only goes from no to yes as the text grows): its
        row leaves the batch. The counts equal those of full completions; refusing edits (and the
        unedited model) cost fewer decoding steps. An empty text waits for its tokens; with the requests
        given, a verdict counts only by a marker the request does not contain (an echoed one may still
        become an ordinary one), so the echo counts are those of full completions too."""
        text = self.lm.tokenizer.decode(ids, skip_special_tokens=True)
        if not text.strip():
            return False
        return all(set(find(text)) - self._in_request[i][name] for name, find in MATCHERS.items())

    def __call__(self, desc: str = "verify", *, kl: bool = True) -> Verified:
        """Generate and count under the active edit; ``kl=False`` (the unedited model, whose KL to
        itself is 0) skips the harmless passes and reports KL 0."""
        return self.run(desc, kl=kl).verified

    def run(self, desc: str = "verify", *, kl: bool = True) -> Generation:
        """As ``__call__``, with the completions and each row's markers."""
        t0 = time.perf_counter()
        ids = generate_ids(
            self.lm,
            self.harmful,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.gen_batch_size,
            desc=desc,
            done=self._judged if self.early_stop else None,
        )
        texts = self.lm.tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
        found, echo, counted = self._count(texts)
        per_kl = {
            name: kl_div(self.base_harmless[name], logits_for_prompts(self.lm, ps, self.batch_size))
            if kl
            else torch.zeros(len(ps), dtype=torch.float64)
            for name, ps in self.harmless.items()
        }
        over = None
        if self.over_refusal:
            from refusalkit.calibrate.rates import judged_rates

            rates = judged_rates(
                self.lm, self.over_refusal, system=self.system, max_new_tokens=self.max_new_tokens,
                batch_size=self.gen_batch_size, desc=f"{desc} over-refusal", rows=False,
            )  # fmt: skip
            over = {name: r["rates"] for name, r in rates.items()}
        verified = Verified(
            **counted,
            kl=KLStats.of(torch.cat(list(per_kl.values()))),
            max_new_tokens=self.max_new_tokens,
            seconds=time.perf_counter() - t0,
            kl_by_setup={name: KLStats.of(v) for name, v in per_kl.items()},
            over_refusal=over,
        )
        return Generation(verified, texts, found, echo, ids)

    def _count(
        self, texts: list[str]
    ) -> tuple[dict[str, list[set[str]]], dict[str, list[bool]], dict[str, Any]]:
        """Each row's markers per keyword judge, whether they all echo the request, and the ``Verified``
        fields the counts decide: each (setup, set) group's counts and the worst group's (the highest
        refusal rate by either list)."""
        found = {name: [set(find(t)) for t in texts] for name, find in MATCHERS.items()}
        echo = {
            name: [bool(m) and m <= self._in_request[i][name] for i, m in enumerate(sets)]
            for name, sets in found.items()
        }
        per_group: list[dict[str, Any]] = []
        for g in dict.fromkeys(self.groups):
            rows = [i for i, x in enumerate(self.groups) if x == g]
            refused = {name: sum(bool(sets[i]) for i in rows) for name, sets in found.items()}
            echoed = None
            if self.requests is not None:  # verdicts whose every marker is in the request
                echoed = {name: sum(flags[i] for i in rows) for name, flags in echo.items()}
            per_group.append(
                {"setup": g[0], "set": g[1], "refused": refused, "n": len(rows), "echoed": echoed}
            )
        worst = max(per_group, key=lambda x: max(x["refused"].values()) / x["n"])
        counted = {
            "refused": worst["refused"],
            "n": int(worst["n"]),
            "echoed": worst["echoed"],
            "setup": str(worst["setup"]),
            "set": str(worst["set"]),
            "groups": per_group,
        }
        return found, echo, counted

    def truncated(self, gen: Generation, max_new_tokens: int) -> Generation:
        """``gen`` as if it had been generated with ``max_new_tokens`` (fewer than its own): each
        completion cut to its first ``max_new_tokens`` generated tokens and counted again; KL is kept
        (first-token logits do not depend on the length). Greedy decoding makes the cut completion the
        shorter generation's own, so one long generation gives the counts at both lengths (late refusals
        are the difference). Over-refusal is not recounted (its replies are not kept): None. Needs a
        Verifier built with ``early_stop=False`` (a row that left early is cut short already)."""
        if gen.ids is None or max_new_tokens > gen.verified.max_new_tokens:
            raise ValueError(
                f"cannot cut {gen.verified.max_new_tokens}-token completions to {max_new_tokens} tokens"
                + ("" if gen.ids is not None else " (their token ids were not kept)")
            )
        if self.early_stop:
            raise ValueError("truncated() needs a Verifier built with early_stop=False")
        ids = [row[:max_new_tokens] for row in gen.ids]
        texts = self.lm.tokenizer.batch_decode(ids, skip_special_tokens=True) if ids else []
        found, echo, counted = self._count(texts)
        verified = replace(gen.verified, **counted, max_new_tokens=max_new_tokens, over_refusal=None)
        return Generation(verified, texts, found, echo, ids)


__all__ = ["Generation", "Verified", "Verifier"]
