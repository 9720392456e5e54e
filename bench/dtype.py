"""float32 against bfloat16 on one machine, in one sitting; prints numbers, asserts nothing.

--quick (about 5 minutes on the default model, 2-core CPU): the CPU probe's matrix products at a few row
counts; one forward pass over N harmless prompts (last-token logits, as selection and the KL run them)
and a short greedy generation, in each dtype; first-token KL(float32 || bfloat16) (mean, median, max),
top-token agreement, equal completions, load time and peak resident memory of each load (each dtype in
its own process, so the peaks do not mix).

Default (a full run per dtype, as many minutes as two default runs): `refusalkit run` in each dtype
into OUT/float32 and OUT/bfloat16 (fresh folders), then per stage the time ratio, and the differences:
the selected direction (both candidates' scores when they differ), candidate scores, refusal counts per
judge and setting, KL mean/median/max per setting, peak memory. With --vs-heretic, bench/vs_heretic.py
runs in each dtype too (its wall time and its front).

Usage: python bench/dtype.py --quick [--model NAME] [--n 64] [--gen-n 32] [--gen-tokens 16]
       python bench/dtype.py [--out runs/dtype] [--vs-heretic] [-- extra `refusalkit run` flags]
Runs a real model: take the heavy-compute lock (flock /tmp/rk-heavy.lock ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16")
HERE = Path(__file__).resolve().parent


def child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, float, float, str]:
    """Run ``cmd``; (exit code, wall seconds, its peak resident memory in GiB, its stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 2**20, out


# ---- --quick: one pass and a short generation per dtype, each in its own process -------------------


def quick_one(
    model: str, dtype: str, n: int, batch_size: int, gen_n: int, gen_tokens: int, out: Path
) -> None:
    """(In a child process.) Logits of N harmless prompts and greedy completions in ``dtype``, saved."""
    import torch

    from refusalkit.activations import logits_for_prompts
    from refusalkit.data import load_instructions, sample
    from refusalkit.generation import generate_ids
    from refusalkit.models.loading import load_model
    from refusalkit.prompts import format_prompts

    t0 = time.perf_counter()
    lm = load_model(model, dtype=dtype)
    load_s = time.perf_counter() - t0
    prompts = format_prompts(lm.tokenizer, sample(load_instructions("builtin:harmless").instructions, n, 0))
    logits_for_prompts(lm, prompts[:2], batch_size)  # warm-up (kernel choice, packing)
    t0 = time.perf_counter()
    logits = logits_for_prompts(lm, prompts, batch_size)
    pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = generate_ids(lm, prompts[:gen_n], max_new_tokens=gen_tokens, batch_size=256)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    torch.save({"logits": logits, "ids": ids}, out / f"{dtype}.pt")
    info = {
        "load_s": load_s,
        "pass_s": pass_s,
        "gen_s": gen_s,
        "tokens": tokens,
        "new_tokens": sum(map(len, ids)),
    }
    (out / f"{dtype}.json").write_text(json.dumps(info))


def quick(args: argparse.Namespace) -> None:
    import torch

    from refusalkit.metric import kl_div
    from refusalkit.models.compute_dtype import cpu_identity, mlp_shape, probe_cpu
    from refusalkit.models.loading import model_config

    ident = cpu_identity()
    print(
        f"CPU {ident['cpu']}, bf16 flags {ident['bf16_flags'] or 'none'}, torch {ident['torch']}, threads {ident['threads']}"
    )
    shape = mlp_shape(model_config(args.model))
    print(
        f"matrix products [rows x {shape[0]}] x [{shape[0]} x {shape[1]}] (the model's MLP), best of ~1 s each:"
    )
    for rows in (32, 128, 512):
        p = probe_cpu(shape, rows=rows)
        print(f"  {rows:>4} rows: float32 {p['float32_gflops']:7.1f} GFLOP/s, bfloat16 {p['bfloat16_gflops']:7.1f}  "
              f"-> bfloat16 {p['speedup']:.2f}x")  # fmt: skip
    work = Path(args.out) / "quick"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    peaks = {}
    for dtype in DTYPES:
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); from dtype import quick_one; from pathlib import Path; "
            "quick_one(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:8]), Path(sys.argv[8]))"
        )
        cmd = [sys.executable, "-c", code, str(HERE), args.model, dtype, str(args.n), str(args.batch_size),
               str(args.gen_n), str(args.gen_tokens), str(work)]  # fmt: skip
        rc, _, peaks[dtype], _ = child(cmd)
        if rc:
            sys.exit(f"the {dtype} pass failed (exit {rc})")
    info = {d: json.loads((work / f"{d}.json").read_text()) for d in DTYPES}
    res = {d: torch.load(work / f"{d}.pt") for d in DTYPES}
    f32, b16 = (info[d] for d in DTYPES)
    print(f"\n{'':<34}{'float32':>10}{'bfloat16':>10}{'ratio':>8}")
    rows = [
        ("load (s; bf16's first writes its copy)", "load_s"),
        (f"forward pass, {args.n} prompts (s)", "pass_s"),
        (f"generation, {args.gen_n} x {args.gen_tokens} tokens (s)", "gen_s"),
    ]
    for label, key in rows:
        print(f"{label:<34}{f32[key]:>10.2f}{b16[key]:>10.2f}{b16[key] / f32[key]:>8.2f}")
    print(f"{'peak resident memory (GiB)':<34}{peaks['float32']:>10.2f}{peaks['bfloat16']:>10.2f}"
          f"{peaks['bfloat16'] / peaks['float32']:>8.2f}")  # fmt: skip
    print(f"forward tokens: {f32['tokens']} ({f32['tokens'] / f32['pass_s']:.0f} tok/s float32, "
          f"{b16['tokens'] / b16['pass_s']:.0f} bfloat16)")  # fmt: skip
    kl = kl_div(res["float32"]["logits"], res["bfloat16"]["logits"])
    same_top = (res["float32"]["logits"].argmax(-1) == res["bfloat16"]["logits"].argmax(-1)).sum()
    print(f"first-token KL(float32 || bfloat16) over {len(kl)} prompts: mean {float(kl.mean()):.5f}, "
          f"median {float(kl.median()):.5f}, max {float(kl.max()):.5f}; same top token {int(same_top)}/{len(kl)}")  # fmt: skip
    same = sum(a == b for a, b in zip(res["float32"]["ids"], res["bfloat16"]["ids"], strict=True))
    print(f"greedy completions equal in both dtypes: {same}/{args.gen_n}")


