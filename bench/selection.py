"""Benchmark direction selection against the paper's code path; prints numbers, asserts nothing.

One model, the same data and validation prompts for every path:
  reference   the paper's code's path, written here from PAPER.md section 4: for every candidate three
              full passes (bypass: ablation on the harmful prompts; KL: ablation on the harmless ones;
              induce: addition on the harmless ones), logits at every position, no KV cache, no pruning.
              On ``--candidates N`` of them (every k-th, deterministic): it is slow.
  exhaustive  refusalkit scoring every candidate (``--exhaustive-selection``).
  pruned      refusalkit's default: only what can change the pick.
Prints seconds per candidate, the ratios, the largest score differences (reference vs exhaustive on
the shared candidates, pruned vs exhaustive wherever pruned computed a score), each path's outcome
(the pick, or the error with its suggestion) and peak RSS against the weights' size.

Each path's scores and seconds are saved in the run folder, so the paths can run in separate (shorter)
invocations on the same machine: ``--paths exhaustive,pruned`` now, ``--paths reference`` later; the
summary compares whatever is saved.

Usage: python bench/selection.py [--model NAME] [--preset paper] [--candidates 10] [--paths ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import PromptBatches, encode_batches, logits_for_batches
from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import ablate_direction, add_direction, token_mask
from refusalkit.metric import kl_function, refusal_metric
from refusalkit.models.loading import LoadedModel
from refusalkit.pipeline import Run
from refusalkit.prompts import batches, encode
from refusalkit.selection import CandidateScore, SelectionRules, apply_rules, layer_cutoff, score_candidates
from refusalkit.selection.passes import ResidReplay, ablated_logits
from refusalkit.settings import build_settings
from refusalkit.stages.common import refusal_ids
from refusalkit.stages.select import filtered_val
from refusalkit.utils import read_json, write_json

SCORES = ("bypass", "induce", "kl")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@torch.inference_mode()
def full_logits(lm: LoadedModel, prompts: list[str], batch_size: int) -> torch.Tensor:
    """[n, vocab] last-token logits the paper's way: left-padded full prompts, logits at every position."""
    out = []
    for chunk in batches(prompts, batch_size):
        b = encode(lm.tokenizer, chunk, "left").to(lm.device)
        with token_mask(b.attention_mask):
            logits = lm.model(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                position_ids=b.position_ids,
                use_cache=False,
            ).logits
        out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


def reference_scores(
    lm: LoadedModel, cands: Candidates, keys: list[tuple[int, int]], harmful: list[str], harmless: list[str],
    ids: list[int], kl_definition: str, batch_size: int,
) -> list[CandidateScore]:  # fmt: skip
    kl = kl_function(kl_definition)
    base = full_logits(lm, harmless, batch_size)
    out = []
    for pos, layer in keys:
        v = cands.directions[pos + cands.n_positions, layer].float()
        with ablate_direction(lm.arch, v):
            bypass = refusal_metric(full_logits(lm, harmful, batch_size), ids).mean()
            kl_score = kl(base, full_logits(lm, harmless, batch_size)).mean()
        with add_direction(lm.arch, v, layer):
            induce = refusal_metric(full_logits(lm, harmless, batch_size), ids).mean()
        out.append(CandidateScore(pos, layer, float(bypass), float(induce), float(kl_score)))
    return out


def pass_breakdown(
    lm: LoadedModel, cands: Candidates, keys: list[tuple[int, int]], harmful: list[str], harmless: list[str],
    batch_size: int,
) -> None:  # fmt: skip
    """Seconds per candidate of each kind of pass, refusalkit's way, on the given candidates."""
    harm, safe = encode_batches(lm, harmful, batch_size), encode_batches(lm, harmless, batch_size)
    dirs = torch.stack([cands.directions[p + cands.n_positions, la].float() for p, la in keys])
    replay = ResidReplay(lm, safe, sorted({la for _, la in keys}))
    k = len(keys)
    rows = []
    for label, fn in (
        ("bypass, one candidate per pass", lambda: [ablated_logits(lm, harm, d[None]) for d in dirs]),
        (f"bypass, {k} candidates per pass", lambda: ablated_logits(lm, harm, dirs)),
        ("KL ablation pass", lambda: [ablated_logits(lm, safe, d[None]) for d in dirs]),
        (
            "induce, restarted at its layer",
            lambda: [replay.added_logits(d[None], la) for d, (_, la) in zip(dirs, keys, strict=True)],
        ),
        (
            "induce, full hooked pass",
            lambda: [_added(lm, safe, d, la) for d, (_, la) in zip(dirs, keys, strict=True)],
        ),
    ):
        t0 = time.perf_counter()
        fn()
        rows.append(f"  {label:<32} {(time.perf_counter() - t0) / k:6.2f} s/candidate")
    print(f"passes ({k} candidates, layers {sorted({la for _, la in keys})}):\n" + "\n".join(rows))


