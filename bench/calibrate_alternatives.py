"""Other edits than the false-refusal vector, scored by the calibration search's own proxy (issue 19):
does any of them cut over-refusal further for the harmful refusal it costs?

  refusal w=W      the run's refusal direction ablated at weight W on every write and the embedding
                   (the removal edit, partial: each write's component along r scaled by 1 - W)
  subtract c=C     activation addition with a negative coefficient: resid_pre[layer] += C x the run's
                   (unnormalized) direction at its layer, every position (a threshold shift, not a
                   removal; hooks only, it has no weight form in these models)
  trials A+B       two trials of the calibration search's study applied together (their targets through
                   the one edit core)

Each is scored as a trial of `refusalkit optimize RUN_DIR --goal calibrate` is (``GoalScorer``, the
study's own prompts and --proxy-new-tokens 24): over-refusal on the first 64 OR-Bench-Hard val prompts,
harmful refusal on the run's harmful validation prompts (both: the paper's phrases in 24 greedy tokens,
else the first token's P), first-token KL on the search's harmless prompts; printed beside the
unedited model's and as fractions of it. Prints counts, never text. Runs the run's real model: take the
heavy-compute lock (flock /tmp/rk-heavy.lock ...).

Usage: python bench/calibrate_alternatives.py RUN_DIR [--refusal 0.3] [--subtract -0.3] [--trials 12+18]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "run_dir", type=Path, help="A run with select done (and a calibration search for --trials)."
    )
    ap.add_argument("--refusal", default="0.3", help="Weights W of the partial refusal-direction ablation.")
    ap.add_argument("--subtract", default="-0.3", help="Coefficients C of the activation subtraction.")
    ap.add_argument(
        "--trials", default="", help="Pairs A+B of the calibration study's trials, comma-separated."
    )
    ap.add_argument("--over-n", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=24)
    return ap.parse_args(argv)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from refusalkit.calibrate import data
    from refusalkit.calibrate.edit import CalibrationEdit, targets
    from refusalkit.edits import edited
    from refusalkit.interventions import add_direction
    from refusalkit.layout import RunLayout
    from refusalkit.metric import refusal_token_ids
    from refusalkit.models.loading import load_model
    from refusalkit.prompts import format_prompts
    from refusalkit.run import RunFolder
    from refusalkit.search.calibrate_goal import GoalScorer
    from refusalkit.search.options import OptimizeOptions
    from refusalkit.search.promptsets import prompt_sets

    layout = RunLayout(args.run_dir)
    folder = RunFolder(layout)
    s, d = folder.settings(), folder.direction()
    o = OptimizeOptions(goal="calibrate")
    lm = load_model(s.model, **s.model_kwargs())
    n = lm.arch.n_layers

    def fmt(xs: list[str]) -> list[str]:
        return format_prompts(lm.tokenizer, xs, s.system_prompt)

    sets = prompt_sets(layout, s, o)
    scorer = GoalScorer(
        lm, fmt(data.load(s.data_dir, data.VAL_SET, args.over_n)), fmt(sets["harmful"]), fmt(sets["harmless"]),
        refusal_token_ids(lm.tokenizer, s.refusal_tokens), o.batch_size, new_tokens=args.new_tokens,
        gen_batch_size=s.gen_batch_size,
    )  # fmt: skip
    edits: dict[str, Any] = {}
    for w in floats(args.refusal):
        weights = {"attn": [w] * n, "mlp": [w] * n, "embed": w}
        edits[f"refusal w={w:g}"] = lambda weights=weights: edited(lm, targets(lm.arch, d.vector, weights))
    for c in floats(args.subtract):
        edits[f"subtract c={c:g}"] = lambda c=c: add_direction(lm.arch, d.vector, d.layer, c)
    if args.trials:
        from refusalkit.search.calibrate_optimize import study_vectors
        from refusalkit.search.study import saved_study

        study = saved_study(layout.calibrate_study)
        if study is None:
            raise SystemExit(f"--trials: {layout.calibrate_study} holds no calibration search")
        vectors = study_vectors(layout, folder.candidates(), d, study)  # the means its trials were made with
        for pair in args.trials.split(","):
            tg = []
            for k in pair.split("+"):
                e = CalibrationEdit.model_validate(study.trials[int(k)].user_attrs["edit"])
                tg += targets(lm.arch, vectors.at(e), e.weights(n))
            edits[f"trials {pair}"] = lambda tg=tg: edited(lm, tg)
    base = scorer.refusal()
    print(json.dumps({"edit": "unedited", **{k: round(v, 3) for k, v in base.items()}}), flush=True)
    for name, make in edits.items():
        t0 = time.perf_counter()
        ctx: AbstractContextManager[Any] = make()
        with ctx:
            r = scorer()
        print(json.dumps({
            "edit": name, "over_rate": round(r.over_rate, 3), "harmful_rate": round(r.harmful_rate, 3),
            "over_x": round(r.over / base["over"], 2), "harmful_x": round(r.harmful / base["harmful"], 2),
            "kl": round(r.kl.mean, 4), "seconds": round(time.perf_counter() - t0),
        }), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
