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

Chat setups (``search.setups``): the harmful prompts may come as one list per setup (each instruction
rendered under each setup) and the harmless ones likewise. Each setup's expected refusal is the mean
over its own prompts; the objective is the worst setup's, so an edit that still refuses under one setup
scores as badly as that setup, however well it does under the rest (a mean would hide it). The KL
objective is the mean over every harmless prompt of every setup (the search shares its ``kl_n`` prompts
out among the setups, so a trial costs what one setup's KL did): KL is a damage spread over all use,
not a pass/fail per setup, and the worst of three 33-prompt means would mostly measure the heavy tail's
noise. Every setup's numbers are recorded beside the objectives.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

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


@dataclass
class ProxyResult:
    refusal: float  # the objective: the worst setup's mean of P(refusal token), or 1 where judged
    refused: int  # of the worst setup's prompts, those with metric > 0 (new_tokens=0), else judged ones
    n_harmful: int  # the worst setup's prompts
    kl: KLStats  # over every harmless prompt of every setup
    seconds: float
    new_tokens: int = 0  # greedy tokens judged per harmful prompt (0: logits only)
    worst: str = ""  # the setup whose refusal is the objective
    # setup name -> {"refusal", "refused", "n", "kl"} (its own expected refusal and KL mean)
    setups: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class ProxyScorer:
    """Scores whatever edit is active on ``lm`` (weights or hooks): a harmful pass (one forward pass, or
    ``new_tokens`` greedy steps, every setup's prompts in one batch) and a harmless forward pass per
    setup (each with its own shared-prefix cache: a setup's system turn is common to its prompts).

    harmful: formatted harmful validation prompts, one list per chat setup (a plain list: one setup,
    named ""); harmless: formatted harmless prompts for KL, likewise.
    """

    def __init__(
        self,
        lm: LoadedModel,
        harmful: list[str] | Mapping[str, list[str]],
        harmless: list[str] | Mapping[str, list[str]],
        refusal_ids: list[int],
        batch_size: int = 32,
        new_tokens: int = 0,
        gen_batch_size: int = 64,
    ) -> None:
        by_setup = dict(harmful) if isinstance(harmful, Mapping) else {"": list(harmful)}
        kl_sets = dict(harmless) if isinstance(harmless, Mapping) else {"": list(harmless)}
        if not all(by_setup.values()) or not by_setup or not any(kl_sets.values()):
            raise RefusalkitError("the search needs harmful validation prompts and harmless KL prompts")
        if new_tokens < 0:
            raise RefusalkitError(f"new_tokens must be 0 (logits only) or more, not {new_tokens}")
        self.lm = lm
        # flat, in setup order: the prompts and which setup each belongs to (``keep`` narrows both)
        self.harmful = [p for ps in by_setup.values() for p in ps]
        self.harmful_setup = [name for name, ps in by_setup.items() for _ in ps]
        self.harmless = {name: ps for name, ps in kl_sets.items() if ps}
        self.refusal_ids, self.batch_size = refusal_ids, batch_size
        self.new_tokens, self.gen_batch_size = new_tokens, gen_batch_size
        t0 = time.perf_counter()
        self.base_harmless = {
            name: logits_for_prompts(lm, ps, batch_size) for name, ps in self.harmless.items()
        }
        self.baseline_seconds = time.perf_counter() - t0

    def keep(self, flags: list[bool]) -> None:
        """Narrow the harmful prompts to those flagged, setup by setup; a setup left with fewer than
        two keeps all of its prompts (a one-prompt objective says nothing)."""
        kept: list[tuple[str, str]] = []
        for name in dict.fromkeys(self.harmful_setup):
            mine = [
                (p, f) for p, f, s in zip(self.harmful, flags, self.harmful_setup, strict=True) if s == name
            ]
            chosen = [p for p, f in mine if f]
            kept += [(p, name) for p in (chosen if len(chosen) >= 2 else [p for p, _ in mine])]
        self.harmful = [p for p, _ in kept]
        self.harmful_setup = [name for _, name in kept]

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
            scores, hits = p, metric > 0
        else:
            hits = torch.tensor(judged, dtype=torch.bool)
            scores = torch.where(hits, torch.ones_like(p), p)
        per: dict[str, dict[str, float]] = {}
        for name in dict.fromkeys(self.harmful_setup):
            rows = torch.tensor([s == name for s in self.harmful_setup])
            per[name] = {
                "refusal": float(scores[rows].mean()),
                "refused": int(hits[rows].sum()),
                "n": int(rows.sum()),
            }
        kl_rows = {name: kl_div(self.base_harmless[name], logits_for_prompts(self.lm, ps, self.batch_size))
                   for name, ps in self.harmless.items()}  # fmt: skip
        for name, rows_kl in kl_rows.items():
            per.setdefault(name, {})["kl"] = float(rows_kl.double().mean())
        worst = max((n for n in per if "refusal" in per[n]), key=lambda n: per[n]["refusal"])
        return ProxyResult(
            refusal=per[worst]["refusal"],
            refused=int(per[worst]["refused"]),
            n_harmful=int(per[worst]["n"]),
            kl=KLStats.of(torch.cat(list(kl_rows.values()))),
            seconds=time.perf_counter() - t0,
            new_tokens=self.new_tokens,
            worst=worst,
            setups=per,
        )


def filter_refused(scorer: ProxyScorer) -> None:
    """Keep the harmful prompts the unedited model refuses under their setup (metric > 0, as the paper's
    selection does, or, with a generated proxy, a judge's marker in its first tokens)."""
    scorer.keep(scorer.refusing())