# ---- full runs ------------------------------------------------------------------------------------


def read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def scores_by_candidate(run: Path) -> dict[tuple[int, int], dict[str, float]]:
    data = read(run / "select" / "candidate_scores.json") or {}
    return {(s["position"], s["layer"]): s for s in data.get("scores", [])}


def compare_scores(a: dict[Any, dict[str, float]], b: dict[Any, dict[str, float]]) -> None:
    for key in ("bypass", "induce", "kl"):
        pairs = [(a[c][key], b[c][key]) for c in a.keys() & b.keys()]
        pairs = [(x, y) for x, y in pairs if isinstance(x, float) and isinstance(y, float)]
        pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
        if not pairs:
            print(f"  {key:<7} no candidate scored in both runs")
            continue
        diffs = [abs(x - y) for x, y in pairs]
        spread = max(abs(x) for x, _ in pairs) or 1.0
        print(f"  {key:<7} {len(pairs):>4} candidates scored in both: max |diff| {max(diffs):.4f} "
              f"(largest |score| {spread:.3f}), mean |diff| {sum(diffs) / len(diffs):.4f}")  # fmt: skip


def judge_counts(run: Path) -> dict[str, str]:
    """'set/setting/judge' -> 'k/n' from the measure stage's refusal judges."""
    out = {}
    rates = (read(run / "measure" / "refusal_judges.json") or {}).get("rates", {})
    for prompt_set, settings in rates.items():
        for setting, judges in settings.items():
            for judge, r in judges.items():
                if isinstance(r, dict) and "k" in r:
                    out[f"{prompt_set}/{setting}/{judge}"] = f"{r['k']}/{r['n']}"
    return out


def kl_text(r: dict[str, float]) -> str:
    return " / ".join(f"{r.get(m, float('nan')):.4f}" for m in ("mean", "median", "max"))


