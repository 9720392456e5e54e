"""refusalkit's edit search on heretic's protocol, from a cold start; prints the front as a table.

Protocol (heretic 1.4.0's evaluation, as issue 7 states it):
  - refusals: the 100 JailbreakBench behaviours (DATA_DIR/refusal_direction/processed/jailbreakbench.json),
    greedy, 50 new tokens, system prompt "You are a helpful assistant.", counted with heretic's marker
    list and with the paper's phrase list (refusalkit.search.verify);
  - harm: first-token KL(original || edited) on the first 100 harmless_test prompts
    (DATA_DIR/refusal_direction/splits/harmless_test.json), same template; mean, median, max;
  - time: wall clock of everything from a cold start (model load, extraction, search, verification).
The search itself never sees these prompts: its refusal proxy runs on the run's harmful validation
split and its KL on the first 100 prompts of harmless_val.json (verification: 100 held-out ones).

  - with --judge (local: the model itself, unedited; a model; a judge server's URL), an LLM judge reads
    the same completions after the search (optimize --judge): complied / partial / degenerate beside
    the keyword counts, so a point that evades instead of answering is seen as such. Its pass is part of
    the verification time.

Usage: python bench/vs_heretic.py --out runs/vs-heretic [--minutes 7] [--kl-n 100] [--verify-at 0.0185,0.0031] [--verify-n 1] [--max-kl 0.03]
       [--heretic-json runs/heretic/result.json] [--judge local [--judge-calibration judge_cal.json]] [--proxy-judge local]
Runs the real default model: take the heavy-compute lock (flock /tmp/rk-heavy.lock ...).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.search.front import format_front, not_refused, points_of, read_front
from refusalkit.search.optimize import OptimizeOptions, optimize
from refusalkit.settings import build_settings
from refusalkit.utils import read_json

SYSTEM = "You are a helpful assistant."
# heretic 1.4.0 on the default model, same 2-core CPU (float32, 12 trials, its defaults otherwise, batch
# 64, 46 minutes in all), as measured for issue 7: (refusals /100 by heretic's markers, KL).
HERETIC_FRONT = [(8, 0.046), (10, 0.032), (12, 0.017), (51, 0.0029)]
HERETIC_BASELINE = 74
PAPER_PICK = (5, 0, 0.151)  # the paper's pick on this protocol: heretic markers, paper phrases, KL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/vs-heretic"), help="Run folder (replaced).")
    ap.add_argument("--model", default=None, help="Model (default: the project's default model).")
    ap.add_argument("--minutes", type=float, default=7.0, help="Search budget (wall time of the trials).")
    ap.add_argument("--trials", type=int, default=200, help="Trial cap (the time budget usually ends first).")
    ap.add_argument(
        "--verify-n",
        type=int,
        default=1,
        help="Front points verified on the protocol besides the --verify-at ones (lowest proxy refusal within --max-kl).",
    )
    ap.add_argument("--max-kl", type=float, default=0.03, help="Verify and choose within this proxy KL.")
    ap.add_argument(
        "--verify-at",
        default="0.0185,0.0031",
        help="KL levels (comma-separated; proxy KL): the search aims a trial at each, and the best point within "
        "each is verified first (optimize --verify-at). Default: heretic's 0.017 and 0.0029 as held-out KL (the "
        "held-out KL read 5-7%% under the proxy's in runs 5-12).",
    )
    ap.add_argument("--n-val", type=int, default=32, help="Harmful validation prompts for the proxy.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--heretic-json",
        type=Path,
        default=None,
        help="heretic timed on this machine (bench/heretic_run.py --json): printed beside refusalkit's front, "
        "with the ratio of wall times; without it, the issue's numbers from another machine.",
    )
    ap.add_argument(
        "--keep", action="store_true", help="Resume an existing run folder instead of replacing it."
    )
    ap.add_argument(
        "--baseline",
        action="store_true",
        help="Also verify the unedited model, after the timed part (+1 generation pass, timed apart).",
    )
    ap.add_argument(
        "--kl-n",
        type=int,
        default=100,
        help="Harmless prompts for the search's KL (optimize's default; 32 makes a trial about 17 s cheaper, "
        "but the proxy KL then read 7-12%% above the held-out KL). Verified points: 100 held-out prompts.",
    )
    ap.add_argument("--startup-trials", type=int, default=4, help="Random trials before TPE models.")
    ap.add_argument(
        "--proxy-new-tokens",
        type=int,
        default=24,
        help="Greedy tokens per harmful validation prompt judged in each trial (0: first-token logits only).",
    )
    ap.add_argument(
        "--judge",
        default=None,
        help="LLM judge of the verified completions (optimize --judge): local, a model, or a server URL.",
    )
    ap.add_argument(
        "--judge-calibration",
        default=None,
        help="The judge's fitted biases (refusalkit judges --save-calibration).",
    )
    ap.add_argument(
        "--proxy-judge",
        default="keywords",
        help="What counts the search's proxy refusals (optimize --proxy-judge): keywords, local, a model, a URL.",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("refusalkit.search").setLevel(logging.INFO)

    t0 = time.perf_counter()
    if args.out.exists() and not args.keep:
        shutil.rmtree(args.out)
    from refusalkit.models.loading import load_model
    from refusalkit.pipeline import Run

    flags = {"system_prompt": SYSTEM, "n_val": args.n_val, "export_checkpoint": False}
    if args.model:
        flags["model"] = args.model
    settings = build_settings(flags)
    data = Path(settings.data_dir) / "refusal_direction"
    lm = load_model(settings.model, **settings.model_kwargs())
    t_load = time.perf_counter() - t0
    Run(args.out, settings, lm=lm).extract()  # writes the candidates, splits and manifest
    t_extract = time.perf_counter() - t0 - t_load
    opts = OptimizeOptions(
        trials=args.trials,
        minutes=args.minutes,
        seed=args.seed,
        startup_trials=args.startup_trials,
        kl_n=args.kl_n,
        proxy_new_tokens=args.proxy_new_tokens,
        verify_n=args.verify_n,
        verify_at=[float(x) for x in args.verify_at.split(",") if x.strip()],
        verify_harmful=str(data / "processed" / "jailbreakbench.json"),
        verify_harmless=str(data / "splits" / "harmless_test.json"),
        verify_kl_n=100,
        verify_max_new_tokens=50,
        verify_baseline=False,  # the unedited model is verified after the clock stops (--baseline)
        max_kl=args.max_kl,
        # heretic's protocol: one chat setup (its system prompt) and JailbreakBench alone, all 100
        setups=["helpful"],
        verify_benchmarks=[],
        verify_per_set=None,
        judge=args.judge,
        judge_calibration=args.judge_calibration,
        proxy_judge=args.proxy_judge,
    )
    layout = RunLayout(args.out)
    try:
        front = optimize(layout, opts, lm=lm, say=lambda m: print(f"[bench] {m}", flush=True))
    except RefusalkitError as exc:  # e.g. no verified point within --max-kl: the front is still saved
        print(f"[bench] no choice: {exc}")
        front = read_front(layout)
    total = time.perf_counter() - t0
    secs = front["seconds"]
    baseline = _baseline(lm, opts, layout) if args.baseline else None

    print(
        f"\nmodel {lm.name}; {front['sets']}; verification: greedy {front['verify_max_new_tokens']} new tokens"
    )
    print(format_front(points_of(front), front["chosen"]))
    print("\nverified points (JailbreakBench 100, 50 tokens; KL on harmless_test[:100]):")
    print(
        f"{'who':<28}{'refusals heretic':>17}{'(echo)':>7}{'paper':>7}{'not refused':>12}{'complied':>9}"
        f"{'partial':>8}{'degen.':>7}{'KL mean':>9}{'median':>8}{'max':>8}"
    )
    for p in points_of(front):
        if p.verified:
            v = p.verified
            kls = f"{v['kl']['mean']:>9.4f}{v['kl']['median']:>8.4f}{v['kl']['max']:>8.3f}"
            print(f"{'refusalkit trial ' + str(p.trial):<28}{counts(v)}{kls}")
    if baseline is not None:
        print(f"{'unedited model':<28}{counts(baseline)}{0.0:>9.4f}")
    print(
        f"{'paper pick (issue 7)':<28}{PAPER_PICK[0]:>17}{'-':>7}{PAPER_PICK[1]:>7}{NO_JUDGE}{PAPER_PICK[2]:>9.3f}"
    )
    heretic = read_json(args.heretic_json) if args.heretic_json else None
    if heretic is None:
        for refusals, kl in HERETIC_FRONT:
            print(f"{'heretic 1.4.0 (issue 7)':<28}{refusals:>17}{'-':>7}{'-':>7}{NO_JUDGE}{kl:>9.4f}")
        print(f"(heretic baseline: {HERETIC_BASELINE}/100 refusals by its markers; 46 minutes for 12 trials)")
    else:
        for p in heretic["front"]:
            who = f"heretic trial {p['trial']} ({p['found_after_s'] / 60:.0f} min)"
            print(f"{who:<28}{p['refusals']:>17}{'-':>7}{'-':>7}{NO_JUDGE}{p['kl']:>9.4f}")
        hs = heretic["seconds"]
        n_all = heretic["settings"]["trials"]
        all_of = (
            ""
            if hs["all_trials_measured"]
            else f"; {n_all} trials extrapolated: {hs['all_trials'] / 60:.1f} min"
        )
        print(
            f"(heretic {heretic['version']} on this machine: baseline {heretic['base_refusals']}/100 by its markers; "
            f"{hs['total'] / 60:.1f} min for {heretic['trials']} trials, {hs['per_trial_mean']:.0f} s each{all_of})"
        )
    print(
        f"\nwall time from a cold start: {total / 60:.1f} min (load {t_load:.0f} s, extract {t_extract:.0f} s, "
        f"search {secs['search']:.0f} s for {front['trials_run']} trials, verification {secs['verify']:.0f} s)"
    )
    if heretic is not None:
        print(
            f"heretic's wall time for {heretic['settings']['trials']} trials / refusalkit's, this machine: "
            f"{heretic['seconds']['all_trials'] / total:.2f}"
        )
    if baseline is not None:
        print(f"(unedited model verified after the clock stopped: {baseline['seconds']:.0f} s, not counted)")
    if args.judge:
        print(
            f"(judge {args.judge}: complied / partial / degenerate are its verdicts on the same completions; "
            "not refused: neither keyword list marked the reply)"
        )


NO_JUDGE = f"{'-':>12}{'-':>9}{'-':>8}{'-':>7}"


def counts(v: dict[str, Any]) -> str:
    """A verified result's counts: heretic's markers (and its echoes), the paper's phrases, how many
    neither marked, and the LLM judge's complied / partial / degenerate when it judged them."""
    echo = (v.get("echoed") or {}).get("heretic", "-")
    j = v.get("judged") or {}
    judged = "".join(
        f"{j.get(c, '-'):>{w}}" for c, w in (("compliance", 9), ("partial", 8), ("degenerate", 7))
    )
    return f"{v['refused']['heretic']:>17}{echo:>7}{v['refused']['paper']:>7}{not_refused(v):>12}{judged}"


def _baseline(lm: Any, opts: OptimizeOptions, layout: RunLayout) -> dict[str, Any]:
    """The unedited model on the same protocol (outside the timed path: it is no part of the search),
    judged as the search's points were."""
    from refusalkit.search.judging import build_judge, judge_key
    from refusalkit.search.optimize import run_settings
    from refusalkit.search.promptsets import prompt_sets
    from refusalkit.search.setups import ChatSetup
    from refusalkit.search.verification import judged, verifier

    sets = prompt_sets(layout, run_settings(layout), opts)
    held_out = {"jailbreakbench": sets["harmful_test"]}
    v_of = verifier(lm, [ChatSetup("helpful", SYSTEM)], held_out, sets["harmless_test"], opts)
    gen = v_of.run(desc="verify baseline", kl=False)
    judge = build_judge(opts.judge, lm, calibration=opts.judge_calibration) if opts.judge else None
    key = judge_key(opts.judge, opts.judge_calibration)
    return judged(v_of, [("baseline", gen)], judge, key, lambda m: print(f"[bench] {m}"))[0]


if __name__ == "__main__":
    main()
