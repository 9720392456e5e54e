"""GCG suffix search + analysis on a real refusing model, on a CPU budget; prints a short verdict.

    python bench/suffix_search.py RUN_DIR [--minutes 18] [--n-prompts 1] [--width 64] ...

RUN_DIR is a finished run (direction selected; `refusalkit run` or at least `select`) of a built-in
model that refuses, e.g. qwen2.5-coder-0.5b-instruct. The script runs

    refusalkit suffix search  RUN_DIR --max-minutes M ...   -> RUN_DIR/suffix/search.json
    refusalkit suffix analyze RUN_DIR ...                   -> RUN_DIR/suffix/analysis.json, *.png

and prints the loss trajectory, whether the best suffix made the model comply on the search prompts
and on held-out prompts, the cosine shift against random suffixes and the top-head attribution change.
It never prints prompts or completions.

Budget (2 CPU cores, float32, about 30 minutes in all): loading the model twice (~1 min), GCG for
``--minutes`` (default 18), the analysis (trace + 48-token greedy completions for 8 harmful prompts x
{no suffix, found suffix, 2 random suffixes} and 8 harmless: ~2-4 min on 0.5B, ~8 min on 1.5B).

Cost of one GCG step (20-token suffix, 1 prompt, width 64, prefix cache on: one gradient pass and 64
candidate sequences of ~30 tokens past the cached template + instruction), measured on
smollm2-135m-instruct on this 2-core box while other jobs shared it (load average ~5): 6.3 s with one
thread (two threads: 12-22 s, oversubscribed). The cost scales with the non-embedding parameters (the
vocabulary only enters through ~5 target positions and the one-hot gradient): qwen2.5-0.5B has ~3.4x
smollm2's (358M vs 106M), qwen2.5-1.5B ~12x (1.31B); and linearly with prompts x width. Estimates:

    qwen2.5-coder-0.5b-instruct  ~21 s/step -> ~50 steps in 18 min (1 prompt, width 64)
    qwen2.5-coder-1.5b-instruct  ~75 s/step -> ~14 steps in 18 min; use --width 32 for ~28 steps

An idle box with two threads should be faster; with other jobs running pass --threads 1. Either way
this is far below the GCG paper's 500 steps x width 512 on a GPU: a small search, and a suffix that
does not jailbreak is an expected outcome that still gets analysed and reported.

Recommended: python bench/suffix_search.py RUN_DIR --minutes 18            (0.5B)
             python bench/suffix_search.py RUN_DIR --minutes 18 --width 32 (1.5B)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from refusalkit.cli import main as refusalkit_main

# Measured on smollm2-135m-instruct while other jobs shared the 2 cores (load average ~5): one thread
# ran a step in 6.3 s, two threads in 12-22 s (oversubscribed OpenMP threads wait on each other). On an
# idle box two threads should be faster than one. Scaled by non-embedding parameters (docstring).
STEP_SECONDS_SMOLLM2 = 6.3  # width 64, 1 prompt, 20-token suffix, 1 thread (2 threads under load: 12-22 s)
STEP_SECONDS_ESTIMATE = {"qwen2.5-coder-0.5b-instruct": 3.4 * 6.3, "qwen2.5-coder-1.5b-instruct": 12 * 6.3}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--minutes", type=float, default=18.0, help="Wall-clock budget of the GCG search.")
    p.add_argument("--steps", type=int, default=500, help="Step cap (the time budget usually stops first).")
    p.add_argument("--n-prompts", type=int, default=1, help="Prompts optimized together.")
    p.add_argument("--width", type=int, default=64, help="Candidates per step.")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--n-tokens", type=int, default=20, help="Suffix length.")
    p.add_argument("--objective", choices=["target", "direction", "both"], default="target")
    p.add_argument("--target", default="Sure, here is")
    p.add_argument(
        "--analysis-prompts", type=int, default=8, help="Harmful prompts analysed (search ones first)."
    )
    p.add_argument("--n-random", type=int, default=2, help="Random control suffixes.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    p.add_argument(
        "--skip-search", action="store_true", help="Analyse the existing RUN_DIR/suffix/search.json."
    )
    return p.parse_args()


def _run(argv: list[str]) -> None:
    t0 = time.perf_counter()
    code = refusalkit_main(argv)
    print(
        f"[bench] `refusalkit {' '.join(argv[:2])}` finished in {time.perf_counter() - t0:.0f} s (exit {code})"
    )
    if code != 0:
        sys.exit(code)


def trajectory(search: dict[str, Any], points: int = 8) -> str:
    hist = search["history"]
    idx = sorted({round(i * (len(hist) - 1) / (points - 1)) for i in range(points)})
    parts = []
    for i in idx:
        row = hist[i]
        extra = f"/proj {row['projection']:.2f}" if row["projection"] == row["projection"] else ""
        parts.append(f"{row['step']}:{row['loss']:.3f}{extra}")
    return "  ".join(parts)


def compliance(res: dict[str, Any]) -> list[str]:
    """'refused k/n without the suffix -> k'/n with it' for the search and the held-out prompts."""
    ref = res["refusal"]
    adv, n_search = ref["adversarial"], len(res["prompts"]["search"])
    lines = []
    for part in ("search_prompts", "heldout_prompts"):
        if part not in adv or "per_prompt" not in ref["harmful"]:
            continue
        rows = [
            i for i in range(len(res["prompts"]["harmful"])) if (i < n_search) == (part == "search_prompts")
        ]
        base = sum(ref["harmful"]["per_prompt"][i] for i in rows)
        lines.append(
            f"{part}: refused {base}/{len(rows)} without the suffix -> {adv[part]['refused']}/{adv[part]['n']} "
            f"with it (refusal metric {adv[part]['metric_mean']:+.2f})"
        )
    return lines


