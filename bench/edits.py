"""Benchmark the reversible-edit core (refusalkit.edits) on a built-in model; prints numbers, asserts nothing.

Measures, in one process:
  - seconds to enter and to leave ``orthogonalized`` (the paper's edit: embedding + every output
    projection; the save copy included), median of --reps;
  - the largest difference of the edited embedding from a float64 edit of the same rows (in units of
    float32 rounding of the embedding's largest entry), on --rows rows spread over the vocabulary;
  - that leaving restores the weights bit for bit;
  - peak resident memory.
With --dtype bfloat16 the model is loaded in bfloat16 (the edit computes in float32, rounds once).

Usage: python bench/edits.py [--model NAME] [--dtype float32|bfloat16] [--reps 3] [--run runs/default]
(--run takes the run's selected direction; without it a seeded random direction is used)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from refusalkit.models import DEFAULT_MODEL, load_model
from refusalkit.orthogonalize import orthogonalized, targets


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def direction_of(run: str | None, d_model: int) -> torch.Tensor:
    if run is None:
        return torch.randn(d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from refusalkit.layout import RunLayout
    from refusalkit.stages import select

    return select.load(RunLayout(run)).vector.double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--run", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype, device="cpu")
    print(f"load {time.perf_counter() - t0:.1f} s, {args.dtype}, threads {torch.get_num_threads()}")
    emb = lm.arch.embed.weight
    direction = direction_of(args.run, emb.shape[1])
    u = direction / direction.norm()
    pick = torch.linspace(0, emb.shape[0] - 1, args.rows).long()
    before = emb[pick].detach().double()
    want = (before - (before @ u)[:, None] * u[None, :]).to(emb.dtype).double()
    edited = list({id(p): p for t in targets(lm.arch, direction) for p in t.parameters()}.values())
    saved = [p.detach().clone() for p in edited]  # the edited tensors only (a full copy is 6 GiB)

    enter, leave = [], []
    for rep in range(args.reps):
        ctx = orthogonalized(lm, direction)
        t0 = time.perf_counter()
        ctx.__enter__()
        enter.append(time.perf_counter() - t0)
        if rep == 0:
            got = lm.arch.embed.weight[pick].detach().double()
            unit32 = 2.0**-24 * float(before.abs().max())
            print(
                f"embedding vs float64 edit: max {float((got - want).abs().max()) / unit32:.2f} x 2^-24 max|E|"
            )
        t0 = time.perf_counter()
        ctx.__exit__(None, None, None)
        leave.append(time.perf_counter() - t0)
    same = all(torch.equal(p, q) for p, q in zip(edited, saved, strict=True))
    print(f"enter {statistics.median(enter):.2f} s (all {', '.join(f'{t:.2f}' for t in enter)})")
    print(f"leave {statistics.median(leave):.2f} s; restored bit for bit: {same}")
    print(f"peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
