"""Calibration on a finished run, issue 19's table: base, the paper's ablation, and the false-refusal
vector at each lambda (default 0, 0.5, 1), on held-out prompts.

It runs `refusalkit calibrate RUN_DIR --lambda A` (A: --active-lambda, default 1; in this process, the
model loaded once; resumable), which picks the vector's (layer, position) under the KL limit and the
harmful-refusal floor, then sweeps lambda at that place (the paper's use of lambda: one vector, more or
less of its refusal-direction component removed; a lambda of 0 may well fail the floor, which is what the
sweep shows), adds the calibration search's choice (`refusalkit optimize RUN_DIR --goal calibrate`,
calibrate/search/chosen.*) when there is one, and measures every edit on:
  - harmful refusal: JailbreakBench's 100 behaviours (DATA_DIR/refusal_direction/processed/jailbreakbench.json);
  - over-refusal: OR-Bench-Hard test (132) and OKTest val (60) (DATA_DIR/over_refusal/);
  - harmless refusal: the run's harmless_test split;
  - first-token KL(original || edited) on 100 harmless prompts (DATA_DIR/refusal_direction/splits/
    harmless_test.json, else the run's harmless_test split): mean, median, max.
Refusals are greedy completions of --max-new-tokens judged by the paper's phrases and the broad list
(calibrate/rates.py, as the over_refusal measurement). Writes RUN_DIR/calibrate/bench.json (one row per
edit, resumed by its settings), RUN_DIR/calibrate/lambda_sweep.png (over-refusal and harmful refusal
against lambda), prints the table as markdown; `refusalkit report RUN_DIR` shows both.

Usage: python bench/calibrate.py RUN_DIR [--lambdas 0,0.5,1] [--active-lambda 1] [--max-new-tokens 64]
       [--kl-n 100] [--n-train 256] [--n-val 16] [--floor 0.9] [--kl-max 0.05] [--data-dir DIR]
The bench leaves `--edit calibrate` naming what it named before (its own calibrate call measures, it
does not re-point the run's calibration). Runs the real model of the run: take the heavy-compute lock (flock /tmp/rk-heavy.lock ...).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from refusalkit.calibrate import data as ordata
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout

JBB = ("refusal_direction", "processed", "jailbreakbench.json")
KL_POOL = ("refusal_direction", "splits", "harmless_test.json")


def lambdas(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; each in [0, 1]."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RefusalkitError(
            f"--lambdas {text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.5,1"
        ) from None
    if not out or any(not 0.0 <= x <= 1.0 for x in out):
        raise RefusalkitError(f"--lambdas {text!r}: give comma-separated numbers in [0, 1], e.g. 0,0.5,1")
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="A finished run folder (select done).")
    ap.add_argument(
        "--lambdas", type=lambdas, default=[0.0, 0.5, 1.0], help="Lambdas to calibrate and compare."
    )
    ap.add_argument(
        "--active-lambda", type=float, default=1.0, help="The calibration left active (--edit calibrate)."
    )
    ap.add_argument("--max-new-tokens", type=int, default=64, help="New tokens per judged completion.")
    ap.add_argument("--kl-n", type=int, default=100, help="Harmless prompts for first-token KL.")
    ap.add_argument("--n-train", type=int, default=256, help="calibrate --n-train.")
    ap.add_argument("--n-val", type=int, default=16, help="calibrate --n-val.")
    ap.add_argument("--floor", type=float, default=0.9, help="calibrate --floor.")
    ap.add_argument("--kl-max", type=float, default=0.05, help="calibrate --kl-max.")
    ap.add_argument("--data-dir", type=Path, default=None, help="Data folder (default: the run's).")
    args = ap.parse_args(argv)
    if not 0.0 <= args.active_lambda <= 1.0:
        raise RefusalkitError(f"--active-lambda {args.active_lambda:g}: give a number in [0, 1]")
    return args


def check(args: argparse.Namespace) -> tuple[RunLayout, Path]:
    """Every input present, before any model loads: the run's direction and splits, the data files."""
    from refusalkit.run import RunFolder

    layout = RunLayout(args.run_dir)
    folder = RunFolder(layout)
    settings = folder.settings()  # a folder no run wrote says so first
    folder.direction(), folder.splits()  # the run reader's own errors name the command that makes them
    root = Path(args.data_dir or settings.data_dir)
    ordata.require(root, [*ordata.TRAIN_SETS, ordata.VAL_SET, *ordata.TEST_SETS], "bench/calibrate.py")
    if not root.joinpath(*JBB).is_file():
        raise RefusalkitError(
            f"{root.joinpath(*JBB)} is missing; pass --data-dir DIR holding {'/'.join(JBB)}"
        )
    return layout, root


