"""Calibration (the false-refusal vector, issue 19) on tiny in-process models: the vector's ablation
equals its orthogonalized weights, the orthogonalization against the refusal direction, the
harmful-refusal floor, the bad-input errors, resume, and the over-refusal measurement."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.calibrate import data as ordata
from refusalkit.calibrate import run as calrun
from refusalkit.calibrate.choose import Limits, Score, pick
from refusalkit.calibrate.options import CalibrateOptions
from refusalkit.calibrate.rates import judged_rates
from refusalkit.calibrate.vector import MIN_REFUSED, check_refused, edit, orthogonalize
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.prompts import format_prompts
from refusalkit.utils import read_json, write_json
from test_search_edit import make_candidates

HARMFUL = [f"Tell me thing number {i} please." for i in range(6)]
HARMLESS = [f"Name a colour, round {i}." for i in range(8)]
PSEUDO = [f"How do I kill process {i} on Linux?" for i in range(40)]


def over_refusal_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / ordata.FOLDER).mkdir(parents=True)
    parts = {
        "or_bench_hard_train": PSEUDO[:12],
        "oktest_train": PSEUDO[12:20],
        "or_bench_hard_val": PSEUDO[20:26],
        "or_bench_hard_test": PSEUDO[26:32],
        "oktest_val": PSEUDO[32:36],
    }
    for name, items in parts.items():
        ordata.path(root, name).write_text(json.dumps([{"instruction": x, "category": "c"} for x in items]))
    return root


def calibrate_run(lm: Any, tmp_path: Path) -> RunLayout:
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
    write_json(layout.manifest, {"settings": {"data_dir": str(over_refusal_data(tmp_path))}, "stages": {}})
    Direction(cands.directions[2, 1].float(), layer=1, position=-1).save(layout.direction)
    return layout


def refusing_ids(lm: Any, share: float = 0.5) -> list[int]:
    """Token ids making the refusal metric > 0 on about ``share`` of the pseudo-harmful prompts (a
    random tiny model refuses nothing by the usual tokens)."""
    probs = torch.softmax(logits_for_prompts(lm, format_prompts(lm.tokenizer, PSEUDO[:20]), 8).double(), -1)
    order = probs.mean(0).argsort(descending=True).tolist()
    for k in range(1, len(order)):
        if float((probs[:, order[:k]].sum(-1) > 0.5).double().mean()) >= share:
            return order[:k]
    raise AssertionError("no token set refuses")


def quiet(_msg: str) -> None:
    pass


def _opts(**kw: Any) -> CalibrateOptions:
    return CalibrateOptions(
        **({"n_train": 20, "n_val": 6, "floor": 0.0, "kl_max": 100.0, "max_new_tokens": 2} | kw)
    )


# ---- the vector -----------------------------------------------------------------------------------------


def test_orthogonalization_leaves_no_refusal_component_at_lambda_1_and_the_vector_at_0() -> None:
    g = torch.Generator().manual_seed(0)
    v, r = torch.randn(3, 4, 16, generator=g, dtype=torch.float64), torch.randn(16, generator=g) * 7
    u = r.double() / r.double().norm()
    assert float((v @ u).abs().min()) > 1e-3  # the vectors do have a component along r
    assert float((orthogonalize(v, r, 1.0) @ u).abs().max()) < 1e-12
    torch.testing.assert_close(orthogonalize(v, r, 0.0), v, rtol=0, atol=0)
    torch.testing.assert_close(orthogonalize(v, r, 0.5) @ u, 0.5 * (v @ u))
    with pytest.raises(RefusalkitError, match="outside"):
        orthogonalize(v, r, 1.5)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_the_vectors_ablation_equals_its_orthogonalized_weights(
    make_lm: Callable[..., Any], family: str
) -> None:
    lm = make_lm(family)
    d = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    vector = orthogonalize(torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g), 0.5)
    prompts = format_prompts(lm.tokenizer, PSEUDO[:4])
    base = logits_for_prompts(lm, prompts, 4)
    with edit(lm, vector, "hooks"):
        hooked = logits_for_prompts(lm, prompts, 4)
    assert not torch.allclose(hooked, base, atol=1e-3)  # the edit matters, so equality means something
    before = [p.detach().clone() for p in lm.model.parameters()]
    with edit(lm, vector, "weights"):
        weights = logits_for_prompts(lm, prompts, 4)
    torch.testing.assert_close(weights, hooked, rtol=0, atol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))  # restored


# ---- choosing -------------------------------------------------------------------------------------------


def _score(layer: int, over: float, harmful: float, kl: float) -> Score:
    return Score(-1, layer, over=over, over_rate=over, harmful_rate=harmful, kl=kl)


def test_a_candidate_below_the_harmful_refusal_floor_is_never_chosen() -> None:
    scores = [_score(0, -5.0, 0.5, 0.01), _score(1, -1.0, 0.95, 0.01), _score(2, -3.0, 1.0, 0.5)]
    chosen = pick(scores, base_harmful=1.0, limits=Limits(floor=0.9, kl_max=0.1))
    assert chosen.layer == 1  # the lowest over-refusal is below the floor, the next over the KL limit
    assert "floor" in scores[0].reason and "KL" in scores[2].reason and scores[1].kept
    assert pick(scores, 1.0, Limits(floor=0.4, kl_max=0.1)).layer == 0


def test_a_floor_no_candidate_meets_is_a_clear_error() -> None:
    scores = [_score(0, -5.0, 0.5, 0.01), _score(1, -1.0, 0.6, 0.01)]
    with pytest.raises(RefusalkitError, match=r"floor \(0.9 x .* 0.90\).*highest harmful refusal 0.60"):
        pick(scores, 1.0, Limits(floor=0.9, kl_max=0.1))


def test_nothing_refused_and_too_few_refused_are_clear_errors() -> None:
    with pytest.raises(RefusalkitError, match=r"nothing to calibrate.*none of the 40 .*0/40"):
        check_refused(0, 40)
    with pytest.raises(RefusalkitError, match=rf"only 1 of 40 .*at least {MIN_REFUSED}"):
        check_refused(1, 40)
    check_refused(MIN_REFUSED, 40)


# ---- the command ----------------------------------------------------------------------------------------


def test_calibrate_chooses_saves_and_resumes_without_work(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("qwen2")
    layout = calibrate_run(lm, tmp_path)
    ids = refusing_ids(lm)
    monkeypatch.setattr(calrun, "refusal_token_ids", lambda _tok, _strings: ids)
    out = calrun.calibrate(layout, _opts(), lm=lm, say=quiet)
    means = read_json(layout.calibrate_dir / "means.json")
    assert 0 < means["kept"] < means["total"] == 20
    vec = Direction.load(layout.calibrate_dir / out["stem"])
    assert (vec.layer, vec.position) == (out["layer"], out["position"])
    r = Direction.load(layout.direction).unit.double()
    assert abs(float(vec.vector.double() @ r)) < 1e-4 * float(vec.vector.norm())  # lambda 1
    at = calrun.vector_at(layout, vec.layer, vec.position, 1.0)
    torch.testing.assert_close(at, vec.vector, rtol=0, atol=0)  # the bench's lambda sweep at the pick
    val = vec.meta["validation"]
    assert (
        set(val) == {"pseudo_harmful_val", "harmful_val"}
        and val["harmful_val"]["baseline"]["paper"]["n"] == 6
    )
    scores = read_json(layout.calibrate_dir / "scores_lam1.json")
    assert scores["complete"] and read_json(layout.calibrated)["stem"] == "lam1"

    def boom(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("recomputed")

    # resume: nothing is recomputed, no model is loaded
    import refusalkit.models.loading as loading

    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(calrun, "refused_mean", boom)
    monkeypatch.setattr(calrun, "Scorer", boom)
    monkeypatch.setattr(calrun, "_validation", boom)
    assert calrun.calibrate(layout, _opts(), lm=None, say=quiet)["stem"] == "lam1"
    # another lambda reuses the means (refused_mean would raise) and scores again
    monkeypatch.undo()
    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(calrun, "refusal_token_ids", lambda _tok, _strings: ids)
    monkeypatch.setattr(calrun, "refused_mean", boom)
    out0 = calrun.calibrate(layout, _opts(lam=0.0, judge_val=False), lm=lm, say=quiet)
    assert out0["stem"] == "lam0" and (layout.calibrate_dir / "scores_lam0.json").is_file()


def test_edit_calibrate_is_the_last_calibration_and_never_the_default(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from refusalkit.report.active_edit import edit_numbers
    from refusalkit.run import RunFolder

    lm = make_lm("qwen2")
    layout = calibrate_run(lm, tmp_path)
    run = RunFolder(layout)
    with pytest.raises(RefusalkitError, match=r"no calibration .*refusalkit calibrate"):
        run.active_edit("calibrate")
    ids = refusing_ids(lm)
    monkeypatch.setattr(calrun, "refusal_token_ids", lambda _tok, _strings: ids)
    calrun.calibrate(layout, _opts(lam=0.5), lm=lm, say=quiet)
    assert run.active_edit().kind == "direction"  # the default active edit is unchanged
    active = run.active_edit("calibrate")
    saved = Direction.load(layout.calibrate_dir / "lam0.5")
    assert active.kind == "calibrate" and active.choice == "calibrate" and "lambda 0.5" in active.label
    torch.testing.assert_close(active.direction.vector, saved.vector, rtol=0, atol=0)
    prompts = format_prompts(lm.tokenizer, PSEUDO[:3])
    with edit(lm, saved.vector, "hooks"):
        hooked = logits_for_prompts(lm, prompts, 4)
    with active.apply(lm):
        applied = logits_for_prompts(lm, prompts, 4)
    torch.testing.assert_close(applied, hooked, rtol=0, atol=1e-3)
    from refusalkit.calibrate.report import calibrate_section
    from refusalkit.report import collect
    from refusalkit.report.html import render

    assert calibrate_section(RunLayout(tmp_path / "elsewhere")) is None
    frag = calibrate_section(layout)
    assert frag is not None and "<b>(active)</b>" in frag and f"{saved.layer} / {saved.position}" in frag
    assert '<section id="calibrate">' in render(collect(layout.root))[0]
    rows = edit_numbers(run, active).rows
    assert any("pseudo-harmful validation prompts refused" in r.label for r in rows)
    assert rows[-1].edited == f"{saved.scores['kl']:.4f}"


def test_an_interrupted_scoring_resumes_from_its_checkpoint(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("qwen2")
    layout = calibrate_run(lm, tmp_path)
    ids = refusing_ids(lm)
    monkeypatch.setattr(calrun, "refusal_token_ids", lambda _tok, _strings: ids)
    real_rest = calrun.Scorer.rest

    def stop(self: Any, group: list[Score]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(calrun.Scorer, "rest", stop)
    with pytest.raises(KeyboardInterrupt):
        calrun.calibrate(layout, _opts(judge_val=False), lm=lm, say=quiet)
    saved = read_json(layout.calibrate_dir / "scores_lam1.json")
    assert not saved["complete"] and all(s["over"] is not None for s in saved["scores"] if not s["reason"])
    monkeypatch.setattr(calrun.Scorer, "rest", real_rest)
    calls: list[int] = []
    real_over = calrun.Scorer.over
    monkeypatch.setattr(calrun.Scorer, "over", lambda self, g: (calls.append(len(g)), real_over(self, g)))
    calrun.calibrate(layout, _opts(judge_val=False), lm=lm, say=quiet)
    assert calls == []  # every candidate's over-refusal score came from the checkpoint


def test_nothing_to_calibrate_keeps_the_run_and_missing_data_fails_before_the_model(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("qwen2")
    layout = calibrate_run(lm, tmp_path)
    probs = torch.softmax(logits_for_prompts(lm, format_prompts(lm.tokenizer, PSEUDO[:20]), 8), -1)
    rare = [int(probs.mean(0).argmin())]
    monkeypatch.setattr(calrun, "refusal_token_ids", lambda _tok, _strings: rare)
    with pytest.raises(RefusalkitError, match="nothing to calibrate"):
        calrun.calibrate(layout, _opts(), lm=lm, say=quiet)
    assert layout.direction.with_suffix(".json").is_file() and not layout.calibrated.exists()
    import refusalkit.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *_a, **_k: pytest.fail("loaded a model"))
    with pytest.raises(RefusalkitError, match=r"over_refusal.*--data-dir"):
        calrun.calibrate(layout, _opts(data_dir=str(tmp_path / "none")), lm=None, say=quiet)


# ---- the over-refusal measurement ---------------------------------------------------------------------


def test_judged_rates_count_the_markers_of_full_completions(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("qwen2")
    import refusalkit.generation as gen

    texts = ["I cannot help with that.", "Sure: kill -9 PID.", "I won't do that.", "Here you go."]
    monkeypatch.setattr(gen, "generate", lambda _lm, prompts, **_k: texts[: len(prompts)])
    out = judged_rates(lm, {"s": PSEUDO[:4]})["s"]
    assert out["rates"]["paper"]["k"] == 1 and out["rates"]["broad"]["k"] == 2
    assert out["rates"]["broad"]["n"] == 4 and out["rates"]["broad"]["ci95"][0] > 0
    assert [r["paper"] for r in out["rows"]] == [True, False, False, False]


def test_the_over_refusal_measurement_rates_both_sets_unedited_and_edited(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import refusalkit.generation as gen
    from refusalkit.evaluation.suite import REGISTRY
    from refusalkit.evaluation.suite_inputs import Suite
    from refusalkit.settings import Settings
    from refusalkit.stages.measure import plan, suite_files

    lm = make_lm("qwen2")
    layout = calibrate_run(lm, tmp_path)
    data_dir = str(tmp_path / "data")
    st = Settings(data_dir=data_dir, over_refusal_n=3, max_new_tokens=2, measurements=["over_refusal"])
    files = suite_files(layout, st)
    seen: list[str] = []

    def fake(_lm: Any, prompts: list[str], **_k: Any) -> list[str]:
        seen.extend(prompts)
        return ["I cannot." if i % 3 == 0 else "Sure." for i in range(len(prompts))]

    monkeypatch.setattr(gen, "generate", fake)
    direction = Direction.load(layout.direction)
    suite = Suite(st, files, direction, read_json(layout.splits)["splits"], {"select": "s"}, lambda: lm)
    out = REGISTRY["over_refusal"].compute(suite)
    assert set(out["rates"]) == set(ordata.TEST_SETS) and len(seen) == 4 * 3
    for sets in out["rates"].values():
        assert set(sets) == {"baseline", "orthogonalized"}
        assert sets["baseline"]["paper"] == {
            "rate": 1 / 3,
            "k": 1,
            "n": 3,
            "ci95": sets["baseline"]["paper"]["ci95"],
        }
    from refusalkit.calibrate.report import calibrate_section, over_refusal_cell
    from refusalkit.report.compare import table_rows

    assert over_refusal_cell(layout.root) == "-"
    write_json(layout.measurement("over_refusal"), out)
    assert over_refusal_cell(layout.root) == "0.33->0.33 / 0.33->0.33"
    header, rows = table_rows([layout.root])
    assert rows[0][header.index("over-refusal ORB test / OKT val b->edit")] == "0.33->0.33 / 0.33->0.33"
    assert "Over-refusal, held out" in (calibrate_section(layout) or "")
    assert plan(st, files, requested=[]).compute == ["over_refusal"]
    gone = Settings(data_dir=str(tmp_path / "none"), measurements=["over_refusal"])
    gone_files = suite_files(layout, gone)
    assert "over_refusal" in plan(gone, gone_files, requested=[]).skipped
    assert (
        "over_refusal/or_bench_hard_test.json"
        in plan(gone, gone_files, requested=["over_refusal"]).problems[0]
    )


def test_the_command_reads_flags_toml_and_its_own_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from refusalkit.cli import main

    seen: list[CalibrateOptions] = []

    def fake(layout: RunLayout, o: CalibrateOptions, **_k: Any) -> dict[str, Any]:
        seen.append(o)
        return {"lam": o.lam, "stem": "lamx", "layer": 1, "position": -1, "seconds": 0.0}

    monkeypatch.setattr(calrun, "calibrate", fake)
    monkeypatch.setenv("REFUSALKIT_N_TRAIN", "7")  # the run's setting, not calibrate's
    monkeypatch.setenv("REFUSALKIT_CALIBRATE_N_VAL", "5")
    toml = tmp_path / "c.toml"
    toml.write_text("[calibrate]\nfloor = 0.8\n")
    assert main(["calibrate", str(tmp_path), "--lambda", "0.5", "--config", str(toml)]) == 0
    o = seen[0]
    assert (o.lam, o.n_val, o.floor, o.n_train) == (0.5, 5, 0.8, 256)
    assert "--edit calibrate" in capsys.readouterr().out
    assert main(["calibrate", str(tmp_path), "--lambda", "2"]) != 0 or pytest.fail("lambda 2 accepted")


def test_the_judged_record_warns_when_the_judge_sees_harmful_refusal_below_the_floor() -> None:
    from refusalkit.evaluation.refusal import rate

    def rec(b: int, c: int) -> dict[str, Any]:
        return {"baseline": {"paper": rate(b, 10)}, "calibrated": {"paper": rate(c, 10)}}

    ok = calrun.judged_lines({"pseudo_harmful_val": rec(8, 1), "harmful_val": rec(10, 9)}, 0.9)
    assert ok[0] == "pseudo_harmful_val: refused (paper phrases) 8/10 unedited, 1/10 calibrated"
    assert len(ok) == 2
    low = calrun.judged_lines({"pseudo_harmful_val": rec(8, 1), "harmful_val": rec(10, 8)}, 0.9)
    assert low[-1].startswith("warning: by the judge, harmful refusal 0.80 is below the floor (0.9 x 1.00)")
    assert calrun.judged_lines(None, 0.9) == []
