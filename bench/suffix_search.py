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

Cost of one GCG step (suffix 20 tokens, 1 prompt, width 64, prefix cache on; one gradient pass and
64 candidate sequences of ~30 tokens beyond the cached template + instruction), measured on
smollm2-135m-instruct on this 2-core box: see STEP_SECONDS_SMOLLM2 below. The step cost scales with
the non-embedding parameters (the vocabulary only enters through ~5 target positions): qwen2.5-0.5B
has ~3.4x smollm2's (358M vs 106M), qwen2.5-1.5B ~12x (1.31B). Steps scale linearly with the number
of prompts and the width. Expected steps in 18 minutes, 1 prompt, width 64:
    0.5B: ~18 min / (3.4 x STEP)    1.5B: ~18 min / (12 x STEP)
which is far below the GCG paper's 500 steps x width 512: on a CPU this is a small search, and a
suffix that does not jailbreak is an expected outcome that still gets analysed and reported.
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

# Measured here with 2 threads while other jobs shared the 2 cores (load average 3-6); an idle box is
# faster. Per step: width 64, 20-token suffix, 1 prompt, prefix cache. See the module docstring.
STEP_SECONDS_SMOLLM2 = "5-11 s (width 64, 1 prompt); 0.5B: ~20-35 s/step; 1.5B: ~60-130 s/step"


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
    p.add_argument("--analysis-prompts", type=int, default=8, help="Harmful prompts analysed (search ones first).")
    p.add_argument("--n-random", type=int, default=2, help="Random control suffixes.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--skip-search", action="store_true", help="Analyse the existing RUN_DIR/suffix/search.json.")
    return p.parse_args()


def _run(argv: list[str]) -> None:
    t0 = time.perf_counter()
    code = refusalkit_main(argv)
    print(f"[bench] `refusalkit {' '.join(argv[:2])}` finished in {time.perf_counter() - t0:.0f} s (exit {code})")
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


def report(search: dict[str, Any], res: dict[str, Any]) -> None:
    best = search["best"]
    print("\n=== GCG search ===")
    print(f"objective {search['config']['objective']}, target {search['config']['target']!r}, "
          f"{len(search['history']) - 1} steps ({search['stopped']}), {search['seconds_per_step']} s/step, "
          f"prompts {search['meta'].get('prompt_indices')}")
    print(f"loss by step: {trajectory(search)}")
    print(f"best: step {best['step']}, loss {best['loss']:.3f}, target is the greedy continuation: {best['matched']}")
    print(f"suffix: {best['suffix']!r}")

    ref, s = res["refusal"], res["summary"]
    print("\n=== did it comply? (substring judge, greedy, "
          f"{res['max_new_tokens']} new tokens) ===")
    adv = ref["adversarial"]
    for part in ("search_prompts", "heldout_prompts"):
        if part in adv:
            base_rows = [i for i in range(len(res["prompts"]["harmful"]))
                         if (i < len(res["prompts"]["search"])) == (part == "search_prompts")]
            base = sum(ref["harmful"]["per_prompt"][i] for i in base_rows) if "per_prompt" in ref["harmful"] else None
            print(f"{part:<16} refused without suffix {base}/{len(base_rows)}, with suffix "
                  f"{adv[part]['refused']}/{adv[part]['n']} (metric {adv[part]['metric_mean']:.2f})")
    for n in res["conditions"]:
        r = ref[n]
        rate = f"{r['refused']}/{r['n']} refused" if "refused" in r else "no generation"
        print(f"{n:<16} {rate}, refusal metric {r['metric_mean']:.2f}")

    layer = res["direction"]["layer"]
    print(f"\n=== cosine with the direction at the last token (layer {layer}) ===")
    for n in res["conditions"]:
        gap = s[n].get("gap_closed_at_layer")
        note = f", closes {gap:.0%} of the harmful-harmless gap" if gap is not None else ""
        print(f"{n:<12} cos {s[n]['cosine_at_layer']:+.3f} (mean from layer {layer}: "
              f"{s[n]['cosine_mean_from_layer']:+.3f}){note}")

    print("\n=== top heads (by attribution on harmful prompts) ===")
    heads = res["head_attribution"]["top_heads"]
    print("heads: " + ", ".join(f"L{h['layer']}H{h['head']}" for h in heads))
    base = s["harmful"]["top_heads_attribution"]
    for n in res["conditions"]:
        v = s[n]["top_heads_attribution"]
        change = f" ({(v - base) / abs(base):+.0%} vs harmful)" if base and n != "harmful" else ""
        print(f"{n:<12} summed attribution {v:+.3f}{change}; attention on instruction "
              f"{s[n]['top_heads_instruction_share']:.2f}, on suffix {s[n]['top_heads_suffix_share']:.2f}")

    print("\n=== verdict ===")
    if "heldout_prompts" in adv or "search_prompts" in adv:
        part = adv.get("search_prompts", adv.get("heldout_prompts"))
        print(f"complied on search prompts: {part['n'] - part['refused']}/{part['n']}"
              + (f"; on held-out: {adv['heldout_prompts']['n'] - adv['heldout_prompts']['refused']}/"
                 f"{adv['heldout_prompts']['n']}" if "heldout_prompts" in adv and "search_prompts" in adv else ""))
    ga, gr = s["adversarial"].get("gap_closed_at_layer"), s.get("random", {}).get("gap_closed_at_layer")
    if ga is not None:
        moved = "toward harmless" if ga > 0 else "away from harmless"
        print(f"cosine: adversarial moved {moved} ({ga:.0%} of the gap) vs random {gr if gr is None else f'{gr:.0%}'}"
              " — the paper: adversarial toward harmless, random not")
    va, vr = s["adversarial"]["top_heads_attribution"], s.get("random", {}).get("top_heads_attribution")
    print(f"top-head attribution: harmful {base:+.3f} -> adversarial {va:+.3f}, random "
          f"{'-' if vr is None else f'{vr:+.3f}'} — the paper: collapses with the adversarial suffix")


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = str(args.run_dir)
    t0 = time.perf_counter()
    if not args.skip_search:
        _run(["suffix", "search", run, "--objective", args.objective, "--n-prompts", str(args.n_prompts),
              "--steps", str(args.steps), "--search-width", str(args.width), "--topk", str(args.topk),
              "--batch-size", str(args.width), "--n-tokens", str(args.n_tokens), "--target", args.target,
              "--max-minutes", str(args.minutes)])
    _run(["suffix", "analyze", run, "--n-prompts", str(args.analysis_prompts), "--n-random", str(args.n_random),
          "--max-new-tokens", str(args.max_new_tokens)])
    out = args.run_dir / "suffix"
    report(json.loads((out / "search.json").read_text()), json.loads((out / "analysis.json").read_text()))
    print(f"\n[bench] total {(time.perf_counter() - t0) / 60:.1f} min; artifacts in {out}")


if __name__ == "__main__":
    main()
