"""The ``llm_judge`` measurement: the run's own model judges its saved completions in the measure stage,
and the report shows its four class rates beside the keyword rates (tiny random model, no data files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from refusalkit.evaluation import llm_judge
from refusalkit.evaluation.llm_judge import LLMJudge
from refusalkit.evaluation.verdicts import CLASSES
from refusalkit.pipeline import Run
from refusalkit.report import LLM_CLASSES, build_report, collect
from refusalkit.settings import DEFAULT_MEASUREMENTS, MEASUREMENTS, PRESETS, Settings


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "model": "tiny-qwen2",
        "n_train": 4,
        "n_val": 2,
        "n_test": 2,
        "max_new_tokens": 4,
        "batch_size": 4,
        "gen_batch_size": 4,
        "filter_train": False,
        "filter_val": False,
        "kl_threshold": 1e9,  # a random model: every candidate must survive the rules
        "induce_threshold": -1e9,
        "data_dir": "unused",
        "dtype": "float32",
        "measurements": ["refusal_judges", "llm_judge"],  # neither needs a data file
    }
    return Settings(**{**base, **overrides})


@pytest.fixture
def judged(make_lm: Callable[..., Any], tmp_path: Path) -> tuple[Path, Any]:
    lm = make_lm("qwen2")
    out = tmp_path / "run"
    run = Run(out, _settings(), lm=lm)
    for stage in ("extract", "select", "evaluate", "measure"):
        getattr(run, stage)()
    run.save_manifest()
    return out, lm


def test_opt_in_everywhere() -> None:
    assert "llm_judge" in MEASUREMENTS and "llm_judge" not in DEFAULT_MEASUREMENTS
    assert "llm_judge" not in PRESETS["paper"]("data")["measurements"]
    assert LLM_CLASSES == CLASSES  # the report's column order is the judge's


def test_measure_stage_judges_every_saved_completion(judged: tuple[Path, Any]) -> None:
    out, lm = judged
    result = json.loads((out / "measure" / "llm_judge.json").read_text())
    assert result["measured"] is True and result["judge"]["fingerprint"] == lm.fingerprint
    files = sorted(p.stem for p in (out / "evaluate" / "completions").glob("*__*.json"))
    assert sorted(result["rows"]) == files and len(files) >= 6
    # the verdicts are the run's own model's, judged directly
    key = "harmful__baseline"
    rows = json.loads((out / "evaluate" / "completions" / f"{key}.json").read_text())["rows"]
    direct = LLMJudge(lm).judge([r["instruction"] for r in rows], [r["completion"] for r in rows])
    assert [r["label"] for r in result["rows"][key]] == [v.label for v in direct]
    rates = result["rates"]["harmful"]["baseline"]
    assert set(rates) == set(CLASSES)
    assert sum(r["k"] for r in rates.values()) == len(rows) == rates["refusal"]["n"]
    for label in CLASSES:
        assert rates[label]["k"] == sum(v.label == label for v in direct)
    summary = json.loads((out / "measure" / "summary.json").read_text())
    assert "llm_judge" in json.dumps(summary)


def test_an_up_to_date_judgement_is_not_recomputed(
    judged: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, lm = judged

    def fail(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("llm_judge was measured again")

    monkeypatch.setattr(llm_judge, "judge_completions", fail)
    Run(out, _settings(), lm=lm).measure()


def test_report_shows_the_class_rates_beside_the_keyword_rates(judged: tuple[Path, Any]) -> None:
    out, _ = judged
    result = json.loads((out / "measure" / "llm_judge.json").read_text())
    built = build_report(out)
    page = built.html.read_text()
    assert "LLM judge: refusal · compliance · partial · degenerate" in page
    want = result["rates"]["harmful"]["baseline"]
    cells = " · ".join(f"{want[c]['rate']:.2f}" for c in CLASSES)
    assert cells in page
    report = json.loads(built.json.read_text())
    assert report["headline"]["llm_judge"]["baseline"] == {c: want[c]["rate"] for c in CLASSES}
    assert "llm_judge" not in built.gaps


def test_a_run_without_it_has_no_gap_and_no_column(judged: tuple[Path, Any]) -> None:
    out, _ = judged
    (out / "measure" / "llm_judge.json").unlink()
    data = collect(out)
    assert "llm_judge" not in data.gaps and "llm_judge" not in data.measure
    built = build_report(out)
    assert "LLM judge:" not in built.html.read_text() and "llm_judge" not in built.gaps
    assert json.loads(built.json.read_text())["headline"]["llm_judge"]["baseline"] is None
