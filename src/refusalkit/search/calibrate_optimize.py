"""`refusalkit optimize RUN_DIR --goal calibrate`: search, verify, choose, export (docs/calibrate.md).

Reads the run (settings, candidates, the selected refusal direction, splits) and the over-refusal data;
computes or reuses the false-refusal means (``calibrate.run.refused_means``, `refusalkit calibrate`'s
at its default --n-train); runs the study (``search.calibrate_goal``) in calibrate/search/study.db;
writes calibrate/search/front.json (before choosing: a floor no trial meets loses nothing); chooses
(``search.calibrate_choose``); verifies the chosen point, the best feasible point within each
--verify-at KL level and the unedited model on held-out prompts; and saves the choice as the run's
calibration (calibrate/search/chosen.*, calibrate/calibrated.json), which ``--edit calibrate`` names.
A call whose options only choose, on a run with a calibration search, chooses from the saved study:
no trial, no verification, no model unless --export.

Verification: over-refusal on OR-Bench-Hard test and OKTest val, harmful refusal on each
--verify-benchmarks set (JailbreakBench's 100), each judged by the run's marker lists with Wilson
intervals (``calibrate.rates.judged_rates``, as the over-refusal measurement), greedy completions of
--verify-max-new-tokens; first-token KL on --verify-kl-n held-out harmless prompts. All of each set
(--verify-per-set, given, cuts them); a set whose file is missing is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from refusalkit.calibrate import data
from refusalkit.calibrate.edit import targets
from refusalkit.calibrate.options import CalibrateOptions
from refusalkit.directions import Candidates, Direction
from refusalkit.edits import edited
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.models.loading import LoadedModel
from refusalkit.run import RunFolder
from refusalkit.search.calibrate_choose import (
    Floor,
    GoalPoint,
    choose_goal,
    chosen_record,
    format_goal,
    front,
    say_floor_warnings,
)
from refusalkit.search.calibrate_goal import (
    SPACE_VERSION,
    GoalScorer,
    Vectors,
    calibration_place,
    completed,
    fingerprint_of,
    open_goal_study,
    run_goal,
    seed_trials,
    space_for,
)
from refusalkit.search.options import OptimizeOptions
from refusalkit.search.promptsets import data_root, prompt_sets
from refusalkit.search.study import Budget, saved_study
from refusalkit.settings import Settings
from refusalkit.utils import read_json, sha256_file, sha256_text, write_json

log = logging.getLogger(__name__)
# the removal search's options that the calibration search does not read (it scores under the run's own
# system prompt, with the paper's phrases on --proxy-new-tokens, and verifies with the run's marker lists)
NOT_READ = frozenset({
    "setups", "system_prompts", "sources", "positions", "edit_embed", "proxy_judge",
    "judge", "judge_calibration", "verify_harmful", "verify_baseline",
})  # fmt: skip


def study_vectors(layout: RunLayout, cands: Candidates, direction: Direction, study: Any) -> Vectors:
    """The saved means the study was made from (checked by their fingerprint)."""
    from safetensors.torch import load_file

    info = layout.calibrate_dir / "means.json"
    path = layout.calibrate_dir / "means.safetensors"
    if not path.is_file() or not info.is_file():
        raise RunFolder(layout).missing("false-refusal means", path, "optimize --goal calibrate")
    if read_json(info).get("fingerprint") != study.user_attrs.get("means"):
        raise RefusalkitError(
            f"{path} was recomputed since the calibration search ran (other prompts or --n-train); rerun "
            f"`refusalkit optimize {layout.root} --goal calibrate` to search with the new means"
        )
    return Vectors(load_file(str(path))["mean"], cands.harmless_mean, direction.vector)


def held_out(layout: RunLayout, s: Settings, o: OptimizeOptions) -> tuple[dict[str, list[str]], list[str]]:
    """The verification's prompt sets (over-refusal ones first) and its harmless KL prompts."""
    n = o.verify_per_set if "verify_per_set" in o.model_fields_set else None
    sets = data.held_out_sets(o.data_dir or s.data_dir, n, "verification")
    for name in o.verify_benchmarks:
        path = data_root(s, o) / "processed" / f"{name}.json"
        if not path.is_file():
            log.warning("verification set %r skipped: %s is missing (pass --data-dir)", name, path)
            continue
        from refusalkit.data import load_instructions

        items = load_instructions(str(path)).instructions
        sets[name] = items[:n] if n is not None else items
    return sets, prompt_sets(layout, s, o)["harmless_test"]


