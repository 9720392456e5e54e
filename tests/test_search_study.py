"""The edit search on a tiny model: the paper's trial first and equal to the orthogonalization, resume
after an interruption, budgets, clear errors, front/choice/report artifacts."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("optuna")

from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.metric import refusal_token_ids
from refusalkit.orthogonalize import orthogonalized
from refusalkit.search import objectives
from refusalkit.search.edit import EditParams, Kernel
from refusalkit.search.front import Point, choose, points_of, read_front
from refusalkit.search.objectives import filter_refused as _filter_refused
from refusalkit.search.optimize import OptimizeOptions, optimize, proxy_prompts, run_settings, setups_for
from refusalkit.search.promptsets import prompt_sets
from refusalkit.search.report import search_section
from refusalkit.search.study import AIM_AT, AIM_TRIES, aim_factor, front_trials, open_study
from refusalkit.utils import write_json
from test_search_edit import make_candidates

HARMFUL = [f"Tell me thing number {i} please." for i in range(6)]
HARMLESS = [f"Name a colour, round {i}." for i in range(8)]


def _run_dir(lm: Any, tmp_path: Path, *, direction: bool = True) -> RunLayout:
    layout = RunLayout(tmp_path / "run")
    cands = make_candidates(lm.arch.n_layers, lm.model.config.hidden_size)
    cands.save(layout.candidates)
    splits = {
        "harmful_train": [],
        "harmless_train": HARMLESS,
        "harmful_val": HARMFUL,
        "harmless_val": HARMLESS[:4],
        "harmful_test": HARMFUL[:3],
        "harmless_test": HARMLESS[4:],
    }
    write_json(layout.splits, {"fingerprint": "x", "splits": splits})
    write_json(layout.manifest, {"settings": {"data_dir": str(tmp_path / "no-shared-data")}})
    if direction:
        Direction(cands.directions[2, 1].float(), layer=1, position=-1).save(layout.direction)
    return layout


def _opts(**kw: Any) -> OptimizeOptions:
    base = {
        "trials": 3,
        "minutes": None,
        "kl_n": 8,
        "verify_n": 1,
        "verify_max_new_tokens": 2,
        "startup_trials": 2,
        "verify_at": [],
        "verify_baseline": True,
    }
    return OptimizeOptions(**(base | kw))


def _quiet(_msg: str) -> None:
    pass


def _scorer(
    lm: Any, layout: RunLayout, o: OptimizeOptions, only: str | None = None
) -> objectives.ProxyScorer:
    """The search's proxy for this run (every setup, or the one named ``only``), filtered as the search
    filters it."""
    s = run_settings(layout)
    setups = [x for x in setups_for(lm, s, o) if only in (None, x.name)]
    harmful, harmless = proxy_prompts(lm, setups_for(lm, s, o), prompt_sets(layout, s, o))
    keep = [x.name for x in setups]
    scorer = objectives.ProxyScorer(
        lm, {k: v for k, v in harmful.items() if k in keep}, {k: v for k, v in harmless.items() if k in keep},
        refusal_token_ids(lm.tokenizer, s.refusal_tokens), 32, new_tokens=o.proxy_new_tokens,
    )  # fmt: skip
    _filter_refused(scorer)
    return scorer


def test_search_writes_front_and_the_paper_trial_is_the_orthogonalization(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    over = tmp_path / "over-data" / "over_refusal"  # one over-refusal set: OKTest's is missing, skipped
    over.mkdir(parents=True)
    over.joinpath("or_bench_hard_test.json").write_text(
        json.dumps([{"instruction": f"kill task {i}"} for i in range(4)])
    )
    opts = _opts(data_dir=str(over.parent), verify_over_refusal=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        front = optimize(layout, opts, lm=lm, say=_quiet)
    assert not [w for w in caught if "out of range" in str(w.message)]  # the seeds lie in the space
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())

    import optuna

    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    trials = [t for t in study.trials if t.values is not None]
    assert len(trials) == 3
    # the core seeds (mid-depth direction, attention-heavy) run first, then the paper's pick
    assert [t.user_attrs["seed"] for t in trials] == ["mid-dir-attn-light", "mid-dir-attn", "paper"]
    paper = trials[2]
    assert EditParams.model_validate(paper.user_attrs["edit"]) == EditParams.orthogonalization(1, -1)
    # Score the paper's orthogonalization directly, under the same setups; the trial must report the same.
    scorer = _scorer(lm, layout, _opts())
    with orthogonalized(lm, Direction.load(layout.direction).vector):
        want = scorer()
    assert paper.values[0] == pytest.approx(want.refusal, abs=1e-5)
    assert paper.values[1] == pytest.approx(want.kl.mean, abs=1e-5)

    saved = read_front(layout)
    assert saved["chosen"] == front["chosen"] and saved["points"]
    assert any(p["verified"] for p in saved["points"])
    v = next(p["verified"] for p in saved["points"] if p["verified"])
    assert (
        set(v["refused"]) == {"paper", "heretic"}
        and v["n"] == 3
        and set(v["kl"]) >= {"mean", "median", "max"}
        and set(v["echoed"]) == {"paper", "heretic"}  # the search gives the verification its requests
        and all(0 <= v["echoed"][j] <= v["refused"][j] for j in v["refused"])
    )
    assert saved["baseline"]["n"] == 3 and saved["baseline"]["kl"]["max"] == pytest.approx(0.0, abs=1e-9)
    # the over-refusal set beside the harmful counts, for the unedited model and each verified point
    for record in (saved["baseline"], v):
        assert list(record["over_refusal"]) == ["or_bench_hard_test"]
        assert {j: r["n"] for j, r in record["over_refusal"]["or_bench_hard_test"].items()} == {
            "paper": 3,
            "broad": 3,
        }
    chosen = json.loads(layout.chosen.read_text())
    assert len(chosen["kernels"]["attn"]) == lm.arch.n_layers
    html = search_section(layout)
    assert html is not None and html.count("data:image/png;base64,") == 2
    assert html.count("over-refusal (paper / broad): or_bench_hard_test") == 1 + sum(
        bool(p["verified"]) for p in saved["points"]
    )  # the unedited model's line and each verified point's


def test_resume_after_interruption_continues_the_same_study(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna

    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    real_call = objectives.ProxyScorer.__call__
    calls = {"n": 0}

    def interrupted(self: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_call(self)

    monkeypatch.setattr(objectives.ProxyScorer, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize(layout, _opts(trials=5), lm=lm, say=_quiet)
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    storage = f"sqlite:///{layout.study}"
    before = optuna.load_study(study_name="edit-search", storage=storage).trials
    done = [(t.number, t.params, t.values) for t in before if t.state.name == "COMPLETE"]
    assert len(done) == 2 and before[2].state.name == "FAIL"

    monkeypatch.setattr(objectives.ProxyScorer, "__call__", real_call)
    optimize(layout, _opts(trials=5), lm=lm, say=_quiet)
    after = optuna.load_study(study_name="edit-search", storage=storage).trials
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert len(complete) == 5
    assert [(t.number, t.params, t.values) for t in complete[:2]] == done  # the old trials are kept
    seeds = [t.user_attrs.get("seed") for t in complete]
    interrupted = before[2].user_attrs["seed"]
    assert seeds.count(interrupted) == 1  # the interrupted seed ran on resume, once
    assert len(set(seeds) - {None}) == len([x for x in seeds if x])  # no seed ran twice
    assert max(t.number for t in complete) >= 5  # numbering continued


def test_budget_too_small_is_clear_and_loses_nothing(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    import optuna

    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    optimize(layout, _opts(trials=2, verify_n=0), lm=lm, say=_quiet)
    front_before = layout.front.read_text()
    with pytest.raises(RefusalkitError, match="time budget"):
        optimize(layout, _opts(trials=4, minutes=1e-6, verify_n=0), lm=lm, say=_quiet)
    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    assert len([t for t in study.trials if t.values is not None]) == 2
    assert layout.front.read_text() == front_before


def test_missing_candidates_and_empty_front_are_clear(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    lm = make_lm("qwen2")
    empty = RunLayout(tmp_path / "empty")
    with pytest.raises(RefusalkitError, match="no candidates"):
        optimize(empty, _opts(), lm=lm, say=_quiet)
    assert not empty.study.exists()
    study = open_study(tmp_path / "s" / "study.db", "fp", 0, 2)
    with pytest.raises(RefusalkitError, match="no completed trial"):
        front_trials(study)
    with pytest.raises(RefusalkitError, match="empty"):
        choose([])
    with pytest.raises(RefusalkitError, match="another model"):
        open_study(tmp_path / "s" / "study.db", "other", 0, 2)
    with pytest.raises(RefusalkitError, match="optimize"):
        read_front(empty)
    assert search_section(empty) is None


def test_search_without_a_paper_pick(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    lm = make_lm("llama")
    layout = _run_dir(lm, tmp_path, direction=False)
    front = optimize(layout, _opts(trials=2, verify_n=0, sources=["per_layer"]), lm=lm, say=_quiet)
    points = points_of(front)
    assert points and all(p.edit.source == "per_layer" for p in points)
    assert all(p.edit.position == -1 for p in points)  # default: the last position only
    assert all(p.seed in (None, "mid-dir", "mid-dir-attn", "mid-dir-attn-light") for p in points)


def _pt(trial: int, refusal: float, kl: float, verified: tuple[int, float] | None = None) -> Point:
    proxy = {"refusal": refusal, "kl": {"mean": kl}}
    v = (
        {"refused": {"paper": verified[0], "heretic": verified[0]}, "n": 100, "kl": {"mean": verified[1]}}
        if verified
        else None
    )
    return Point(trial, EditParams(), proxy, verified=v)


def test_choose_rules() -> None:
    pts = [
        _pt(0, 0.0, 0.2, (1, 0.21)),
        _pt(1, 0.1, 0.05, (8, 0.04)),
        _pt(2, 0.3, 0.01, (30, 0.012)),
        _pt(3, 0.5, 0.001),
    ]
    assert choose(pts).trial == 0
    assert choose(pts, max_kl=0.05).trial == 1
    assert choose(pts, max_refusals=0.1).trial == 1
    assert choose(pts, trial=3).trial == 3
    with pytest.raises(RefusalkitError, match=r"lowest is 0\.0120"):
        choose(pts, max_kl=0.005)
    with pytest.raises(RefusalkitError, match="not on the front"):
        choose(pts, trial=9)


def test_cli_lists_the_front_and_rejects_bad_options(
    make_lm: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    from refusalkit.cli import build_parser
    from refusalkit.search.cli import options_from, run_optimize

    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    front = optimize(layout, _opts(trials=2), lm=lm, say=_quiet)
    parser = build_parser()
    assert run_optimize(parser.parse_args(["optimize", str(layout.root), "--list"])) == 0
    out = capsys.readouterr().out
    assert "refused (paper/heretic)" in out and f"*{front['chosen']:>5}" in out
    args = parser.parse_args(
        ["optimize", str(layout.root), "--minutes", "2.5", "--sources", "per_layer,candidate"]
    )
    opts = options_from(args)
    assert opts.minutes == 2.5 and opts.sources == ["per_layer", "candidate"] and opts.trials == 40
    assert options_from(parser.parse_args(["optimize", "x", "--positions=-1,-3"])).positions == [-1, -3]
    with pytest.raises(RefusalkitError, match="--trials"):
        options_from(parser.parse_args(["optimize", str(layout.root), "--trials", "0"]))
    with pytest.raises(RefusalkitError, match="known: interpolated"):
        options_from(parser.parse_args(["optimize", str(layout.root), "--sources", "sideways"]))


def test_a_choice_that_finds_nothing_keeps_the_front(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    with pytest.raises(RefusalkitError, match="no front point has KL"):
        optimize(layout, _opts(trials=2, max_kl=1e-12), lm=lm, say=_quiet)
    saved = read_front(layout)
    assert saved["chosen"] is None and saved["points"] and any(p["verified"] for p in saved["points"])
    said: list[str] = []
    front = optimize(
        layout, _opts(trials=2, verify_n=0), lm=lm, say=said.append
    )  # no new trial or generation
    assert front["trials_run"] == 0 and not said
    assert [p["verified"] for p in front["points"]] == [p["verified"] for p in saved["points"]]
    assert front["chosen"] is not None and layout.chosen.is_file()


def test_verification_picks_within_max_kl_then_fills_up() -> None:
    from refusalkit.search.verification import to_verify as _to_verify

    pts = [_pt(0, 0.0, 0.2), _pt(1, 0.02, 0.05), _pt(2, 0.1, 0.03), _pt(3, 0.3, 0.01), _pt(4, 0.5, 0.001)]
    assert [p.trial for p in _to_verify(pts, 2, None)] == [0, 1]
    assert [p.trial for p in _to_verify(pts, 2, 0.02)] == [3, 4]
    assert [p.trial for p in _to_verify(pts, 3, 0.02)] == [3, 4, 2]  # filled up by increasing KL
    # one point per KL budget first (the lowest expected refusal within it), then n more
    assert [p.trial for p in _to_verify(pts, 0, None, [0.04, 0.005])] == [2, 4]
    assert [p.trial for p in _to_verify(pts, 1, 0.02, [0.04, 0.005])] == [2, 4, 3]
    assert [p.trial for p in _to_verify(pts, 1, None, [1e-9, 0.5])] == [0, 1]  # nothing within; no repeat


def test_verify_at_reads_a_comma_list_and_refuses_nonpositive_budgets() -> None:
    assert OptimizeOptions(verify_at="0.02, 0.003").verify_at == [0.02, 0.003]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="KL budgets must be positive"):
        OptimizeOptions(verify_at=[0.02, 0.0])


def test_scaled_edit_multiplies_every_weight() -> None:
    e = EditParams(
        source="interpolated", layer=1.5, attn=Kernel(peak=1.5, position=2, minimum=0.5, width=2), embed=0.4
    )
    half = e.scaled(0.5)
    assert half.attn.weights(5) == [w * 0.5 for w in e.attn.weights(5)]
    assert half.mlp.weights(5) == [0.5] * 5 and half.embed == pytest.approx(0.2)
    assert half.model_copy(update={"attn": e.attn, "mlp": e.mlp, "embed": e.embed}) == e  # nothing else moved


def test_search_aims_a_trial_at_a_kl_level_no_trial_reached(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    import optuna

    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    optimize(layout, _opts(trials=1, verify_n=0), lm=lm, say=_quiet)  # the paper's trial alone
    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    paper_kl = study.trials[0].values[1]
    level = paper_kl / 10
    study = None
    # The seeds still queued run first; then one trial aimed at the level, from the point nearest above it.
    optimize(layout, _opts(trials=6, verify_n=0, verify_at=[level]), lm=lm, say=_quiet)
    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    done = [t for t in study.trials if t.values is not None]
    aimed = [t for t in done if t.user_attrs.get("seed") == f"aim-kl-{level:g}"]
    assert aimed, [t.user_attrs.get("seed") for t in done]
    first = aimed[0]
    assert all("aim" not in t.user_attrs.get("seed", "") for t in done if t.number < first.number)
    # the core seeds run before the aims, every other seed after them
    order = [t.user_attrs.get("seed") for t in done]
    assert order[:2] == ["mid-dir-attn-light", "mid-dir-attn"] and order[2] == first.user_attrs["seed"]
    assert "paper" not in order[: order.index(first.user_attrs["seed"])]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    before = [t for t in done if t.number < first.number]
    start = min((t for t in before if t.values[1] > level), key=lambda t: t.values[1])
    factor = (AIM_AT * level / start.values[1]) ** 0.5  # one point: the square law
    assert first.user_attrs["aim"] == {"from": start.number, "factor": pytest.approx(factor)}
    want = EditParams.model_validate(start.user_attrs["edit"]).scaled(first.user_attrs["aim"]["factor"])
    assert EditParams.model_validate(first.user_attrs["edit"]) == want
    assert first.values[1] < start.values[1]  # a smaller edit of the same shape costs less KL
    assert len(aimed) <= AIM_TRIES
    for later in aimed[1:]:  # further tries start from the same base, with the power read off the tries
        assert later.user_attrs["aim"]["from"] == start.number


def _expected_factor(points: list[tuple[float, float]], target: float) -> float:
    """The factor the aim rule should give, worked out here without ``aim_factor``: the two tries nearest
    the target in log KL, KL = a f^2 + b f^3 through them solved as a 2x2 system, and the curve's
    smallest positive root at the target (numpy); where that fit does not hold (a <= 0, or no root on
    its rising branch), a power law through the two in log-log."""
    import numpy as np

    (f1, k1), (f2, k2) = sorted(points, key=lambda p: abs(math.log(p[1] / target)))[:2]
    a, b = np.linalg.solve([[f1**2, f1**3], [f2**2, f2**3]], [k1, k2])
    roots = [r.real for r in np.roots([b, a, 0.0, -target]) if abs(r.imag) < 1e-12 and r.real > 0]
    top = -2 * a / (3 * b) if b < 0 else math.inf  # the curve rises on (0, top)
    rising = [r for r in roots if r <= top]
    if a > 0 and rising and top >= max(f1, f2):
        return float(min(rising))
    power = math.log(k2 / k1) / math.log(f2 / f1)
    return f1 * (target / k1) ** (1 / power)


def test_a_second_level_aims_from_the_edit_the_first_level_scaled_with_all_its_tries(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    import optuna

    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    optimize(layout, _opts(trials=1, verify_n=0), lm=lm, say=_quiet)
    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    paper_kl = study.trials[0].values[1]
    levels = [paper_kl / 4, paper_kl / 40]
    study = None
    optimize(layout, _opts(trials=8, verify_n=0, verify_at=levels), lm=lm, say=_quiet)
    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    done = [t for t in study.trials if t.values is not None]
    second = [t for t in done if t.user_attrs.get("seed") == f"aim-kl-{levels[1]:g}"]
    assert second, [(t.user_attrs.get("seed"), t.values) for t in done]
    t2 = second[0]
    before = [t for t in done if t.number < t2.number]
    # the lowest-KL point before it is a try at the first level: a scaled copy, so the base is its root
    lowest = min(before, key=lambda t: t.values[1])
    assert "aim" in lowest.user_attrs, [(t.user_attrs.get("seed"), t.values) for t in before]
    root = lowest.user_attrs["aim"]["from"]
    assert t2.user_attrs["aim"]["from"] == root and "aim" not in study.trials[root].user_attrs
    tries = [(t.user_attrs["aim"]["factor"], t.values[1]) for t in before if "aim" in t.user_attrs]
    want = _expected_factor([(1.0, study.trials[root].values[1]), *tries], AIM_AT * levels[1])
    assert t2.user_attrs["aim"]["factor"] == pytest.approx(want, rel=1e-6)
    assert want != pytest.approx(
        (AIM_AT * levels[1] / study.trials[root].values[1]) ** 0.5
    )  # not the square law
    assert EditParams.model_validate(t2.user_attrs["edit"]) == EditParams.model_validate(
        study.trials[root].user_attrs["edit"]
    ).scaled(t2.user_attrs["aim"]["factor"])


def test_aim_factor_fits_kl_as_square_plus_cube_and_assumes_the_square_with_one_point() -> None:
    a, b = 0.033, -0.009  # the default model's attention-heavy seed measured about this
    kl = lambda f: a * f**2 + b * f**3  # noqa: E731
    assert aim_factor([(1.0, 0.03)], 0.0075) == pytest.approx(0.5)  # one point: sqrt(0.0075 / 0.03)
    assert aim_factor([(1.0, kl(1.0)), (0.85, kl(0.85))], kl(0.3)) == pytest.approx(0.3, rel=1e-6)
    # the two points nearest the target decide (a third, far one would bend the fit)
    three = [(1.0, kl(1.0)), (0.5, kl(0.5)), (0.2, kl(0.2) * 1.3)]
    assert aim_factor(three, kl(0.75)) == pytest.approx(0.75, rel=1e-6)
    # a power law through the same two points reads low factors' KL too high (what the fit replaced)
    power = math.log(kl(1.0) / kl(0.85)) / math.log(1 / 0.85)
    assert (0.3**power) * kl(1.0) > 1.1 * kl(0.3)
    # points no such curve fits (KL flat in the weights: noise or saturation): a secant in log-log
    flat = [(1.0, 0.03), (0.5, 0.03 * 0.99)]  # power ~0, so the square law from the nearest point
    assert aim_factor(flat, 0.03 / 4) == pytest.approx(0.5 * (0.25 / 0.99) ** 0.5)
    steep = [(1.0, 0.03), (0.6, 0.03 * 0.6**3.5)]  # a < 0: the power 3.5 of the two points
    assert aim_factor(steep, 0.03 * 0.4**3.5) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="positive"):
        aim_factor([(0.0, 0.01)], 0.005)