def _row(
    lm: Any,
    name: str,
    sets: dict[str, list[str]],
    kl_prompts: list[str],
    base_kl: Any,
    edit: Any,
    s: Any,
    n_tokens: int,
) -> dict[str, Any]:
    from refusalkit.activations import logits_for_prompts
    from refusalkit.calibrate.rates import judged_rates
    from refusalkit.evaluation.coherence import kl_stats
    from refusalkit.metric import kl_div

    rates = judged_rates(lm, sets, edit=edit, system=s.system_prompt, max_new_tokens=n_tokens,
                         batch_size=s.gen_batch_size, desc=name, rows=False)  # fmt: skip
    if edit is None:
        kl = {"mean": 0.0, "median": 0.0, "max": 0.0}
    else:
        with edit():
            logits = logits_for_prompts(lm, kl_prompts, s.batch_size)
        kl = {k: v for k, v in kl_stats(kl_div(base_kl, logits)).items() if k != "per_prompt"}
    return {"edit": name, **{k: v["rates"]["paper"] for k, v in rates.items()},
            "broad": {k: v["rates"]["broad"] for k, v in rates.items()}, "kl": kl}  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    def r(x: Any) -> str:
        return f"{x['rate']:.2f} ({x['k']}/{x['n']})" if x and x.get("rate") is not None else "-"

    out = [
        "| edit | harmful refusal (JailbreakBench 100) | over-refusal OR-Bench-Hard test | over-refusal OKTest val "
        "| harmless refusal | KL mean / median / max |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        kl = row["kl"]
        out.append(
            f"| {row['edit']} | {r(row['harmful'])} | {r(row['or_bench_hard_test'])} | {r(row['oktest_val'])} "
            f"| {r(row['harmless'])} | {kl['mean']:.4f} / {kl['median']:.4f} / {kl['max']:.3f} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], lams: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {row["edit"]: row for row in rows}
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for key, label, c in (("or_bench_hard_test", "over-refusal, OR-Bench-Hard test", "#c2410c"),
                          ("oktest_val", "over-refusal, OKTest val", "#f59e0b"),
                          ("harmful", "harmful refusal, JailbreakBench", "#0369a1")):  # fmt: skip
        ys = [by[f"calibration lambda {x:g}"][key]["rate"] for x in lams]
        ax.plot(lams, ys, "o-", c=c, label=label)
        ax.axhline(by["base"][key]["rate"], c=c, ls=":", lw=1)
    ax.set_xlabel("lambda (share of the refusal direction removed from the vector)")
    ax.set_ylabel("refusal rate (paper phrases); dotted: unedited")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    layout, root = check(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from refusalkit.calibrate.options import CalibrateOptions
    from refusalkit.calibrate.run import calibrate, vector_at
    from refusalkit.calibrate.vector import edit_factory
    from refusalkit.data import load_instructions
    from refusalkit.manifest import fingerprint
    from refusalkit.models.loading import load_model
    from refusalkit.prompts import format_prompts
    from refusalkit.run import RunFolder
    from refusalkit.utils import read_json, write_json

    folder = RunFolder(layout)
    s, splits, direction = folder.settings(), folder.splits(), folder.direction()
    lm = load_model(s.model, **s.model_kwargs())
    opts = {"n_train": args.n_train, "n_val": args.n_val, "floor": args.floor, "kl_max": args.kl_max,
            "data_dir": str(root)}  # fmt: skip
    print(f"$ refusalkit calibrate {layout.root} --lambda {args.active_lambda:g} ...")
    before = read_json(layout.calibrated) if layout.calibrated.is_file() else None
    chosen = calibrate(layout, CalibrateOptions(lam=args.active_lambda, **opts), lm=lm)
    if before is not None:  # the bench measures; `--edit calibrate` stays what it was
        write_json(layout.calibrated, before)
    sets = {
        "harmful": load_instructions(str(root.joinpath(*JBB))).instructions[:100],
        "or_bench_hard_test": ordata.load(root, "or_bench_hard_test"),
        "oktest_val": ordata.load(root, "oktest_val"),
        "harmless": splits["harmless_test"],
    }
    pool = root.joinpath(*KL_POOL)
    kl_src = load_instructions(str(pool)).instructions if pool.is_file() else splits["harmless_test"]
    kl_prompts = format_prompts(lm.tokenizer, kl_src[: args.kl_n], s.system_prompt)
    from refusalkit.activations import logits_for_prompts

    base_kl = logits_for_prompts(lm, kl_prompts, s.batch_size)
    edits: dict[str, Any] = {"base": None, "ablation (paper's direction)": edit_factory(lm, direction.vector)}
    for lam in args.lambdas:
        vec = vector_at(layout, chosen["layer"], chosen["position"], lam)
        edits[f"calibration lambda {lam:g}"] = (edit_factory(lm, vec), [chosen["fingerprint"], lam])
    searched = layout.calibrate_chosen.with_suffix(".safetensors")
    if searched.is_file():  # `optimize --goal calibrate`'s choice, as `--edit calibrate` applies it
        from refusalkit.calibrate.edit import applied
        from refusalkit.directions import Direction
        from refusalkit.utils import sha256_file

        pick = Direction.load(layout.calibrate_chosen)
        edits["calibration by the search"] = (lambda: applied(lm, pick), [sha256_file(searched)])
    out_path = layout.calibrate_dir / "bench.json"
    saved = read_json(out_path) if out_path.is_file() else {}
    done = {r["edit"]: r for r in saved.get("rows", [])}
    for name, spec in edits.items():
        edit, vec_fp = spec if isinstance(spec, tuple) else (spec, None)
        fp = fingerprint({
            "sets": {k: len(v) for k, v in sets.items()}, "tokens": args.max_new_tokens, "kl_n": len(kl_prompts),
            "vector": vec_fp, "select": folder.manifest.fingerprint_of("select"),
        })  # fmt: skip
        if done.get(name, {}).get("fingerprint") != fp:  # resumable: a finished row is kept
            done[name] = {
                **_row(lm, name, sets, kl_prompts, base_kl, edit, s, args.max_new_tokens),
                "fingerprint": fp,
            }
            write_json(out_path, {"rows": list(done.values())})
    rows = [done[name] for name in edits]
    write_json(out_path, {"rows": rows, "max_new_tokens": args.max_new_tokens, "kl_n": len(kl_prompts)})
    plot(rows, args.lambdas, layout.calibrate_dir / "lambda_sweep.png")
    print(
        f"the vector: layer {chosen['layer']}, position {chosen['position']} (picked at lambda {args.active_lambda:g})"
    )
    print(markdown(rows))
    print(f"\n{out_path}\n{layout.calibrate_dir / 'lambda_sweep.png'}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except RefusalkitError as exc:
        raise SystemExit(f"error: {exc}") from None
