"""The run folder end to end on a tiny random model: artifacts, manifest, resume and stage skipping."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from refusalkit import pipeline
from refusalkit.directions import Candidates, Direction
from refusalkit.errors import RefusalkitError
from refusalkit.pipeline import Run, format_table
from refusalkit.settings import Settings

# Tiny models: extra threads only add overhead, and spin badly when other work shares the cores.

ARTIFACTS = [
    "manifest.json",
    "data/splits.json",
    "extract/candidates.safetensors",
    "extract/summary.json",
    "select/candidate_scores.json",
    "select/direction.safetensors",
    "select/direction.json",
    "evaluate/refusal_rates.json",
    "measure/summary.json",
    "model/config.json",
    "results.json",
]
COMPLETIONS = [
    "harmful__baseline",
    "harmful__ablation",
    "harmful__actadd",
    "harmful__orthogonalized",
    "harmless__baseline",
    "harmless__actadd",
]


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
    }
    if "measurements" in Settings.model_fields:
        base["measurements"] = ["refusal_judges"]  # the one measurement that needs no model or data files
    return Settings(**{**base, **overrides})


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def make(name: str) -> Callable[..., Any]:
        def fail(*_a: Any, **_k: Any) -> Any:
            raise AssertionError(f"{name} was called for a finished stage")

        return fail

    for name in names:
        monkeypatch.setattr(pipeline, name, make(name))


@pytest.fixture
def finished(make_lm: Callable[..., Any], tmp_path: Path) -> tuple[Path, Any, dict[str, Any]]:
    lm = make_lm("qwen2")
    out = tmp_path / "run"
    summary = Run(out, _settings(), lm=lm).run_all()
    return out, lm, summary


def test_run_all_writes_every_artifact(finished: tuple[Path, Any, dict[str, Any]]) -> None:
    out, _, summary = finished
    for rel in ARTIFACTS:
        assert (out / rel).is_file(), rel
    for key in COMPLETIONS:
        rows = json.loads((out / "evaluate" / "completions" / f"{key}.json").read_text())["rows"]
        assert len(rows) == 2 and all(isinstance(r["completion"], str) for r in rows)

    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"extract", "select", "evaluate", "export"}
    assert manifest["settings"]["n_train"] == 4 and manifest["model"]["name"] == "tiny-qwen2"
    assert {"torch", "transformers"} <= set(manifest["versions"])
    splits = json.loads((out / "data" / "splits.json").read_text())["splits"]
    assert {k: len(v) for k, v in splits.items()} == {
        "harmful_train": 4, "harmful_val": 2, "harmful_test": 2,
        "harmless_train": 4, "harmless_val": 2, "harmless_test": 2,
    }  # fmt: skip
    assert not set(splits["harmful_train"]) & set(splits["harmful_val"] + splits["harmful_test"])

    cands = Candidates.load(out / "extract" / "candidates.safetensors")
    assert cands.harmful_mean.shape == (13, 4, 64)  # ChatML's post-instruction tokens (byte-level), 4 layers
    scores = json.loads((out / "select" / "candidate_scores.json").read_text())["scores"]
    assert len(scores) == 13 * 4
    direction = Direction.load(out / "select" / "direction")
    assert direction.layer < 3 and -13 <= direction.position <= -1
    kept = [s for s in scores if s["kept"]]
    assert direction.scores["bypass"] == min(s["bypass"] for s in kept)
    p = direction.position + cands.n_positions
    assert torch.equal(direction.vector, cands.directions[p, direction.layer].float())

    assert summary["direction"]["layer"] == direction.layer
    assert set(summary["refusal_rates"]["harmful"]) == {"baseline", "ablation", "actadd", "orthogonalized"}
    assert "harmful refusal" in format_table(summary)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))


def test_second_run_skips_finished_stages(
    finished: tuple[Path, Any, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, lm, summary = finished
    stamps = {
        rel: (out / rel).stat().st_mtime_ns
        for rel in ARTIFACTS
        if rel not in ("manifest.json", "results.json")
    }
    _forbid(monkeypatch, "mean_activations", "score_candidates", "generate", "export_checkpoint", "carve")
    again = Run(out, _settings(), lm=lm).run_all()
    assert again["direction"] == summary["direction"]
    assert again["refusal_rates"] == summary["refusal_rates"]
    assert {rel: (out / rel).stat().st_mtime_ns for rel in stamps} == stamps


def test_deleted_artifact_reruns_only_its_stage(
    finished: tuple[Path, Any, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, lm, summary = finished
    before = json.loads((out / "select" / "candidate_scores.json").read_text())
    (out / "select" / "candidate_scores.json").unlink()
    calls: list[int] = []
    real = pipeline.score_candidates

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    _forbid(monkeypatch, "mean_activations", "generate", "export_checkpoint")
    monkeypatch.setattr(pipeline, "score_candidates", counting)
    again = Run(out, _settings(), lm=lm).run_all()
    assert calls == [1]
    assert json.loads((out / "select" / "candidate_scores.json").read_text()) == before
    assert again["direction"] == summary["direction"]


def test_changed_setting_reruns_from_its_stage(
    finished: tuple[Path, Any, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, lm, _ = finished
    _forbid(monkeypatch, "mean_activations", "score_candidates", "export_checkpoint")
    calls: list[int] = []
    real = pipeline.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", counting)
    Run(out, _settings(max_new_tokens=3), lm=lm).run_all()
    assert len(calls) == len(COMPLETIONS)  # evaluate reran; extract, select and export did not
    rates = json.loads((out / "evaluate" / "refusal_rates.json").read_text())
    assert rates["max_new_tokens"] == 3


def test_all_filtered_keeps_extract_and_writes_scores(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    lm = make_lm("qwen2")
    out = tmp_path / "run"
    run = Run(out, _settings(induce_threshold=1e9), lm=lm)
    with pytest.raises(RefusalkitError, match="filtered out"):
        run.run_all()
    assert (out / "extract" / "candidates.safetensors").is_file()
    assert (out / "extract" / "summary.json").is_file()
    scores = json.loads((out / "select" / "candidate_scores.json").read_text())["scores"]
    assert len(scores) == 13 * 4 and not any(s["kept"] for s in scores)
    assert all(s["reason"] for s in scores)
    assert not (out / "select" / "direction.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "extract" in manifest["stages"] and "select" not in manifest["stages"]

    # Loosened rules pick up from the saved extraction.
    with pytest.MonkeyPatch.context() as mp:
        _forbid(mp, "mean_activations")
        direction = Run(out, _settings(), lm=lm).select()
    assert (out / "select" / "direction.json").is_file() and direction.layer < 3


def test_filter_needs_prompts(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    """With the refusal filter on, a random model keeps too few prompts; the error says what to do."""
    lm = make_lm("qwen2")
    run = Run(tmp_path / "run", _settings(filter_train=True, n_train=2), lm=lm)
    with pytest.raises(RefusalkitError, match=r"filter|--no-filter-train"):
        run.extract()


def test_post_norm_family_skips_export(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    lm = make_lm("gemma2")
    out = tmp_path / "run"
    summary = Run(out, _settings(), lm=lm).run_all()
    assert "orthogonalized" not in summary["refusal_rates"]["harmful"]
    assert not (out / "model").exists()
    assert not (out / "evaluate" / "completions" / "harmful__orthogonalized.json").exists()