def report(search: dict[str, Any], res: dict[str, Any]) -> None:
    best, s, ref = search["best"], res["summary"], res["refusal"]
    print("\n=== GCG search ===")
    print(
        f"objective {search['config']['objective']}, target {search['config']['target']!r}, "
        f"{len(search['history']) - 1} steps ({search['stopped']}), {search['seconds_per_step']} s/step, "
        f"prompts {search['meta'].get('prompt_indices')}"
    )
    print(f"loss by step: {trajectory(search)}")
    print(
        f"best: step {best['step']}, loss {best['loss']:.3f}, target is the greedy continuation: {best['matched']}"
    )
    print(f"suffix: {best['suffix']!r}")

    print(f"\n=== refusal (substring judge, greedy, {res['max_new_tokens']} new tokens) ===")
    for n in res["conditions"]:
        r = ref[n]
        rate = f"{r['refused']}/{r['n']} refused" if "refused" in r else "no generation"
        print(f"{n:<12} {rate}, refusal metric {r['metric_mean']:+.2f}")

    layer = res["direction"]["layer"]
    print(f"\n=== cosine with the direction at the last token (layer {layer}) ===")
    for n in res["conditions"]:
        gap = s[n].get("gap_closed_at_layer")
        note = f", closes {gap:.0%} of the harmful-harmless gap" if gap is not None else ""
        print(
            f"{n:<12} {s[n]['cosine_at_layer']:+.3f} (mean from layer {layer}: {s[n]['cosine_mean_from_layer']:+.3f}){note}"
        )

    print("\n=== top heads by attribution on harmful prompts ===")
    print("heads: " + ", ".join(f"L{h['layer']}H{h['head']}" for h in res["head_attribution"]["top_heads"]))
    base = s["harmful"]["top_heads_attribution"]
    for n in res["conditions"]:
        v = s[n]["top_heads_attribution"]
        change = f" ({(v - base) / abs(base):+.0%} vs harmful)" if base and n != "harmful" else ""
        print(
            f"{n:<12} summed attribution {v:+.3f}{change}; attention on instruction "
            f"{s[n]['top_heads_instruction_share']:.2f}, on suffix {s[n]['top_heads_suffix_share']:.2f}"
        )

    print(
        "\n=== verdict (the paper expects: complies; cosine toward harmless; head attribution collapses;"
        " attention moves to the suffix; random suffixes do none of this) ==="
    )
    for line in compliance(res) or ["no completions (run without --no-generate to judge compliance)"]:
        print(line)
    for n in ("adversarial", "random"):
        if n not in s:
            continue
        gap = s[n].get("gap_closed_at_layer")
        v = s[n]["top_heads_attribution"]
        print(
            f"{n}: cosine gap closed {'-' if gap is None else f'{gap:.0%}'}; top-head attribution "
            f"{(v - base) / abs(base):+.0%} vs harmful; top heads' suffix share {s[n]['top_heads_suffix_share']:.2f}"
            if base
            else f"{n}: cosine gap closed {gap}"
        )


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = str(args.run_dir)
    t0 = time.perf_counter()
    if not args.skip_search:
        _run(
            [
                "suffix",
                "search",
                run,
                "--objective",
                args.objective,
                "--n-prompts",
                str(args.n_prompts),
                "--steps",
                str(args.steps),
                "--search-width",
                str(args.width),
                "--topk",
                str(args.topk),
                "--batch-size",
                str(args.width),
                "--n-tokens",
                str(args.n_tokens),
                "--target",
                args.target,
                "--max-minutes",
                str(args.minutes),
            ]
        )
    _run(
        [
            "suffix",
            "analyze",
            run,
            "--n-prompts",
            str(args.analysis_prompts),
            "--n-random",
            str(args.n_random),
            "--max-new-tokens",
            str(args.max_new_tokens),
        ]
    )
    out = args.run_dir / "suffix"
    report(json.loads((out / "search.json").read_text()), json.loads((out / "analysis.json").read_text()))
    print(f"\n[bench] total {(time.perf_counter() - t0) / 60:.1f} min; artifacts in {out}")


if __name__ == "__main__":
    main()
