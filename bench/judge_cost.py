"""Benchmark the local LLM judge's cost against the 100-prompt KL pass on the same model (issue 18: judging
100 completions should cost at most one KL pass). Prints seconds and token counts, never text.

  kl pass     next-token logits of N formatted harmless test prompts (``logits_for_prompts``, the shared
              prefix cached): what the search's KL proxy and the coherence measurement run per setting.
  llm judge   ``LLMJudge.label_logprobs`` on N (request, completion) pairs: one forward pass per pair,
              batched, the instructions' prefix cached; and once more without the cache (a check that
              both give the same log-probabilities, and what the cache saves).

Completions: a run's evaluate/completions/harmful__baseline.json (--run; harmful, so nothing is printed
but counts), else the paper repository's 100 harmless completions of Qwen 1.8B chat from the shared
data, cut to --completion-tokens tokens of the judge model (the run's default max_new_tokens is 64).

The judge reads the request and the whole completion, the KL pass only a prompt, so the ratio follows
the tokens each reads (both lines print tokens per second: per token the two passes cost about the
same). A run's unedited completions are mostly short refusals (EOS after 20-40 tokens); an edited
model's compliant completions run the full --completion-tokens: measure both.

Usage: python bench/judge_cost.py [--model NAME] [--judge-model NAME] [--run RUN_DIR] [--n 100] [--batch-size 32]
       [--completion-tokens 64] [--data DATA_DIR] [--threads N] [--dtype float32|bfloat16] [--no-plain]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from refusalkit.activations import encode_batches, logits_for_prompts
from refusalkit.evaluation.llm_judge import LLMJudge, verdicts_from
from refusalkit.models.loading import load_model
from refusalkit.models.registry import DEFAULT_MODEL
from refusalkit.prompts import format_prompts
from refusalkit.settings import default_data_dir


def pairs(args: argparse.Namespace, tokenizer: object) -> tuple[list[str], list[str]]:
    if args.run:
        rows = json.loads(
            (Path(args.run) / "evaluate" / "completions" / "harmful__baseline.json").read_text()
        )["rows"]
        return [r["instruction"] for r in rows][: args.n], [r["completion"] for r in rows][: args.n]
    ref = Path(args.data) / "reference_runs" / "qwen-1_8b-chat" / "harmless_baseline_completions.json"
    rows = json.loads(ref.read_text())[: args.n]
    cut = [
        tokenizer.decode(
            tokenizer(r["response"], add_special_tokens=False)["input_ids"][: args.completion_tokens]
        )  # type: ignore[operator,attr-defined]
        for r in rows
    ]
    return [r["prompt"] for r in rows], cut


def unique_tokens(lm: object, prompts: list[str], batch_size: int) -> tuple[int, int]:
    """(shared prefix tokens, tokens after it summed over prompts, padding excluded)."""
    enc = encode_batches(lm, prompts, batch_size)  # type: ignore[arg-type]
    return len(enc.prefix), sum(int(mask.sum()) for _, _, mask in enc.batches)


def timed(fn: object) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()  # type: ignore[operator]
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, help="The run's model (the KL pass; the judge by default)."
    )
    ap.add_argument("--judge-model", help="Another judge model, e.g. the 0.5B built-in for the 1.5B run.")
    ap.add_argument("--run")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--completion-tokens", type=int, default=64)
    ap.add_argument("--data", default=default_data_dir())
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--dtype", default="float32", help="Both models' dtype (the run's: bfloat16 where the CPU has it)."
    )
    ap.add_argument("--no-plain", action="store_true", help="Skip the judge without the prefix cache.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype, device="cpu")
    harmless = json.loads(
        (Path(args.data) / "refusal_direction" / "splits" / "harmless_test.json").read_text()
    )
    judge_lm = load_model(args.judge_model, dtype=args.dtype, device="cpu") if args.judge_model else lm
    requests, completions = pairs(args, judge_lm.tokenizer)
    if len(requests) < args.n:  # a run keeps n_test (32) completions: compare like with like
        print(f"only {len(requests)} completions to judge: both passes run {len(requests)}, not {args.n}")
        args.n = len(requests)
    kl_prompts = format_prompts(lm.tokenizer, [r["instruction"] for r in harmless[: args.n]])
    judge = LLMJudge(judge_lm, batch_size=args.batch_size, chunk=max(args.n, 1))
    judge_prompts = judge.prompts(requests, completions)
    logits_for_prompts(lm, kl_prompts[:2], 2)  # warm-up: first-call allocations are not the pass's cost

    kl_s, _ = timed(lambda: logits_for_prompts(lm, kl_prompts, args.batch_size))
    judge_s, cached = timed(lambda: judge.label_logprobs(requests, completions))
    if not args.no_plain:
        nocache = LLMJudge(judge_lm, batch_size=args.batch_size, chunk=max(args.n, 1), share_prefix=False)
        plain_s, plain = timed(lambda: nocache.label_logprobs(requests, completions))
    kp, kt = unique_tokens(lm, kl_prompts, args.batch_size)
    jp, jt = unique_tokens(judge_lm, judge_prompts, args.batch_size)
    judge_name = args.judge_model or args.model
    threads = torch.get_num_threads()
    print(
        f"model {args.model}, judge {judge_name}, {args.dtype}, {threads} threads, batch {args.batch_size}, n {args.n}"
    )
    print(f"kl pass:     {kl_s:7.2f} s   prefix {kp} tokens, {kt} tokens after it ({kt / kl_s:.0f} tok/s)")
    print(
        f"llm judge:   {judge_s:7.2f} s   prefix {jp} tokens, {jt} tokens after it ({jt / judge_s:.0f} tok/s)"
        f"  ({judge_s / kl_s:.2f}x the kl pass)"
    )
    if not args.no_plain:
        diff = float((cached - plain).abs().max())  # type: ignore[operator]
        print(f"  no cache:  {plain_s:7.2f} s   max |logprob difference| {diff:.2e}")
    labels = [v.label for v in verdicts_from(cached, judge.calibration.biases)]  # type: ignore[arg-type]
    print("verdicts (unfitted biases):", {c: labels.count(c) for c in judge.classes})


if __name__ == "__main__":
    main()
