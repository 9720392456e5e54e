"""Time heretic (PyPI heretic-llm) on this machine, on the same protocol as bench/vs_heretic.py.

heretic is AGPL-licensed: it is never a dependency of refusalkit and no code of it is copied. This script
installs it into its own virtual environment (--venv; created on first use: torch==2.13.0 first, then
heretic-llm==VERSION), writes its prompt sets as local datasets and a config.toml into --out, runs its
command line there with stdin closed, waits for "Optimization finished!" and stops it at its interactive
menu. Then it reads heretic's own Optuna journal (with the venv's Python) and prints its front, when each
point was found, and the wall time from a cold start; --json writes the same numbers for
bench/vs_heretic.py --heretic-json, which then prints this machine's heretic front beside refusalkit's.

Protocol (issue 7): the default model in float32; 12 trials, batch 64, greedy, 50 new tokens, system
prompt "You are a helpful assistant."; its evaluation prompts are the 100 JailbreakBench behaviours and the
first 100 harmless_test prompts (as in vs_heretic.py); its direction prompts are the pools refusalkit
extracts from: the paper's harmful_train (all 260) and harmless_train[:400] (heretic's defaults take 400 of
each from the hub). Its own defaults otherwise, including its refusal markers.

Usage: python bench/heretic_run.py --out runs/heretic [--trials 12] [--json runs/heretic/result.json]
Runs the real default model on 2 cores for about 24 minutes before its first trial, then about 5.6 minutes
a trial (measured 2026-11-30; 12 trials: about 90 minutes; --stop-after 4: 47): take the heavy-compute lock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from refusalkit.data import load_instructions
from refusalkit.models.registry import ensure_converted
from refusalkit.settings import build_settings
from refusalkit.utils import read_json, write_json

VERSION = "1.4.0"
TORCH = "torch==2.13.0"  # the CPU wheel on disk; heretic's own pin range would pull a CUDA build
FINISHED = "Optimization finished!"
TRIAL_DONE = "Elapsed time:"  # heretic prints it once after each trial

# Run with the venv's Python: heretic's study -> one JSON object on stdout (its own trial attributes).
READ_STUDY = r"""
import json, sys
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
storage = JournalStorage(JournalFileBackend(sys.argv[1]))
study = storage.get_all_studies()[0]
rows = []
for t in storage.get_all_trials(study._study_id):
    a = t.user_attrs
    rows.append({
        "index": a.get("index"), "state": t.state.name,
        "refusals": a.get("refusals"), "kl": a.get("kl_divergence"),
        "base_refusals": a.get("base_refusals"),
        "start": t.datetime_start.timestamp() if t.datetime_start else None,
        "complete": t.datetime_complete.timestamp() if t.datetime_complete else None,
    })
