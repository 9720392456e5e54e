"""Benchmark TruthfulQA multiple-choice scoring: per question (the old path) against all questions
batched (``capability.option_logprobs``); prints numbers, asserts nothing.

  per-question  each question's whole context (system turn included) as one row, then its options as
                one right-padded batch continuing from a copy of that row's KV cache (the path before
                the batching; kept here as the reference).
  batched       the shared prefix once, contexts in left-padded batches, options of all questions in
                passes of up to 64 rows, each continuing from its own question's cache row.
Both run under two settings: baseline and directional ablation of a random direction (hooks active,
as in the suite's edited settings). Prints seconds per path, the ratio, and the largest |difference|
of MC1, MC2 and the per-option log-probabilities.

Usage: python bench/truthfulqa.py [--model NAME] [--n 12] [--data PATH]
"""

from __future__ import annotations

import argparse
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from refusalkit.activations import cache_kwarg, repeat_cache, run_prefix
from refusalkit.evaluation import capability as C
from refusalkit.interventions import ablate_direction, token_mask
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.models.registry import DEFAULT_MODEL
from refusalkit.prompts import format_prompt, pad_right


@torch.inference_mode()
def per_question_logprobs(lm: LoadedModel, context: list[int], options: list[list[int]]) -> torch.Tensor:
    """The old path for one question: context as one row, its options as one batch. -> [n] float64."""
    cache, last = run_prefix(lm, context)
    first = torch.log_softmax(last.double(), -1)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    batch = pad_right(options, pad).to(lm.device)
    n, width = batch.input_ids.shape
    mask = torch.cat(
        [torch.ones((n, len(context)), dtype=torch.long, device=lm.device), batch.attention_mask], 1
    )
    positions = torch.arange(len(context), len(context) + width, device=lm.device).expand(n, width)
    with token_mask(mask):
        logits = lm.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_kwarg(lm.model): repeat_cache(cache, n)},
        ).logits
    out = torch.empty(n, dtype=torch.float64)
    for i, o in enumerate(options):
        total = first[o[0]]
        if len(o) > 1:
            logp = torch.log_softmax(logits[i, : len(o) - 1].double(), -1)
            total = total + logp.gather(-1, torch.tensor(o[1:], device=lm.device)[:, None]).sum()
        out[i] = total.cpu()
    return out


def mc(items: list[C.TQAItem], answers: list[list[str]], lps: list[torch.Tensor]) -> list[dict[str, float]]:
    return [
        C.mc_scores(it, dict(zip(a, lp.tolist(), strict=True)))
        for it, a, lp in zip(items, answers, lps, strict=True)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--data", default="/work/shared/data/truthfulqa/TruthfulQA.csv")
    args = ap.parse_args()

    lm = load_model(args.model)
    tok = lm.tokenizer
    items = C.load_truthfulqa(args.data, args.n)
    contexts = [tok(format_prompt(tok, it.question), add_special_tokens=False)["input_ids"] for it in items]
    answers = [it.correct + it.incorrect for it in items]
    options = [[tok(a, add_special_tokens=False)["input_ids"] for a in group] for group in answers]
    n_opt = sum(len(o) for o in options)
    print(
        f"model {args.model}, {len(items)} questions, {n_opt} options; context tokens {sum(map(len, contexts))}, "
        f"option tokens {sum(len(o) for g in options for o in g)}, threads {torch.get_num_threads()}"
    )
    torch.manual_seed(0)
    direction = torch.randn(lm.model.config.hidden_size)
    settings: dict[str, AbstractContextManager[Any]] = {
        "baseline": nullcontext(),
        "ablation": ablate_direction(lm.arch, direction),
    }
    per_question_logprobs(lm, contexts[0], options[0][:1])  # warm-up: first-call allocations
    totals = {"per-question": 0.0, "batched": 0.0}
    for name, edit in settings.items():
        with edit:
            t0 = time.perf_counter()
            old = [per_question_logprobs(lm, c, o) for c, o in zip(contexts, options, strict=True)]
            t1 = time.perf_counter()
            new = C.option_logprobs(lm, contexts, options)
            t2 = time.perf_counter()
        totals["per-question"] += t1 - t0
        totals["batched"] += t2 - t1
        lp_diff = max(float((a - b).abs().max()) for a, b in zip(old, new, strict=True))
        mo, mn = mc(items, answers, old), mc(items, answers, new)
        mc1 = max(abs(a["mc1"] - b["mc1"]) for a, b in zip(mo, mn, strict=True))
        mc2 = max(abs(a["mc2"] - b["mc2"]) for a, b in zip(mo, mn, strict=True))
        print(
            f"{name:9s} per-question {t1 - t0:7.1f} s  batched {t2 - t1:7.1f} s  ratio {(t1 - t0) / (t2 - t1):5.2f}x  "
            f"max|diff| logprob {lp_diff:.2e}  MC1 {mc1:.0f}  MC2 {mc2:.2e}  "
            f"(MC2 mean {sum(r['mc2'] for r in mn) / len(mn):.4f})"
        )
    old_s, new_s = totals["per-question"], totals["batched"]
    print(f"total     per-question {old_s:7.1f} s  batched {new_s:7.1f} s  ratio {old_s / new_s:5.2f}x")


if __name__ == "__main__":
    main()
