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

With a proxy judge (``judge``: an LLM judge, ``--proxy-judge``) the same generated tokens, whole (no
early stop: a judge reads the completion), are also judged in four classes, in one batched pass after
the edit is undone (``score``: a ``local`` judge is the run's own model and must read unedited weights),
and a setup's refusal objective becomes the share of its completions the judge does not call
compliance (refusal, partial, degenerate, invalid): an edit that makes the model evade instead of
answer is not rewarded. The keyword reading (its expected refusal and count) is recorded beside it.

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
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.verdicts import CLASSES, Judge, counts
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
    refusal: float  # the objective: the worst setup's mean of P(refusal token), or 1 where judged;
    # with a proxy judge, the worst setup's share of completions the judge did not call compliance
    refused: int  # of the worst setup's prompts, those with metric > 0 (new_tokens=0), else marked ones
    n_harmful: int  # the worst setup's prompts
    kl: KLStats  # over every harmless prompt of every setup
    seconds: float  # the whole trial's scoring, the proxy judge's pass included
    new_tokens: int = 0  # greedy tokens judged per harmful prompt (0: logits only)
    worst: str = ""  # the setup whose refusal is the objective
    # setup name -> {"refusal", "refused", "n", "kl"} (its own expected refusal and KL mean); with a
    # proxy judge also "keyword_refusal" (the keyword reading's expected refusal) and "judged" (counts)
    setups: dict[str, dict[str, Any]] = field(default_factory=dict)
    judge: str | None = None  # the proxy judge's name (None: the keyword reading alone)
    judged: dict[str, int] | None = None  # its class counts on the worst setup's completions
    keyword_refusal: float | None = None  # what the keyword objective would be (its own worst setup)
    judge_seconds: float | None = None  # the proxy judge's pass
    # completions waiting for the proxy judge (``ProxyScorer.judged``); never recorded
    pending: list[str] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, object]:
        if self.pending is not None:
            raise RuntimeError(
                "a proxy-judged result was recorded before its judge read it; score trials with "
                "ProxyScorer.score(edit), which judges once the edit is undone"
            )
        out = asdict(self)
        del out["pending"]
        if self.judge is None:  # a keyword proxy's record stays what it always was
            for k in ("judge", "judged", "keyword_refusal", "judge_seconds"):
                del out[k]
        return out