print(json.dumps(rows))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=Path("runs/heretic"), help="Working folder (its study resumes)."
    )
    ap.add_argument("--venv", type=Path, default=Path("runs/heretic-venv"), help="heretic's own environment.")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--model", default=None, help="Model (default: the project's default built-in model).")
    ap.add_argument("--json", type=Path, default=None, help="Write the result here (for vs_heretic.py).")
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="Stop heretic once this many trials are done (its study keeps them); the summary then also "
        "gives the wall time of all --trials, extrapolated from the measured setup and mean trial time.",
    )
    ap.add_argument(
        "--summarize", action="store_true", help="Run nothing: summarize the study already in --out."
    )
    args = ap.parse_args()

    if args.summarize:
        started = read_json(args.out / "started.json")
        _report(args, started["t0"], started.get("t_end") or time.time())
        return
    heretic = _ensure_venv(args.venv).resolve()
    settings = build_settings({"model": args.model} if args.model else {})
    model_dir = ensure_converted(settings.model) if "/" not in settings.model else Path(settings.model)
    data = Path(settings.data_dir) / "refusal_direction"
    args.out.mkdir(parents=True, exist_ok=True)
    read = lambda rel: load_instructions(str(data / rel)).instructions  # noqa: E731  (as vs_heretic.py reads them)
    sets = {
        "good_train": read("splits/harmless_train.json")[:400],
        "bad_train": read("splits/harmful_train.json"),
        "good_eval": read("splits/harmless_test.json")[:100],
        "bad_eval": read("processed/jailbreakbench.json"),
    }
    for name, prompts in sets.items():  # one JSON-lines "train" split per set: prompts keep their newlines
        (args.out / name).mkdir(exist_ok=True)
        with open(args.out / name / "train.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": p}) + "\n" for p in prompts)
    spec = lambda name: f'{{ dataset = "{(args.out / name).resolve()}", split = "train", column = "text" }}'  # noqa: E731
    (args.out / "config.toml").write_text(
        f'model = "{model_dir.resolve()}"\n'
        'dtypes = ["float32"]\n'
        f"batch_size = {args.batch_size}\n"
        f"max_response_length = {args.max_new_tokens}\n"
        f"n_trials = {args.trials}\n"
        f"seed = {args.seed}\n"
        'study_checkpoint_dir = "checkpoints"\n'
        'system_prompt = "You are a helpful assistant."\n'
        f"good_prompts = {spec('good_train')}\n"
        f"bad_prompts = {spec('bad_train')}\n"
        f"good_evaluation_prompts = {spec('good_eval')}\n"
        f"bad_evaluation_prompts = {spec('bad_eval')}\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["HF_HOME"] = str((args.out / "hf-home").resolve())  # its dataset cache stays in --out
    env["COLUMNS"] = "160"
    log_path = args.out / "heretic.log"
    print(f"[heretic] running heretic {VERSION} in {args.out} (log: {log_path})", flush=True)
    t0 = time.time()
    write_json(args.out / "started.json", {"t0": t0})
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [str(heretic)], cwd=args.out, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        t_end = _wait_finished(proc, log_path, args.stop_after)
    write_json(args.out / "started.json", {"t0": t0, "t_end": t_end})
    if proc.returncode not in (0, -signal.SIGTERM):
        print(f"[heretic] exited with {proc.returncode}; its log: {log_path}", flush=True)
    _report(args, t0, t_end)


def _report(args: argparse.Namespace, t0: float, t_end: float) -> None:
    journal = next((args.out / "checkpoints").glob("*.jsonl"), None)
    if journal is None:
        sys.exit(f"heretic wrote no study in {args.out / 'checkpoints'}; its log: {args.out / 'heretic.log'}")
    rows = json.loads(
        subprocess.run(
            [str(args.venv / "bin" / "python"), "-c", READ_STUDY, str(journal)],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    result = _summary(rows, t0, t_end, args)
    _print(result)
    if args.json:
        write_json(args.json, result)


def _ensure_venv(venv: Path) -> Path:
    exe = venv / "bin" / "heretic"
    if exe.is_file():
        return exe
    print(f"[heretic] installing heretic-llm=={VERSION} into {venv} (its own environment)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, f"heretic-llm=={VERSION}"], check=True)
    return exe


def _wait_finished(proc: subprocess.Popen[bytes], log_path: Path, stop_after: int | None) -> float:
    """Wait until heretic prints that its trials are done (then stop it at its menu), or that
    ``stop_after`` trials are (it prints the elapsed time after each), or exits."""
    while proc.poll() is None:
        log = log_path.read_text(encoding="utf-8", errors="replace")
        if FINISHED in log or (stop_after is not None and log.count(TRIAL_DONE) >= stop_after):
            t_end = time.time()
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            return t_end
        time.sleep(5)
    return time.time()


def _summary(rows: list[dict], t0: float, t_end: float, args: argparse.Namespace) -> dict:
    done = sorted((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["index"])
    front, best_kl = [], float("inf")
    for r in sorted(done, key=lambda r: (r["refusals"], r["kl"])):  # heretic's own front rule
        if r["kl"] < best_kl:
            best_kl = r["kl"]
            front.append(r)
    first = min((r["start"] for r in done), default=t_end)
    trial_s = [r["complete"] - r["start"] for r in done]
    mean = sum(trial_s) / len(trial_s) if trial_s else None
    last = max((r["complete"] for r in done), default=t_end)
    return {
        "version": VERSION,
        "trials": len(done),
        "settings": {k: getattr(args, k) for k in ("trials", "batch_size", "seed", "max_new_tokens")},
        "base_refusals": done[0]["base_refusals"] if done else None,
        "front": [
            {
                "trial": r["index"],
                "refusals": r["refusals"],
                "kl": r["kl"],
                "found_after_s": r["complete"] - t0,
            }
            for r in sorted(front, key=lambda r: r["kl"], reverse=True)
        ],
        "seconds": {
            "total": (t_end if len(done) >= args.trials else last) - t0,
            "before_trials": first - t0,
            "trials": last - first,
            "per_trial_mean": mean,
            # all --trials: measured when they ran, else the setup plus --trials mean trials
            "all_trials": (last - t0)
            if len(done) >= args.trials or mean is None
            else first - t0 + args.trials * mean,
            "all_trials_measured": len(done) >= args.trials,
        },
    }


def _print(result: dict) -> None:
    s = result["seconds"]
    print(f"\nheretic {result['version']}: {result['trials']} trials, baseline {result['base_refusals']}/100")
    print(f"{'trial':>6}{'refusals':>10}{'KL':>9}{'found after':>13}")
    for p in result["front"]:
        print(f"{p['trial']:>6}{p['refusals']:>10}{p['kl']:>9.4f}{p['found_after_s'] / 60:>11.1f} m")
    print(
        f"wall time from a cold start: {s['total'] / 60:.1f} min for {result['trials']} trials (before the first "
        f"trial {s['before_trials']:.0f} s, trials {s['trials']:.0f} s, {s['per_trial_mean'] or 0:.0f} s per trial)"
    )
    if not s["all_trials_measured"]:
        n = result["settings"]["trials"]
        print(f"all {n} trials, extrapolated (setup + {n} x the mean trial): {s['all_trials'] / 60:.1f} min")


if __name__ == "__main__":
    main()
