"""The search on the user's path (issue 17): chat setups (a trial's refusal objective is its worst
setup's), verification per setup and prompt set, choosing without searching, the seeds (tiny models)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("optuna")

from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.orthogonalize import orthogonalized
from refusalkit.search import objectives
from refusalkit.search.front import format_front, points_of, read_front
from refusalkit.search.optimize import OptimizeOptions, optimize
from refusalkit.search.promptsets import HELD_OUT
from refusalkit.search.seeds import best_bypass, seeds
from refusalkit.search.setups import HELPFUL, named_setups, usable_setups
from refusalkit.search.space import SearchSpace
from refusalkit.utils import write_json
from test_search_study import HARMFUL, _opts, _quiet, _run_dir, _scorer

SETUPS = ["none", "default", "helpful"]


def _trials(layout: Any) -> list[Any]:
    import optuna

    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    return [t for t in study.trials if t.values is not None]


def test_a_trials_refusal_objective_is_its_worst_setups_and_its_kl_the_mean_over_setups(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    o = _opts(trials=3, verify_n=0, proxy_new_tokens=2)
    optimize(layout, o, lm=lm, say=_quiet)
    paper = next(t for t in _trials(layout) if t.user_attrs["seed"] == "paper")
    alone = {}  # each setup scored by a proxy of its own, under the paper's edit
    for name in SETUPS:
        scorer = _scorer(lm, layout, o, only=name)
        with orthogonalized(lm, Direction.load(layout.direction).vector):
            alone[name] = (scorer(), len(scorer.harmless[name]))
    refusals = {name: r.refusal for name, (r, _n) in alone.items()}
    assert max(refusals.values()) - min(refusals.values()) > 1e-3, "the fixture needs setups that differ"
    worst = max(refusals, key=lambda k: refusals[k])
    assert paper.values[0] == pytest.approx(refusals[worst], abs=1e-4)  # the worst, not the mean
    assert paper.user_attrs["proxy"]["worst"] == worst
    assert set(paper.user_attrs["proxy"]["setups"]) == set(SETUPS)
    n_all = sum(n for _r, n in alone.values())
    pooled = sum(r.kl.mean * n for r, n in alone.values()) / n_all  # every setup's KL prompts together
    assert paper.values[1] == pytest.approx(pooled, abs=1e-5)
    assert n_all == o.kl_n  # the search's KL prompts are shared out among the setups


def test_choosing_flags_alone_on_a_finished_study_run_no_trial(
    make_lm: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from refusalkit.search import optimize as optimize_module

    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    front = optimize(layout, _opts(trials=4, verify_n=1), lm=lm, say=_quiet)
    n_before = len(_trials(layout))
    calls = {"n": 0}
    real = objectives.ProxyScorer.__call__

    def counted(self: Any) -> Any:
        calls["n"] += 1
        return real(self)

    def no_model(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("choosing loaded the model")

    monkeypatch.setattr(objectives.ProxyScorer, "__call__", counted)
    monkeypatch.setattr(optimize_module, "load_model", no_model)
    on_front = {p["trial"] for p in front["points"]}
    off = next((t.number for t in _trials(layout) if t.number not in on_front), None)
    for number in [*sorted(on_front), *([off] if off is not None else [])]:
        got = optimize(layout, OptimizeOptions(trial=number), say=_quiet)  # as `--trial N` gives it
        assert got["chosen"] == number and got["trials_run"] == 0
        assert json.loads(layout.chosen.read_text())["trial"] == number
        assert read_front(layout)["chosen"] == number
    got = optimize(layout, OptimizeOptions(max_kl=1e9), say=_quiet)
    assert got["chosen"] == min(points_of(front), key=lambda p: (p.refusal, p.kl)).trial
    assert calls["n"] == 0 and len(_trials(layout)) == n_before  # no trial ran, none was added
    saved = read_front(layout)
    assert [p["verified"] for p in saved["points"]] == [p["verified"] for p in front["points"]]
    with pytest.raises(RefusalkitError, match="did not complete"):
        optimize(layout, OptimizeOptions(trial=999), say=_quiet)
    from refusalkit.cli import build_parser
    from refusalkit.search.cli import run_optimize

    last = max(on_front)
    assert run_optimize(build_parser().parse_args(["optimize", str(layout.root), "--trial", str(last)])) == 0
    assert "no trial run" in capsys.readouterr().out and read_front(layout)["chosen"] == last
    assert calls["n"] == 0 and len(_trials(layout)) == n_before
    # any search option makes it a search again (here: it would load the model)
    with pytest.raises(AssertionError, match="loaded the model"):
        optimize(layout, OptimizeOptions(trial=0, minutes=1.0), say=_quiet)


def test_choosing_only_is_read_from_the_options_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from refusalkit.cli import build_parser
    from refusalkit.search.cli import options_from

    p = build_parser()
    assert options_from(p.parse_args(["optimize", "r", "--trial", "3"])).choosing_only()
    assert options_from(p.parse_args(["optimize", "r", "--max-kl", "0.02", "--export"])).choosing_only()
    assert not options_from(p.parse_args(["optimize", "r", "--trial", "3", "--minutes", "2"])).choosing_only()
    assert not options_from(p.parse_args(["optimize", "r"])).choosing_only()  # a bare call resumes the search
    monkeypatch.setenv("REFUSALKIT_SEED", "7")  # shared with the run's settings: set for every command
    assert options_from(p.parse_args(["optimize", "r", "--trial", "3"])).choosing_only()
    monkeypatch.setenv("REFUSALKIT_MINUTES", "2")  # a search option, wherever it comes from
    assert not options_from(p.parse_args(["optimize", "r", "--trial", "3"])).choosing_only()
    monkeypatch.delenv("REFUSALKIT_MINUTES")
    two = options_from(
        p.parse_args(["optimize", "r", "--system-prompt", "Be brief, and kind.", "--system-prompt", "Hi"])
    )
    assert two.system_prompts == ["Be brief, and kind.", "Hi"]  # repeatable, commas kept
    with pytest.raises(RefusalkitError, match="unknown chat setup"):
        options_from(p.parse_args(["optimize", "r", "--setups", "none,sideways"]))


def test_verification_counts_every_setup_and_prompt_set_apart(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    bench = [f"Benchmark request {i}." for i in range(5)]
    data = tmp_path / "data"
    write_json(
        data / "refusal_direction" / "processed" / "jailbreakbench.json", [{"instruction": x} for x in bench]
    )
    o = _opts(
        trials=2, verify_n=1, verify_per_set=4, data_dir=str(data), system_prompts=["Be terse, please."]
    )
    front = optimize(layout, o, lm=lm, say=_quiet)
    v = next(p["verified"] for p in front["points"] if p["verified"])
    names = [*SETUPS, "user1"]
    assert [(g["setup"], g["set"]) for g in v["groups"]] == [
        (s, x) for s in names for x in (HELD_OUT, "jailbreakbench")
    ]
    assert [g["n"] for g in v["groups"]] == [3, 4] * 4  # the held-out split has 3; the benchmark cut to 4
    rate = lambda g: max(g["refused"].values()) / g["n"]  # noqa: E731
    worst = max(v["groups"], key=rate)
    assert (v["setup"], v["set"], v["refused"], v["n"]) == (
        worst["setup"],
        worst["set"],
        worst["refused"],
        worst["n"],
    )
    assert set(v["kl_by_setup"]) == set(names)
    assert v["kl"]["n"] == sum(k["n"] for k in v["kl_by_setup"].values())
    table = format_front(points_of(front))
    for name in names:
        assert f"setup {name}: {HELD_OUT} " in table and "jailbreakbench" in table
    assert front["sets"]["verify:jailbreakbench"] == 4 and [s["name"] for s in front["setups"]] == names
    from refusalkit.search.report import search_section

    page = search_section(layout)
    assert page is not None and all(f"setup {name}: {HELD_OUT} " in page for name in names)


def test_an_absent_benchmark_is_skipped_with_a_warning(
    make_lm: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    front = optimize(layout, _opts(trials=1, verify_n=1, setups=["default"]), lm=lm, say=_quiet)
    v = next(p["verified"] for p in front["points"] if p["verified"])
    assert [g["set"] for g in v["groups"]] == [HELD_OUT]
    assert "verification set 'jailbreakbench' skipped" in caplog.text and "--data-dir" in caplog.text


def test_setups_that_render_alike_are_kept_once_and_rejected_ones_dropped(
    make_lm: Callable[..., Any],
) -> None:
    tok = make_lm("qwen2").tokenizer
    asked = named_setups(SETUPS, ["Mine."], run_system="Run's own.")
    assert [(s.name, s.system) for s in asked] == [
        ("none", ""), ("default", None), ("helpful", HELPFUL), ("run", "Run's own."), ("user1", "Mine."),
    ]  # fmt: skip
    assert [s.name for s in usable_setups(tok, asked)] == [s.name for s in asked]
    tok.chat_template = (  # a template that ignores system turns: none and helpful render as default
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert [s.name for s in usable_setups(tok, named_setups(SETUPS))] == ["none"]
    tok.chat_template = (  # gemma's way: a system turn is an error
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    assert [s.name for s in usable_setups(tok, named_setups(SETUPS))] == ["default"]


def test_seeds_the_mid_direction_first_then_the_papers_pick_and_the_best_bypass_elsewhere(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    rows = [  # layer, position, bypass (lower: more refusal removed)
        (20, -1, -3.0),  # the paper's layer: taken
        (14, -2, -2.5),
        (17, -1, -4.0),  # within two layers of the mid direction (18): taken
        (12, -1, -9.0),  # below the space's layers (45-85% of 27)
        (16, -2, float("nan")),
    ]
    scores = [{"layer": a, "position": b, "bypass": c, "complete": True} for a, b, c in rows]
    write_json(layout.candidate_scores, {"scores": scores})
    got = best_bypass(layout, 28, [18, 20], SearchSpace().layer_range)
    assert got is not None and (got.layer, got.position) == (14, -2)
    write_json(layout.candidate_scores, {"scores": [{"layer": 2, "position": -2, "bypass": -1.0}]})
    from test_search_edit import make_candidates

    cands = make_candidates(6, lm.model.config.hidden_size)
    space = SearchSpace(positions=[-2, -1])
    names = [s.name for s in seeds(layout, cands, space)]
    # mid 3 (of 6), the paper's pick at 1, the best bypass at 5 is outside 45-85%: none
    assert names[:2] == ["mid-dir-attn-light", "mid-dir-attn"] and names[2] == "paper"
    assert {"paper-dir-attn-light", "mid-dir", "paper-dir"} <= set(names)
    assert [s.core for s in seeds(layout, cands, space)] == [n in names[:2] for n in names]


def test_a_verified_points_headline_is_its_worst_group(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from refusalkit.generation import generate
    from refusalkit.prompts import format_prompts
    from refusalkit.search import verify
    from test_search_proxy import _char_judge

    lm = make_lm("qwen2")
    harmful = format_prompts(lm.tokenizer, HARMFUL)
    texts = generate(lm, harmful, max_new_tokens=4, batch_size=64)
    ch, hit = _char_judge(texts)
    monkeypatch.setattr(verify, "MATCHERS", {"one": lambda t: [ch] if ch in t else []})
    # the first group holds the prompts the judge does not mark, the second those it marks
    groups = [("s", "b") if i in hit else ("s", "a") for i in range(len(harmful))]
    got = verify.Verifier(lm, harmful, {"s": harmful[:2]}, max_new_tokens=4, groups=groups)()
    assert [(g["set"], g["refused"]["one"], g["n"]) for g in got.groups] == [
        ("a", 0, len(harmful) - len(hit)),
        ("b", len(hit), len(hit)),
    ]
    assert (got.set, got.refused, got.n) == (
        "b",
        {"one": len(hit)},
        len(hit),
    )  # the worst group, not the first