class ProxyScorer:
    """Scores whatever edit is active on ``lm`` (weights or hooks): a harmful pass (one forward pass, or
    ``new_tokens`` greedy steps, every setup's prompts in one batch) and a harmless forward pass per
    setup (each with its own shared-prefix cache: a setup's system turn is common to its prompts).

    harmful: formatted harmful validation prompts, one list per chat setup (a plain list: one setup,
    named ""); harmless: formatted harmless prompts for KL, likewise. judge: a proxy judge (module
    docstring), which needs ``new_tokens`` and ``requests``: the harmful prompts as the user wrote them
    (unformatted), shaped as ``harmful``.
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
        *,
        judge: Judge | None = None,
        requests: list[str] | Mapping[str, list[str]] | None = None,
    ) -> None:
        by_setup = dict(harmful) if isinstance(harmful, Mapping) else {"": list(harmful)}
        kl_sets = dict(harmless) if isinstance(harmless, Mapping) else {"": list(harmless)}
        if not all(by_setup.values()) or not by_setup or not any(kl_sets.values()):
            raise RefusalkitError("the search needs harmful validation prompts and harmless KL prompts")
        if new_tokens < 0:
            raise RefusalkitError(f"new_tokens must be 0 (logits only) or more, not {new_tokens}")
        if judge is not None and not new_tokens:
            raise RefusalkitError(
                "a proxy judge reads the proxy's generated tokens: give --proxy-new-tokens N (N > 0), "
                "or --proxy-judge keywords"
            )
        asked = dict(requests) if isinstance(requests, Mapping) else {"": list(requests or [])}
        if judge is not None and [len(asked.get(k, [])) for k in by_setup] != [
            len(v) for v in by_setup.values()
        ]:
            raise ValueError("a proxy judge needs one request per harmful prompt, shaped as the prompts")
        self.lm, self.judge = lm, judge
        # flat, in setup order: the prompts, which setup each belongs to and, for a judge, its request
        # (``keep`` narrows all three)
        self.harmful = [p for ps in by_setup.values() for p in ps]
        self.harmful_setup = [name for name, ps in by_setup.items() for _ in ps]
        self.requests = [r for name in by_setup for r in asked.get(name, [])] if judge else []
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
        kept: list[int] = []
        for name in dict.fromkeys(self.harmful_setup):
            mine = [i for i, s in enumerate(self.harmful_setup) if s == name]
            chosen = [i for i in mine if flags[i]]
            kept += chosen if len(chosen) >= 2 else mine
        self.harmful = [self.harmful[i] for i in kept]
        self.harmful_setup = [self.harmful_setup[i] for i in kept]
        self.requests = [self.requests[i] for i in kept] if self.requests else []

    def harmful_scores(self) -> tuple[torch.Tensor, list[bool] | None]:
        """Under the active edit: the refusal metric per harmful prompt ([n], float64) and, with
        ``new_tokens``, whether a marker list finds a refusal in the prompt's first greedy tokens."""
        metric, marked, _texts = self.harmful_pass(stop_early=True)
        return metric, marked

    def harmful_pass(self, stop_early: bool) -> tuple[torch.Tensor, list[bool] | None, list[str]]:
        """``harmful_scores`` and the generated texts (whole ones unless ``stop_early``: a row a
        marker list marked may leave the batch, as its keyword verdict cannot change)."""
        if not self.new_tokens:
            logits = logits_for_prompts(self.lm, self.harmful, self.batch_size)
            return refusal_metric(logits, self.refusal_ids), None, []
        return generated_refusal(
            self.lm, self.harmful, self.refusal_ids, new_tokens=self.new_tokens, batch_size=self.gen_batch_size,
            desc="proxy", done=self._judged if stop_early else None, judge=any_judge,
        )  # fmt: skip

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

    def score(self, edit: AbstractContextManager[Any]) -> ProxyResult:
        """Score a trial: everything the edited model does, under ``edit`` (a context that applies the
        edit and undoes it on exit, ``search.edit.applied_edit``), then the proxy judge's pass on the
        completions once the edit is undone, so a ``local`` judge never reads edited weights."""
        with edit:
            result = self()
        return self.judged(result)

    def judged(self, result: ProxyResult) -> ProxyResult:
        """``result`` with the proxy judge's objective (no judge: as it is). Call it with no edit
        active (``score`` does)."""
        if self.judge is None or result.pending is None:
            return result
        t0 = time.perf_counter()
        verdicts = self.judge.judge(self.requests, result.pending)
        took = time.perf_counter() - t0
        for name, per in result.setups.items():
            if "n" not in per:
                continue  # a setup with harmless prompts only
            mine = [v for v, s in zip(verdicts, self.harmful_setup, strict=True) if s == name]
            per["keyword_refusal"] = per["refusal"]
            per["judged"] = counts(mine, CLASSES)
            per["judged"].pop("echo", None)
            per["refusal"] = sum(v.label != "compliance" for v in mine) / len(mine)
        worst = max(
            (n for n in result.setups if "n" in result.setups[n]), key=lambda n: result.setups[n]["refusal"]
        )
        top = result.setups[worst]
        result.keyword_refusal = result.refusal
        result.refusal, result.refused, result.n_harmful = top["refusal"], int(top["refused"]), int(top["n"])
        result.worst, result.judged, result.judge = worst, dict(top["judged"]), self.judge.name
        result.judge_seconds, result.seconds = took, result.seconds + took
        result.pending = None
        return result

    def __call__(self) -> ProxyResult:
        """Score whatever edit is active. With a proxy judge the result still waits for the judge
        (``pending``): ``score`` judges it after the edit is undone."""
        t0 = time.perf_counter()
        metric, judged, texts = self.harmful_pass(stop_early=self.judge is None)
        if judged is None:
            scores, hits = torch.sigmoid(metric), metric > 0
        else:
            hits = torch.tensor(judged, dtype=torch.bool)
            scores = expected_refusal(metric, hits)
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
            pending=texts if self.judge is not None else None,
        )


def generated_refusal(
    lm: LoadedModel, prompts: list[str], refusal_ids: list[int], *, new_tokens: int, batch_size: int, desc: str,
    done: Callable[[int, list[int]], bool] | None, judge: Callable[[str], bool],
) -> tuple[torch.Tensor, list[bool], list[str]]:  # fmt: skip
    """Each prompt's first ``new_tokens`` greedy tokens (``done``: which rows may leave early): the
    refusal metric of the first step's logits, ``judge``'s verdict on each text, and the texts. The
    generated proxy of both searches (the removal search's and the calibration goal's)."""
    first: dict[int, torch.Tensor] = {}
    texts = generate(
        lm,
        prompts,
        max_new_tokens=new_tokens,
        batch_size=batch_size,
        desc=desc,
        first_logits=first,
        done=done,
    )
    logits = torch.stack([first[i] for i in range(len(prompts))])
    return refusal_metric(logits, refusal_ids), [judge(t) for t in texts], texts


def expected_refusal(metric: torch.Tensor, judged: torch.Tensor) -> torch.Tensor:
    """Per prompt: 1 where a judge found a refusal in its generated tokens, else P(refusal token) =
    sigmoid(refusal metric)."""
    p = torch.sigmoid(metric)
    return torch.where(judged, torch.ones_like(p), p)


def filter_refused(scorer: ProxyScorer) -> None:
    """Keep the harmful prompts the unedited model refuses under their setup (metric > 0, as the paper's
    selection does, or, with a generated proxy, a judge's marker in its first tokens)."""
    scorer.keep(scorer.refusing())