class GoalVerifier:
    """Judged rates of the held-out sets and first-token KL under whatever edit is active."""

    def __init__(self, lm: LoadedModel, s: Settings, o: OptimizeOptions, sets: dict[str, list[str]],
                 harmless: list[str]) -> None:  # fmt: skip
        from refusalkit.activations import logits_for_prompts
        from refusalkit.prompts import format_prompts

        self.lm, self.s, self.o, self.sets = lm, s, o, sets
        self.harmless = format_prompts(lm.tokenizer, harmless, s.system_prompt)
        self.base = logits_for_prompts(lm, self.harmless, o.batch_size)
        self.harmful_sets = [k for k in sets if k not in data.TEST_SETS]

    def __call__(self, desc: str, kl: bool = True) -> dict[str, Any]:
        from refusalkit.activations import logits_for_prompts
        from refusalkit.calibrate.rates import judged_rates
        from refusalkit.metric import kl_div
        from refusalkit.search.objectives import KLStats

        t0 = time.perf_counter()
        rates = judged_rates(
            self.lm, self.sets, system=self.s.system_prompt, max_new_tokens=self.o.verify_max_new_tokens,
            batch_size=self.o.gen_batch_size, desc=desc, rows=False,
        )  # fmt: skip
        per = (
            kl_div(self.base, logits_for_prompts(self.lm, self.harmless, self.o.batch_size))
            if kl
            else torch.zeros(len(self.harmless), dtype=torch.float64)
        )
        return {
            "rates": {k: v["rates"] for k, v in rates.items()},
            "harmful_sets": self.harmful_sets,
            "kl": KLStats.of(per).__dict__,
            "max_new_tokens": self.o.verify_max_new_tokens,
            "seconds": round(time.perf_counter() - t0, 1),
        }


def to_verify(ok: list[GoalPoint], chosen: GoalPoint, o: OptimizeOptions) -> list[GoalPoint]:
    """The chosen point, the fewest over-refusals within each --verify-at KL level, then --verify-n more
    by over-refusal (all feasible front points)."""
    out = [chosen]
    by_over = sorted(ok, key=lambda p: (p.over, p.kl))
    for level in o.verify_at:
        best = next((p for p in by_over if p.kl <= level), None)
        if best is not None and best not in out:
            out.append(best)
    return out + [p for p in by_over if p not in out][: o.verify_n]


def save_choice(layout: RunLayout, p: GoalPoint, vectors: Vectors, floor: Floor, base: dict[str, Any],
                model: str, baseline: dict[str, Any] | None) -> None:  # fmt: skip
    """The chosen edit as the run's calibration: calibrate/search/chosen.* and calibrated.json."""
    n_layers = vectors.refused.shape[1]
    scores = {k: p.proxy[k] for k in ("over", "over_rate", "harmful", "harmful_rate")}
    Direction(
        vectors.at(p.edit), p.edit.layer, p.edit.position, model=model,
        scores=scores | {"kl": p.kl}, meta=chosen_record(p, floor, base, n_layers, baseline),
    ).save(layout.calibrate_chosen)  # fmt: skip
    write_json(layout.calibrated, {
        "lam": p.edit.lam, "stem": str(layout.calibrate_chosen.relative_to(layout.calibrate_dir)),
        "layer": p.edit.layer, "position": p.edit.position, "source": "search", "trial": p.trial,
    })  # fmt: skip


def _points(study: Any) -> list[GoalPoint]:
    return [GoalPoint.from_trial(t) for t in completed(study)]


