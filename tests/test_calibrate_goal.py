"""`refusalkit optimize --goal calibrate` (issue 19 item 3) on tiny in-process models: the
harmful-refusal floor (never chosen below it, --trial N on a trial below it an error), the chosen edit
through the edit core equal to the exported weights, a floor no trial meets (clear error, study kept,
resumed), and --goal remove left alone."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from refusalkit.calibrate import run as calrun
from refusalkit.calibrate.edit import CalibrationEdit, targets
from refusalkit.edits import edited
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.orthogonalize import orthogonalized
from refusalkit.run import RunFolder
from refusalkit.search import calibrate_goal as goal
from refusalkit.search.calibrate_choose import Floor, GoalPoint, choose_goal, front
from refusalkit.search.calibrate_optimize import optimize_calibration
from refusalkit.search.options import OptimizeOptions
from refusalkit.search.study import saved_study
from refusalkit.utils import read_json
from test_calibrate import calibrate_run, quiet, refusing_ids

pytest.importorskip("optuna")


def _opts(**kw: Any) -> OptimizeOptions:
    base: dict[str, Any] = {
        "goal": "calibrate", "trials": 6, "minutes": None, "startup_trials": 3, "over_n": 6, "kl_n": 4,
        "verify_kl_n": 4, "verify_max_new_tokens": 2, "verify_at": [1e9], "batch_size": 8,
    }  # fmt: skip
    return OptimizeOptions(**(base | kw))


@pytest.fixture
def ready(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, RunLayout]:
    """A tiny run with over-refusal data and refusal tokens the tiny model "says" on about half of the
    pseudo-harmful prompts (so the false-refusal mean exists); JailbreakBench absent (skipped)."""
    lm = make_lm("qwen2")
    layout = calibrate_run(lm, tmp_path)
    ids = refusing_ids(lm)
    import refusalkit.metric as metric

    monkeypatch.setattr(metric, "refusal_token_ids", lambda _tok, _strings: ids)
    monkeypatch.setattr(calrun, "refusal_token_ids", lambda _tok, _strings: ids)
    return lm, layout


def _point(trial: int, over: float, harmful: float, kl: float) -> GoalPoint:
    proxy = {"over": over, "over_rate": over, "harmful": harmful, "harmful_rate": harmful, "kl": {"mean": kl}}
    return GoalPoint(trial, CalibrationEdit(), proxy)


# ---- the floor ------------------------------------------------------------------------------------------


def test_a_trial_below_the_floor_is_never_chosen_and_trial_n_on_it_errors(tmp_path: Path) -> None:
    points = [_point(0, 0.1, 0.5, 0.01), _point(1, 0.3, 0.95, 0.02), _point(2, 0.2, 0.92, 0.2)]
    floor = Floor(0.9, 1.0)
    study = tmp_path / "study.db"
    assert [p.trial for p in front(points, floor)] == [1, 2]  # trial 0 is below: off the front
    assert choose_goal(points, floor, OptimizeOptions(), study).trial == 1  # 2 is over the default KL
    assert choose_goal(points, floor, OptimizeOptions(max_kl=1.0), study).trial == 2
    assert choose_goal(points, floor, OptimizeOptions(max_refusals=0.5), study).trial == 1
    assert choose_goal(points, floor, OptimizeOptions(trial=2), study).trial == 2
    with pytest.raises(RefusalkitError, match=r"trial 0 is below the harmful-refusal floor: .*0.500 < 0.9 x"):
        choose_goal(points, floor, OptimizeOptions(trial=0), study)
    with pytest.raises(RefusalkitError, match="did not complete"):
        choose_goal(points, floor, OptimizeOptions(trial=7), study)
    # a choice made before under a lower floor is not kept once it falls below
    assert choose_goal(points, Floor(0.4, 1.0), OptimizeOptions(), study, before=0).trial == 0
    assert choose_goal(points, floor, OptimizeOptions(), study, before=0).trial == 1
    with pytest.raises(
        RefusalkitError,
        match=r"no trial .* floor \(1 x .* = 1.000\) among 3 .*highest harmful refusal was 0.950 \(trial 1",
    ):
        choose_goal(points, Floor(1.0, 1.0), OptimizeOptions(), study)


def test_the_search_honours_the_floor_end_to_end(
    ready: tuple[Any, RunLayout], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lm, layout = ready
    out = optimize_calibration(layout, _opts(harmful_floor=0.0), lm=lm, say=quiet)
    study = saved_study(layout.calibrate_study)
    assert study is not None and len(goal.completed(study)) == 6
    assert all("constraints" in t.system_attrs for t in goal.completed(study))  # the sampler saw the floor
    harmful = sorted(t["proxy"]["harmful"] for t in out["trials"])
    assert harmful[0] < harmful[-1]
    # a floor between the trials' harmful refusals: choosing again (no trial) never takes one below it
    base = out["base"]["harmful"]
    fraction = (harmful[0] + harmful[-1]) / 2 / base
    assert 0 < fraction <= 1
    calls: list[int] = []
    real = goal.GoalScorer.__call__
    monkeypatch.setattr(goal.GoalScorer, "__call__", lambda self: (calls.append(1), real(self))[1])
    again = optimize_calibration(layout, OptimizeOptions(goal="calibrate", harmful_floor=fraction), say=quiet)
    assert calls == [] and again["trials_run"] == 0
    chosen = next(t for t in again["trials"] if t["trial"] == again["chosen"])
    assert chosen["feasible"] and chosen["proxy"]["harmful"] >= fraction * base
    assert all(p["proxy"]["harmful"] >= fraction * base for p in again["points"])
    below = next(t["trial"] for t in again["trials"] if not t["feasible"])
    with pytest.raises(RefusalkitError, match=f"trial {below} is below the harmful-refusal floor"):
        optimize_calibration(
            layout, OptimizeOptions(goal="calibrate", harmful_floor=fraction, trial=below), say=quiet
        )
    # the run's calibration is the chosen trial, by the one reader of --edit
    active = RunFolder(layout).active_edit("calibrate")
    assert active.direction is not None and active.direction.meta["trial"] == again["chosen"]
    assert (
        "calibration search's trial" in active.label and RunFolder(layout).active_edit().kind == "direction"
    )
    assert (layout.calibrate_dir / "search").is_dir() and not layout.front.exists()  # never search/'s
    from refusalkit.cli import main

    capsys.readouterr()
    assert main(["optimize", str(layout.root), "--goal", "calibrate", "--list"]) == 0
    listed = capsys.readouterr().out
    assert f"floor: {fraction:g} x" in listed and f"*{again['chosen']:>5}" in listed


def test_a_floor_no_trial_meets_is_a_clear_error_and_the_rerun_resumes(
    ready: tuple[Any, RunLayout], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, layout = ready
    real = goal.GoalScorer.__call__

    def lower(self: goal.GoalScorer) -> goal.GoalResult:  # every edit loses most harmful refusals
        r = real(self)
        r.harmful *= 0.1
        return r

    monkeypatch.setattr(goal.GoalScorer, "__call__", lower)
    with pytest.raises(RefusalkitError, match=r"no trial .*floor \(0.9 x.*among 4 completed.*study is kept"):
        optimize_calibration(layout, _opts(trials=4, harmful_floor=0.9), lm=lm, say=quiet)
    study = saved_study(layout.calibrate_study)
    assert study is not None and len(goal.completed(study)) == 4
    saved = read_json(layout.calibrate_front)
    assert len(saved["trials"]) == 4 and saved["chosen"] is None and not saved["points"]
    assert not layout.calibrated.exists()  # nothing chosen, nothing half written
    first = {t.number: t.values for t in goal.completed(study)}
    # the rerun (same scorer, a floor some trials meet) resumes the study
    out = optimize_calibration(layout, _opts(trials=6, harmful_floor=0.05), lm=lm, say=quiet)
    study = saved_study(layout.calibrate_study)
    assert study is not None and len(goal.completed(study)) == 6 and out["trials_run"] == 2
    assert {t.number: t.values for t in goal.completed(study) if t.number in first} == first
    assert out["chosen"] is not None and layout.calibrated.is_file()


# ---- one edit core --------------------------------------------------------------------------------------


def test_the_proxy_counts_a_refusal_phrase_in_the_generated_tokens_not_only_the_first_token(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt whose greedy tokens hold one of the paper's phrases scores 1 and counts as refused, any
    other its first token's P(refusal); the generation stops a row once a phrase is in it."""
    from refusalkit.activations import logits_for_prompts
    from refusalkit.metric import refusal_metric
    from refusalkit.prompts import format_prompts

    lm = make_lm("qwen2")
    prompts = format_prompts(lm.tokenizer, ["a b", "c d", "e f", "g h"], None)
    ids = [5, 6]
    texts = ["Sure, here it is", "I'm sorry, but no", "Here is how", "As an AI, I cannot"]
    from refusalkit.search import objectives

    real = objectives.generate
    seen: dict[str, Any] = {}

    def scripted(lm_: Any, ps: list[str], **kw: Any) -> list[str]:  # real first logits, scripted texts
        seen.update(kw)
        real(lm_, ps, **(kw | {"max_new_tokens": 1, "done": None}))
        return list(texts)

    monkeypatch.setattr(objectives, "generate", scripted)
    scorer = goal.GoalScorer(lm, prompts, prompts, prompts, ids, 4, new_tokens=24, gen_batch_size=2)
    over, rate = scorer._rates(prompts)
    assert seen["max_new_tokens"] == 24 and seen["batch_size"] == 2
    done = seen["done"]
    assert done(0, lm.tokenizer.encode("I'm sorry", add_special_tokens=False))
    assert not done(0, lm.tokenizer.encode("Sure, here", add_special_tokens=False))
    m = refusal_metric(logits_for_prompts(lm, prompts, 4), ids).double()
    p = torch.sigmoid(m)
    assert over == pytest.approx(float((p[0] + 1 + p[2] + 1) / 4), abs=1e-3)
    assert rate == pytest.approx((float(m[0] > 0) + 1 + float(m[2] > 0) + 1) / 4)
    first_only = goal.GoalScorer(lm, prompts, prompts, prompts, ids, 4, new_tokens=0)
    monkeypatch.setattr(
        objectives, "generate", lambda *_a, **_k: pytest.fail("new_tokens=0 generates nothing")
    )
    over0, rate0 = first_only._rates(prompts)
    assert over0 == pytest.approx(float(p.mean()), abs=1e-6) and rate0 == pytest.approx(
        float((m > 0).double().mean())
    )
    assert over > over0  # the two phrases raise what the first token alone says
    with pytest.raises(RefusalkitError, match="new_tokens must be 0"):
        goal.GoalScorer(lm, prompts, prompts, prompts, ids, 4, new_tokens=-1)