def full(args: argparse.Namespace, extra: list[str]) -> None:
    out = Path(args.out)
    runs, wall, peak = {}, {}, {}
    for dtype in DTYPES:
        runs[dtype] = out / dtype
        shutil.rmtree(runs[dtype], ignore_errors=True)
        cmd = [sys.executable, "-c", "import sys; from refusalkit.cli import main; sys.exit(main(sys.argv[1:]))",
               "run", "--out", str(runs[dtype]), "--dtype", dtype, *(["--model", args.model] if args.model else []),
               *extra]  # fmt: skip
        print(f"[dtype] {' '.join(cmd[3:])}", flush=True)
        rc, wall[dtype], peak[dtype], _ = child(cmd)
        if rc:
            sys.exit(f"the {dtype} run failed (exit {rc})")
    man = {d: read(runs[d] / "manifest.json") for d in DTYPES}
    print(f"\n{'stage':<12}{'float32 s':>11}{'bfloat16 s':>12}{'ratio':>8}")
    for stage in man["float32"]["stages"]:
        a = man["float32"]["stages"][stage].get("seconds")
        b = man["bfloat16"]["stages"].get(stage, {}).get("seconds")
        if a and b:
            print(f"{stage:<12}{a:>11.1f}{b:>12.1f}{b / a:>8.2f}")
    print(
        f"{'whole run':<12}{wall['float32']:>11.1f}{wall['bfloat16']:>12.1f}{wall['bfloat16'] / wall['float32']:>8.2f}"
    )
    print(
        f"{'peak GiB':<12}{peak['float32']:>11.2f}{peak['bfloat16']:>12.2f}{peak['bfloat16'] / peak['float32']:>8.2f}"
    )
    print(f"bfloat16 chosen by: {man['bfloat16'].get('compute_dtype')}")
    direction = {d: read(runs[d] / "select" / "direction.json") for d in DTYPES}
    picks = {d: (direction[d]["position"], direction[d]["layer"]) for d in DTYPES}
    scores = {d: scores_by_candidate(runs[d]) for d in DTYPES}
    print(f"\nselected direction (position, layer): float32 {picks['float32']}, bfloat16 {picks['bfloat16']}")
    if picks["float32"] != picks["bfloat16"]:
        for cand in picks.values():
            for d in DTYPES:
                s = scores[d].get(cand, {})
                print(f"  candidate {cand} in {d}: bypass {s.get('bypass')}, induce {s.get('induce')}, "
                      f"KL {s.get('kl')}, kept {s.get('kept')} {s.get('reason', '')}")  # fmt: skip
    else:
        cos = None
        try:
            from safetensors.torch import load_file

            va, vb = (load_file(runs[d] / "select" / "direction.safetensors") for d in DTYPES)
            ta, tb = next(iter(va.values())).double(), next(iter(vb.values())).double()
            cos = float(ta @ tb / (ta.norm() * tb.norm()))
        except (OSError, StopIteration, RuntimeError):
            pass
        print(f"  same candidate; cosine of the two directions {cos}")
    print("candidate scores, bfloat16 against float32:")
    compare_scores(scores["float32"], scores["bfloat16"])
    for d in DTYPES:
        reuse = (read(runs[d] / "evaluate" / "refusal_rates.json") or {}).get("orthogonalized_reuse")
        print(f"orthogonalized reuses the ablation's completions ({d}): {reuse}")
    counts = {d: judge_counts(runs[d]) for d in DTYPES}
    print("\nrefusals per judge (k/n), float32 -> bfloat16:")
    for key in sorted(counts["float32"]):
        print(f"  {key:<40}{counts['float32'][key]:>8} -> {counts['bfloat16'].get(key, '-')}")
    coh = {d: (read(runs[d] / "measure" / "coherence.json") or {}).get("kl", {}) for d in DTYPES}
    print("\nfirst-token KL vs the unedited model (mean / median / max), float32 -> bfloat16:")
    for setting in coh["float32"]:
        a, b = coh["float32"][setting], coh["bfloat16"].get(setting, {})
        print(f"  {setting:<16}{kl_text(a)}  ->  {kl_text(b)}")
    if args.vs_heretic:
        vs_heretic(out, args.vs_heretic_args)


def vs_heretic(out: Path, passthrough: str) -> None:
    """bench/vs_heretic.py once per dtype (REFUSALKIT_DTYPE sets it); its wall time and its tables."""
    wall = {}
    for dtype in DTYPES:
        cmd = [sys.executable, str(HERE / "vs_heretic.py"), "--out", str(out / f"vs-heretic-{dtype}"),
               *passthrough.split()]  # fmt: skip
        rc, wall[dtype], peak, text = child(cmd, env={"REFUSALKIT_DTYPE": dtype})
        print(f"\n==== vs_heretic in {dtype} (exit {rc}, {wall[dtype] / 60:.1f} min, peak {peak:.2f} GiB)")
        print(text[text.find("\nmodel ") :] if "\nmodel " in text else text[-4000:])
    print(f"vs_heretic wall time bfloat16 / float32: {wall['bfloat16'] / wall['float32']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one pass and a short generation per dtype")
    ap.add_argument("--model", default=None, help="model (default: the project's default model)")
    ap.add_argument("--out", default="runs/dtype", help="folder for the runs (replaced)")
    ap.add_argument("--n", type=int, default=64, help="--quick: harmless prompts in the forward pass")
    ap.add_argument("--batch-size", type=int, default=32, help="--quick: prompts per forward pass")
    ap.add_argument("--gen-n", type=int, default=32, help="--quick: prompts generated for")
    ap.add_argument("--gen-tokens", type=int, default=16, help="--quick: new tokens per completion")
    ap.add_argument("--vs-heretic", action="store_true", help="also run bench/vs_heretic.py in each dtype")
    ap.add_argument("--vs-heretic-args", default="", help="flags for bench/vs_heretic.py, e.g. '--minutes 7'")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    if args.quick:
        from refusalkit.models.registry import DEFAULT_MODEL

        args.model = args.model or DEFAULT_MODEL
        quick(args)
    else:
        full(args, extra)


if __name__ == "__main__":
    main()
