"""Benchmark the pipeline's stages on a built-in model; prints its numbers, asserts nothing.

Measures, in one process so the ratios share the machine's state:
  - model load time;
  - tokens/s of a plain forward pass vs. streaming mean-activation collection over the same prompts
    (the ratio is the cost of the hooks and float64 accumulation);
  - seconds per selection candidate with and without the shared-prefix KV cache;
  - greedy generation tokens/s: transformers' generate (the previous path) vs refusalkit's;
  - peak resident memory;
  - with --run DIR: each stage's seconds from that run's manifest.

Usage: python bench/stages.py [--model NAME] [--n 64] [--candidates 3] [--run runs/default]
       python bench/stages.py --times-only --run runs/default --against runs/default-old
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from refusalkit.activations import last_logits, logits_for_prompts, mean_activations
from refusalkit.data import load_instructions, sample
from refusalkit.generation import eos_ids, generate_ids
from refusalkit.interventions import ablate_direction, add_direction, token_mask
from refusalkit.models import DEFAULT_MODEL, load_model
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import batches, encode, format_prompts, post_instruction_ids


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@torch.inference_mode()
def hf_generate(
    lm: LoadedModel, prompts: list[str], *, max_new_tokens: int, batch_size: int
) -> list[list[int]]:
    """The previous generation path: transformers' greedy generate per length-sorted batch (no shared
    prefix cache; finished rows keep running until the whole batch ends). New token ids, EOS included."""
    tok = lm.tokenizer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, list[int]] = {}
    stop = sorted(eos_ids(lm))
    for chunk in batches(order, batch_size):
        batch = encode(tok, [prompts[i] for i in chunk], padding_side="left").to(lm.device)
        with token_mask(batch.attention_mask):
            ids = lm.model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stop,
            )  # fmt: skip
        for i, row in zip(chunk, ids[:, batch.input_ids.shape[1] :].tolist(), strict=True):
            ends = [j for j, t in enumerate(row) if t in stop]
            out[i] = row[: ends[0] + 1] if ends else row
    return [out[i] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=64, help="prompts per class for the forward/activation timing")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=3, help="selection candidates to time")
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--gen-n", type=int, default=32, help="prompts to generate for")
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--run", type=Path, help="a finished run folder whose stage times to print")
    ap.add_argument(
        "--against",
        type=Path,
        help="a run of other code on the same machine (issue 9: today's commit): ratios per stage",
    )
    ap.add_argument("--times-only", action="store_true", help="only print the stage times of --run/--against")
    args = ap.parse_args()

    if args.times_only:
        stage_times(args.run, args.against)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}")
    t0 = time.perf_counter()
    lm = load_model(args.model)
    print(f"load_model: {time.perf_counter() - t0:.1f} s   (peak RSS {peak_rss_gib():.2f} GiB)")
    tok = lm.tokenizer
    harmful = sample(load_instructions("builtin:harmful").instructions, args.n, 0)
    harmless = sample(load_instructions("builtin:harmless").instructions, args.n, 0)
    prompts = format_prompts(tok, harmful + harmless)
    n_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)

    last_logits(lm, encode(tok, prompts[:2]))  # warm-up
    t0 = time.perf_counter()
    for chunk in batches(prompts, args.batch_size):
        last_logits(lm, encode(tok, chunk))
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_pos = len(post_instruction_ids(tok))
    mean_activations(lm, prompts, n_pos, batch_size=args.batch_size)
    acts = time.perf_counter() - t0
    print(f"plain forward:        {n_tokens / plain:8.1f} tok/s ({n_tokens} tokens, {plain:.1f} s)")
    print(
        f"activation streaming: {n_tokens / acts:8.1f} tok/s ({acts:.1f} s)  ratio {acts / plain:.2f}x plain"
    )

    val = prompts[: args.n_val] + prompts[args.n : args.n + args.n_val]
    harmless_val = prompts[args.n : args.n + args.n_val]
    d = lm.arch.embed.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    for share in (False, True):
        t0 = time.perf_counter()
        for i in range(args.candidates):
            v = torch.randn(d, generator=gen)
            layer = (i * 7) % lm.arch.n_layers
            with ablate_direction(lm.arch, v):
                logits_for_prompts(lm, val, args.batch_size, share_prefix=share)
            with add_direction(lm.arch, v, layer):
                logits_for_prompts(lm, harmless_val, args.batch_size, share_prefix=share)
        per = (time.perf_counter() - t0) / args.candidates
        label = "shared prefix" if share else "no prefix cache"
        print(f"selection, {label:>15}: {per:6.2f} s/candidate (n_val {args.n_val}+{args.n_val})")

    gen_prompts = prompts[args.n : args.n + args.gen_n]
    for label, fn in (("transformers generate", hf_generate), ("refusalkit generate", generate_ids)):
        t0 = time.perf_counter()
        outs = fn(lm, gen_prompts, max_new_tokens=args.gen_tokens, batch_size=args.gen_batch)
        dt = time.perf_counter() - t0
        new_tokens = sum(len(o) for o in outs)
        print(
            f"{label:>22}: {new_tokens / dt:8.1f} new tok/s ({len(gen_prompts)} prompts, batch {args.gen_batch}, "
            f"{args.gen_tokens} max new tokens, {new_tokens} tokens, {dt:.1f} s)"
        )
    print(f"peak RSS: {peak_rss_gib():.2f} GiB")

    if args.run:
        stage_times(args.run, args.against)


def stage_times(run: Path | None, against: Path | None) -> None:
    """Each stage's seconds from the runs' manifests, and new / old per stage and in total."""
    if run is None:
        return
    new = json.loads((run / "manifest.json").read_text()).get("stages", {})
    old = json.loads((against / "manifest.json").read_text()).get("stages", {}) if against else {}
    print(f"{'stage':<10} {'this run':>10} {'against':>10} {'ratio':>7}")
    for stage in dict.fromkeys([*new, *old]):
        a, b = new.get(stage, {}).get("seconds"), old.get(stage, {}).get("seconds")
        ratio = f"{a / b:7.2f}" if a and b else ""
        print(f"{stage:<10} {a or 0:10.1f} {b or 0:10.1f} {ratio}")
    ta = sum(r["seconds"] for r in new.values())
    tb = sum(r["seconds"] for r in old.values())
    print(
        f"{'total':<10} {ta:10.1f} {tb:10.1f} {ta / tb if tb else float('nan'):7.2f}   ({ta / 60:.1f} vs {tb / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