def test_the_full_weight_seed_is_refusalkit_calibrates_orthogonalization(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    n = lm.arch.n_layers
    space = goal.Space(n, [-3, -2, -1], (0, n - 1))
    name, params = goal.seed_trials(space, 1, -1, 1.0)[0]

    class Fixed:  # an optuna trial that returns the seed's parameters
        def suggest_float(self, k: str, *_a: Any) -> float:
            return float(params[k])

        suggest_int = suggest_float

        def suggest_categorical(self, k: str, _c: Any) -> Any:
            return params[k]

    e = goal.suggest(Fixed(), space)
    assert name == "calibrate" and e.weights(n) == {"attn": [1.0] * n, "mlp": [1.0] * n, "embed": 1.0}
    v = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with edited(lm, targets(lm.arch, v, e.weights(n))):
        weighted = {k: x.clone() for k, x in lm.model.state_dict().items()}
    with orthogonalized(lm, v):
        plain = lm.model.state_dict()
        assert all(torch.equal(weighted[k], x) for k, x in plain.items())


def test_the_chosen_calibration_exports_the_weights_the_edit_core_gives(
    ready: tuple[Any, RunLayout], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from refusalkit.export.cli import write_model

    lm, layout = ready
    out = optimize_calibration(layout, _opts(harmful_floor=0.0), lm=lm, say=quiet)
    point = next(t for t in out["trials"] if t["trial"] == out["chosen"])
    e = CalibrationEdit.model_validate(point["edit"])
    active = RunFolder(layout).active_edit("calibrate")
    assert active.direction is not None
    n = lm.arch.n_layers
    assert active.direction.meta["weights"] == e.weights(n)
    from refusalkit.report.active_edit import edit_numbers

    # the card's, banner's and page's numbers: the chosen trial's verification beside the unedited model's
    rows = {r.label: r for r in edit_numbers(RunFolder(layout), active).measured()}
    held = rows["or_bench_hard_test refused, held out (the paper's refusal phrases)"]
    assert held.original.endswith("/6") or "/6 " in held.original
    assert "first-token KL on held-out harmless prompts (vs. original)" in rows
    with edited(lm, targets(lm.arch, active.direction.vector, e.weights(n))):
        expected = {k: x.clone() for k, x in lm.model.state_dict().items()}
    state = {k: x.clone() for k, x in lm.model.state_dict().items()}
    assert any(not torch.equal(expected[k], state[k]) for k in state)  # the edit changes something
    folder = write_model(layout.root, lm, edit="calibrate")
    assert all(torch.equal(x, state[k]) for k, x in lm.model.state_dict().items())  # restored
    written: dict[str, torch.Tensor] = {}
    for f in folder.glob("*.safetensors"):
        written |= load_file(str(f))
    assert written and all(torch.equal(written[k], expected[k]) for k in written)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    from refusalkit.calibrate.report import calibrate_section

    section = calibrate_section(layout) or ""
    assert "The calibration search (--goal calibrate)" in section
    assert (
        f"<td>{out['chosen']} * <b>(active)</b></td>" in section and "or_bench_hard_test refused" in section
    )
    card = (folder / "README.md").read_text()
    assert (
        f"per-layer weights w (W <- W - w u u^T W), chosen by `refusalkit optimize --goal calibrate` (trial {out['chosen']}"
        in card
    )


# ---- the goals side by side -----------------------------------------------------------------------------


def test_goal_remove_is_the_default_and_goal_alone_does_not_make_a_choosing_call_a_search() -> None:
    assert OptimizeOptions().goal == "remove"
    assert OptimizeOptions(goal="calibrate", trial=3).choosing_only()
    assert OptimizeOptions(goal="calibrate", harmful_floor=0.5).choosing_only()
    assert not OptimizeOptions(goal="calibrate", trials=3).choosing_only()
    with pytest.raises(ValueError):
        OptimizeOptions(goal="other")


def test_the_calibration_search_needs_its_data_before_any_model(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import refusalkit.models.loading as loading

    layout = calibrate_run(make_lm("qwen2"), tmp_path)
    monkeypatch.setattr(loading, "load_model", lambda *_a, **_k: pytest.fail("loaded a model"))
    with pytest.raises(
        RefusalkitError, match=r"optimize --goal calibrate needs the over-refusal.*--data-dir"
    ):
        optimize_calibration(layout, _opts(data_dir=str(tmp_path / "none")), say=quiet)


def test_the_search_seeds_from_refusalkit_calibrates_pick_and_resumes_after_choosing(
    ready: tuple[Any, RunLayout],
) -> None:
    from refusalkit.calibrate.options import CalibrateOptions

    lm, layout = ready
    copts = CalibrateOptions(n_val=6, floor=0.0, kl_max=100.0, judge_val=False)
    pick = calrun.calibrate(layout, copts.model_copy(update={"lam": 0.5}), lm=lm, say=quiet)
    out = optimize_calibration(layout, _opts(trials=3, harmful_floor=0.0), lm=lm, say=quiet)
    first = next(t for t in out["trials"] if t["seed"] == "calibrate")
    e = CalibrationEdit.model_validate(first["edit"])
    assert (e.layer, e.position, e.lam) == (pick["layer"], pick["position"], 0.5)
    assert read_json(layout.calibrated)["source"] == "search"  # the choice is now the calibration
    # the rerun resumes the same study (its seeds' place was fixed when it was made)
    again = optimize_calibration(layout, _opts(trials=4, harmful_floor=0.0), lm=lm, say=quiet)
    assert again["trials_run"] == 1 and len(again["trials"]) == 4