def optimize_calibration(
    layout: RunLayout,
    o: OptimizeOptions,
    *,
    lm: LoadedModel | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The calibration search of ``layout``'s run (see the module docstring); returns front.json."""
    folder = RunFolder(layout)
    cands, direction, s = folder.candidates(), folder.direction(), folder.settings()
    root = o.data_dir or s.data_dir
    data.require(root, [*data.TRAIN_SETS, data.VAL_SET], "refusalkit optimize --goal calibrate")
    t0 = time.perf_counter()

    def model() -> LoadedModel:
        nonlocal lm
        if lm is None:
            from refusalkit.models.loading import load_model

            lm = load_model(s.model, **s.model_kwargs())
        return lm

    def export() -> None:
        from refusalkit.export.cli import write_model

        say(f"checkpoint: {write_model(layout.root, model(), edit='calibrate', settings=s)}")

    ignored = sorted(NOT_READ & o.model_fields_set)
    if ignored:
        say(f"--goal calibrate does not read {', '.join(ignored)} (docs/calibrate.md); ignored")
    if o.choosing_only() and layout.calibrate_front.is_file():
        return _choose_saved(layout, o, cands, direction, s, export, say)
    from refusalkit.calibrate.run import refused_means
    from refusalkit.metric import refusal_token_ids
    from refusalkit.prompts import format_prompts

    m = model()
    n_train = CalibrateOptions.model_validate({}).n_train  # `refusalkit calibrate`'s default: its means
    train = data.load_many(root, data.TRAIN_SETS, n_train, s.seed)
    refused, means_fp = refused_means(layout, train, model, say)
    sets = prompt_sets(layout, s, o)
    pseudo = data.load(root, data.VAL_SET, o.over_n)
    fmt = lambda xs: format_prompts(m.tokenizer, xs, s.system_prompt)  # noqa: E731
    prompts = {"pseudo": fmt(pseudo), "harmful": fmt(sets["harmful"]), "harmless": fmt(sets["harmless"])}
    ids = refusal_token_ids(m.tokenizer, s.refusal_tokens)
    fp = fingerprint_of({
        "model": m.fingerprint, "candidates": sha256_file(layout.candidates), "means": means_fp,
        "direction": sha256_file(layout.direction.with_suffix(".safetensors")), "refusal_ids": ids,
        "prompts": sha256_text(json.dumps(prompts, sort_keys=True)), "space": SPACE_VERSION,
        "proxy_new_tokens": o.proxy_new_tokens,
    })  # fmt: skip
    study = open_goal_study(layout.calibrate_study, fp, o.seed, o.startup_trials)
    if "place" not in study.user_attrs:  # where the seeds sit, fixed when the study is made
        found = calibration_place(layout.calibrated)
        study.set_user_attr("place", list(found) if found else None)
    stored = study.user_attrs["place"]
    space = space_for(cands.n_layers, cands.n_positions, int(stored[0]) if stored else None)
    place = (int(stored[0]), int(stored[1]), float(stored[2])) if stored else space.middle()
    study.set_user_attr("means", means_fp)
    vectors = Vectors(refused.mean, cands.harmless_mean, direction.vector)
    ran, t_search = 0, time.perf_counter()
    if len(completed(study)) < o.trials or "base" not in study.user_attrs:
        scorer = GoalScorer(
            m, prompts["pseudo"], prompts["harmful"], prompts["harmless"], ids, o.batch_size,
            new_tokens=o.proxy_new_tokens, gen_batch_size=o.gen_batch_size,
        )  # fmt: skip
        if "base" not in study.user_attrs:  # the unedited model's rates: measured once, kept in the study
            study.set_user_attr("base", scorer.refusal())
        floor = Floor(o.harmful_floor, float(study.user_attrs["base"]["harmful"]))
        budget = Budget(o.trials, o.minutes * 60 if o.minutes else None)
        ran = run_goal(study, m, scorer, vectors, space, budget, seed_trials(space, *place), floor.value, say)
    base = dict(study.user_attrs["base"])
    floor = Floor(o.harmful_floor, float(base["harmful"]))
    search_seconds = time.perf_counter() - t_search
    points = _points(study)
    old = read_json(layout.calibrate_front) if layout.calibrate_front.is_file() else {}
    sets_v, harmless_v = held_out(layout, s, o)
    vfp = fingerprint_of({"sets": sets_v, "harmless": harmless_v, "system": s.system_prompt,
                          "tokens": o.verify_max_new_tokens})  # fmt: skip
    cache = old.get("verified", {}) if old.get("verify_fingerprint") == vfp else {}
    baseline = old.get("baseline") if old.get("verify_fingerprint") == vfp else None
    out: dict[str, Any] = {
        "goal": "calibrate", "objectives": list(study.user_attrs.get("objectives", [])), "base": base,
        "floor": {"fraction": floor.fraction, "harmful": floor.value}, "chosen": old.get("chosen"),
        "trials": [p.as_dict() | {"feasible": floor.holds(p)} for p in points],
        "verify_fingerprint": vfp, "verified": cache, "baseline": baseline, "trials_run": ran,
        "n_layers": cands.n_layers,
    }  # fmt: skip
    ok = front(points, floor)
    for p in ok:
        p.verified = cache.get(str(p.trial))
    out["points"] = [p.as_dict() for p in ok]
    write_json(layout.calibrate_front, out)  # before choosing: a floor no trial meets loses nothing
    chosen = choose_goal(points, floor, o, layout.calibrate_study)
    t_verify = time.perf_counter()
    todo = [p for p in to_verify(ok, chosen, o) if str(p.trial) not in cache]
    if todo or baseline is None:
        verify = GoalVerifier(m, s, o, sets_v, harmless_v)
        if baseline is None:
            baseline = verify("verify unedited", kl=False)
            say("verified the unedited model")
        for p in todo:
            with edited(m, targets(m.arch, vectors.at(p.edit), p.edit.weights(cands.n_layers))):
                cache[str(p.trial)] = verify(f"verify trial {p.trial}")
            say(f"verified trial {p.trial}: KL {cache[str(p.trial)]['kl']['mean']:.4f}")
    for p in [*ok, chosen]:
        p.verified = cache.get(str(p.trial))
    say_floor_warnings(chosen, baseline, floor, say)
    out |= {
        "points": [p.as_dict() for p in ok],
        "verified": cache,
        "baseline": baseline,
        "chosen": chosen.trial,
    }
    out["seconds"] = {"search": round(search_seconds, 1), "verify": round(time.perf_counter() - t_verify, 1),
                      "total": round(time.perf_counter() - t0, 1)}  # fmt: skip
    write_json(layout.calibrate_front, out)
    save_choice(layout, chosen, vectors, floor, base, s.model, baseline)
    if o.export:
        export()
    return out


def _choose_saved(layout: RunLayout, o: OptimizeOptions, cands: Candidates, direction: Direction, s: Settings,
                  export: Callable[[], None], say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Choose from the saved study and front: no trial, no verification, no model unless --export."""
    study = saved_study(layout.calibrate_study)
    if study is None:
        raise RunFolder(layout).missing(
            "calibration search", layout.calibrate_study, "optimize --goal calibrate"
        )
    out = dict(read_json(layout.calibrate_front))
    before = out.get("chosen")
    base = dict(study.user_attrs["base"])
    floor = Floor(o.harmful_floor, float(base["harmful"]))
    points = _points(study)
    ok = front(points, floor)
    cache = out.get("verified") or {}
    for p in points:
        p.verified = cache.get(str(p.trial))
    out |= {"floor": {"fraction": floor.fraction, "harmful": floor.value}, "points": [p.as_dict() for p in ok],
            "trials": [p.as_dict() | {"feasible": floor.holds(p)} for p in points],
            "trials_run": 0, "seconds": {"search": 0.0, "verify": 0.0, "total": 0.0}}  # fmt: skip
    chosen = choose_goal(points, floor, o, layout.calibrate_study, before=before)  # an error changes nothing
    out["chosen"] = chosen.trial
    write_json(layout.calibrate_front, out)
    say_floor_warnings(chosen, out.get("baseline"), floor, say)
    vectors = study_vectors(layout, cands, direction, study)
    save_choice(layout, chosen, vectors, floor, base, s.model, out.get("baseline"))
    if o.export:
        export()
    return out


def print_calibration(layout: RunLayout, o: OptimizeOptions, *, listing: bool) -> int:
    """`refusalkit optimize RUN_DIR --goal calibrate [--list]`: run (unless listing) and print the front."""
    if listing:
        if not layout.calibrate_front.is_file():
            raise RunFolder(layout).missing(
                "calibration search", layout.calibrate_front, "optimize --goal calibrate"
            )
        out = dict(read_json(layout.calibrate_front))
    else:
        out = optimize_calibration(layout, o)
    floor = Floor(float(out["floor"]["fraction"]), float(out["base"]["harmful"]))
    print(format_goal([GoalPoint.from_dict(d) for d in out.get("points", [])], floor, out.get("chosen")))
    if not listing:
        feasible = sum(t.get("feasible", False) for t in out["trials"])
        print(
            f"\n{out['trials_run']} trials this call, {len(out['trials'])} in the study ({feasible} at or above "
            f"the floor); chosen: trial {out['chosen']} (* above), now the run's calibration (--edit calibrate): "
            f"{layout.calibrate_chosen}.json; study: {layout.calibrate_study}"
        )
    return 0


__all__ = [
    "GoalVerifier",
    "held_out",
    "optimize_calibration",
    "print_calibration",
    "save_choice",
    "to_verify",
]
