"""A local LLM judge: any chat model the project can load classifies (request, completion) pairs.

The judge model reads ``judge_prompt.judge_text`` in its own chat template; the verdict comes from the
next-token log-probabilities of the class letters at the start of its reply, in one forward pass per
pair (no generation). Pairs run batched by length, and the prompt's shared prefix (the chat template's
system turn and the instructions, everything before the request) runs once per chunk of pairs, its KV
cache reused by every batch (``activations.logits_for_prompts``, the project's one prefix cache).

A letter's log-probability sums every first token that spells it (``A`` and `` A``), so a tokenizer
that prefers a leading space still answers. By default the judge model is the run's own unedited model
(no new download); any built-in name, model folder, GGUF file or hub id works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.judge_prompt import (
    DEFAULT_PROMPT,
    LETTERS,
    PROMPTS,
    Calibration,
    LetterJudge,
    decide,
    judge_text,
)
from refusalkit.evaluation.verdicts import CLASSES, Verdict, check_pairs
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.prompts import format_prompt
from refusalkit.utils import sha256_text


def letter_token_ids(tokenizer: Any) -> dict[str, list[int]]:
    """Each class's first-token ids: the letter's first token, plus the letter with a leading space
    where that is one token of its own. A first token shared by two classes would make the verdict
    ambiguous, so that is an error."""
    out: dict[str, list[int]] = {}
    seen: dict[int, str] = {}
    for letter, cls in LETTERS.items():
        bare = tokenizer(letter, add_special_tokens=False)["input_ids"]
        spaced = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        ids = bare[:1] + [i for i in spaced if len(spaced) == 1 and i not in bare[:1]]
        clash = sorted({seen[i] for i in ids if i in seen})
        if not ids or clash:
            raise RefusalkitError(
                f"the judge's tokenizer cannot tell the class letters apart ({letter} starts like "
                f"{clash or 'nothing'}); use another judge model"
            )
        seen.update(dict.fromkeys(ids, cls))
        out[cls] = ids
    return out


class LLMJudge(LetterJudge):
    """Four-class verdicts from a local chat model's letter probabilities.

    batch_size: pairs per forward pass; chunk: pairs whose [chunk, vocab] logits are held at once (the
    shared prefix runs once per chunk); share_prefix: reuse the prefix's KV cache (False runs every
    pair whole: the same numbers, for checks).
    """

    name = "llm"
    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        lm: LoadedModel,
        *,
        calibration: Calibration | None = None,
        batch_size: int = 16,
        chunk: int = 128,
        share_prefix: bool = True,
    ) -> None:
        self.lm = lm
        self.calibration = calibration or Calibration()
        self.batch_size, self.chunk, self.share_prefix = batch_size, chunk, share_prefix
        self.letter_ids = letter_token_ids(lm.tokenizer)

    @classmethod
    def load(
        cls,
        spec: str,
        *,
        dtype: str = "float32",
        device: str = "auto",
        load_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> LLMJudge:
        """Load the judge model (built-in name, folder, .gguf or hub id; ``load_kwargs``: more of
        ``load_model``'s, e.g. a run's chat template); a model that cannot load is a RefusalkitError
        that names the judge, so the run's own data is untouched."""
        try:
            lm = load_model(spec, **{**(load_kwargs or {}), "dtype": dtype, "device": device})
        except RefusalkitError as exc:
            raise RefusalkitError(f"the LLM judge model could not load: {exc}") from None
        return cls(lm, **kwargs)

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "llm",
            "model": self.lm.name,
            "fingerprint": self.lm.fingerprint,
            **self.calibration.as_dict(),
        }

    def prompts(self, requests: Sequence[str], completions: Sequence[str]) -> list[str]:
        check_pairs(requests, completions)
        tok = self.lm.tokenizer
        return [
            format_prompt(tok, judge_text(r, c, self.calibration.prompt))
            for r, c in zip(requests, completions, strict=True)
        ]

    def label_logprobs(self, requests: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """[n, 4] log-probabilities of the class letters (order of ``CLASSES``) as the reply's first
        token, float32, in input order."""
        texts = self.prompts(requests, completions)
        out = []
        for start in range(0, len(texts), self.chunk):
            logits = logits_for_prompts(
                self.lm, texts[start : start + self.chunk], self.batch_size, share_prefix=self.share_prefix
            )
            logp = torch.log_softmax(logits.float(), dim=-1)
            out.append(
                torch.stack([torch.logsumexp(logp[:, self.letter_ids[c]], dim=-1) for c in CLASSES], dim=1)
            )
        return torch.cat(out) if out else torch.empty((0, len(CLASSES)))

    def label_rows(self, requests: Sequence[str], completions: Sequence[str]) -> list[dict[str, float]]:
        return rows_of(self.label_logprobs(requests, completions))


def judge_completions(
    lm: LoadedModel, completions: Mapping[str, list[dict[str, Any]]], batch_size: int = 16
) -> dict[str, Any]:
    """The measure stage's ``llm_judge`` measurement: every saved completion (``PROMPTSET__SETTING`` ->
    rows of instruction and completion) judged by ``lm`` itself, unedited, in one pass over all files
    (the shared prefix runs once); per file the class counts as rates, each row's verdict and letter
    log-probabilities, and the counts where the keyword judges disagree with it (no text)."""
    from refusalkit.evaluation.agreement import disagreements
    from refusalkit.evaluation.refusal import rate
    from refusalkit.evaluation.verdicts import KeywordJudge

    judge = LLMJudge(lm, batch_size=batch_size, chunk=256)  # [256, vocab] logits held at once
    keys = sorted(completions)
    requests = [str(r.get("instruction", "")) for k in keys for r in completions[k]]
    texts = [str(r["completion"]) for k in keys for r in completions[k]]
    verdicts = judge.judge(requests, texts)
    out: dict[str, Any] = {
        "measured": True,
        "judge": judge.identity(),
        "rates": {},
        "rows": {},
        "agreement": {},
    }
    start = 0
    for key in keys:
        n = len(completions[key])
        vs, reqs, outs = verdicts[start : start + n], requests[start : start + n], texts[start : start + n]
        start += n
        prompt_set, _, setting = key.partition("__")
        out["rates"].setdefault(prompt_set, {})[setting] = {
            c: rate(sum(v.label == c for v in vs), n) for c in CLASSES
        }
        out["rows"][key] = [{"index": i, "label": v.label, "logprobs": v.logprobs} for i, v in enumerate(vs)]
        others = {name: KeywordJudge(name) for name in ("paper", "heretic")}
        found = {name: j.judge(reqs, outs) for name, j in others.items()} | {"llm": vs}
        out["agreement"][key] = disagreements(
            found, {"paper": others["paper"].classes, "heretic": others["heretic"].classes, "llm": CLASSES}
        )["pairs"]
    return out


def suite_inputs(s: Any) -> dict[str, Any]:
    """What the ``llm_judge`` measurement depends on (``evaluation.suite``): the saved completions (the
    evaluate stage, which fixes the model) and the prompt; computed without loading the model."""
    return {
        "evaluate": s.stage_fp("evaluate"),
        "prompt": DEFAULT_PROMPT,
        "text": sha256_text(PROMPTS[DEFAULT_PROMPT]),
    }


def suite_measure(s: Any) -> dict[str, Any]:
    """The ``llm_judge`` measurement of a run: its saved completions judged by its own unedited model."""
    keys = s.completion_keys()
    return judge_completions(s.lm, {k: s.completions(k) for k in keys}, s.settings.batch_size)


def rows_of(logprobs: torch.Tensor) -> list[dict[str, float]]:
    """[n, 4] letter log-probabilities as one {class: logprob} per pair."""
    return [
        {c: float(v) if math.isfinite(float(v)) else -math.inf for c, v in zip(CLASSES, row, strict=True)}
        for row in logprobs.tolist()
    ]


def verdicts_from(logprobs: torch.Tensor, biases: dict[str, float]) -> list[Verdict]:
    return [decide(row, biases) for row in rows_of(logprobs)]


__all__ = [
    "LLMJudge",
    "judge_completions",
    "letter_token_ids",
    "suite_inputs",
    "suite_measure",
    "verdicts_from",
]