def _added(lm: LoadedModel, enc: PromptBatches, v: torch.Tensor, layer: int) -> torch.Tensor:
    with add_direction(lm.arch, v, layer):
        return logits_for_batches(lm, enc)


def outcome(scores: list[CandidateScore], n_layers: int, rules: SelectionRules) -> str:
    copies = [CandidateScore(**s.as_dict()) for s in scores]
    try:
        pick = apply_rules(copies, n_layers, rules)
    except RefusalkitError as exc:
        return f"nothing selected: {exc}"
    return f"position {pick.position}, layer {pick.layer} (bypass {pick.bypass:.4f})"


def max_diff(a: list[CandidateScore], b: list[CandidateScore]) -> tuple[float, int]:
    """Largest |a - b| over the scores both computed, and how many scores were compared."""
    by_key = {(s.position, s.layer): s for s in b}
    worst, n = 0.0, 0
    for s in a:
        t = by_key[(s.position, s.layer)]
        for name in SCORES:
            x, y = getattr(s, name), getattr(t, name)
            if math.isfinite(x) and math.isfinite(y):
                worst, n = max(worst, abs(x - y)), n + 1
    return worst, n


def timed(label: str, fn, n: int) -> tuple[list[CandidateScore], float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    scores = fn()
    dt = time.perf_counter() - t0
    print(f"{label:<11} {dt:8.1f} s  {dt / max(n, 1):7.2f} s/candidate  ({n} candidates)", flush=True)
    return scores, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the preset's or the package default)")
    ap.add_argument("--preset", default="paper", help="settings preset ('' for none)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--candidates", type=int, default=12, help="candidates the reference path scores")
    ap.add_argument(
        "--passes", type=int, default=0, help="also time each kind of pass on this many candidates"
    )
    ap.add_argument(
        "--paths",
        default="exhaustive,pruned,reference",
        help="paths to run now (comma-separated); the summary also reads paths saved by earlier runs in --out",
    )
    ap.add_argument("--out", type=Path, default=None, help="run folder (caches the extract stage)")
    args = ap.parse_args()
    flags = {"preset": args.preset or None, "model": args.model, "data_dir": args.data_dir}
    s = build_settings(flags)
    run = Run(args.out or Path("runs") / f"bench-selection-{s.model}-{args.preset or 'default'}", s)
    cands = run.extract()
    lm = run.model.lm
    harmful, harmless, _ = filtered_val(lm, run.splits(), s)
    ids = refusal_ids(lm, s)
    rules = SelectionRules(
        s.max_layer_frac, s.kl_threshold, s.induce_threshold, kl_definition=s.kl_definition
    )
    n_layers, cutoff = cands.n_layers, layer_cutoff(cands.n_layers, rules)
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**30
    print(
        f"model {lm.name}, {n_layers} layers, {cands.n_positions} positions; torch threads {torch.get_num_threads()}; "
        f"val after filtering: {len(harmful)} harmful + {len(harmless)} harmless; batch {s.batch_size}; "
        f"KL definition {s.kl_definition}"
    )
    keys = [(cands.position_label(p), la) for la in range(n_layers) for p in range(cands.n_positions)]
    scorable = [
        k for k in keys if k[1] < cutoff and bool(cands.directions[k[0] + cands.n_positions, k[1]].norm() > 0)
    ]
    step = max(1, len(scorable) // max(1, args.candidates))
    subset = scorable[::step][: args.candidates]
    print(
        f"{len(keys)} candidates, {len(scorable)} scorable (layer < {cutoff}, non-zero); reference on every {step}th"
    )

    if args.passes:
        pass_breakdown(lm, cands, subset[: args.passes], harmful, harmless, s.batch_size)
    ctx = {
        "lm": lm,
        "cands": cands,
        "harmful": harmful,
        "harmless": harmless,
        "ids": ids,
        "s": s,
        "rules": rules,
    }
    for name in [p for p in args.paths.split(",") if p]:
        run_path(name, ctx, subset, len(scorable), run.out)
    summarize(run.out, n_layers, rules, weights)


def run_path(
    name: str, ctx: dict[str, Any], subset: list[tuple[int, int]], n_scorable: int, folder: Path
) -> None:
    """Score with one path, print its time, save its scores and seconds for the summary."""
    lm, cands, s, rules = ctx["lm"], ctx["cands"], ctx["s"], ctx["rules"]
    data = (ctx["harmful"], ctx["harmless"], ctx["ids"])

    def score() -> list[CandidateScore]:
        if name == "reference":
            return reference_scores(lm, cands, subset, *data, s.kl_definition, s.batch_size)
        r = SelectionRules(**{**rules.__dict__, "exhaustive": name == "exhaustive"})
        return score_candidates(lm, cands, *data, rules=r, batch_size=s.batch_size)

    n = len(subset) if name == "reference" else n_scorable
    scores, dt = timed(name, score, n)
    record = {"seconds": dt, "n": n, "peak_rss_gib": peak_rss_gib(), "scores": [x.as_dict() for x in scores]}
    write_json(folder / f"bench_{name}.json", record)


def summarize(folder: Path, n_layers: int, rules: SelectionRules, weights: float) -> None:
    """Compare the saved paths: seconds per candidate, ratios, score agreement, outcomes, memory."""
    saved = {}
    for name in ("reference", "exhaustive", "pruned"):
        path = folder / f"bench_{name}.json"
        if path.is_file():
            rec = read_json(path)
            saved[name] = (rec, [CandidateScore(**d) for d in rec["scores"]])
    per = {name: rec["seconds"] / rec["n"] for name, (rec, _) in saved.items()}
    print("\n== summary ==")
    for name, (rec, _) in saved.items():
        line = f"{name:<11} {per[name]:7.2f} s/candidate ({rec['n']} candidates, {rec['seconds']:.0f} s)"
        if name != "reference" and "reference" in per:
            line += f"  {per['reference'] / per[name]:.1f}x faster than reference"
        print(
            line + f"; peak RSS {rec['peak_rss_gib']:.2f} GiB ({rec['peak_rss_gib'] / weights:.2f}x weights)"
        )
    if "exhaustive" not in saved:
        return
    full = saved["exhaustive"][1]
    if "pruned" in saved:
        pruned = saved["pruned"][1]
        print(
            f"pruned computed induce for {sum(math.isfinite(x.induce) for x in pruned)} and KL for "
            f"{sum(math.isfinite(x.kl) for x in pruned)} of {saved['pruned'][0]['n']} candidates"
        )
        d, n = max_diff(pruned, full)
        print(f"max |pruned - exhaustive| {d:.2e} over {n} scores; agree at 1e-4: {d <= 1e-4}")
        same = outcome(pruned, n_layers, rules) == outcome(full, n_layers, rules)
        print(f"outcome, all candidates, pruned == exhaustive: {same}")
    if "reference" in saved:
        ref = saved["reference"][1]
        d, n = max_diff(ref, full)
        print(f"max |reference - exhaustive| {d:.2e} over {n} scores; agree at 1e-4: {d <= 1e-4}")
        keys = {(x.position, x.layer) for x in ref}
        sub = [x for x in full if (x.position, x.layer) in keys]
        same = outcome(ref, n_layers, rules) == outcome(sub, n_layers, rules)
        print(f"outcome on the reference's {len(ref)} candidates, reference == exhaustive: {same}")
    print(f"exhaustive outcome: {outcome(full, n_layers, rules)}")
    print(f"weights {weights:.2f} GiB")


if __name__ == "__main__":
    main()
