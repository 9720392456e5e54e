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
from refusalkit.export import cli as export_cli
from refusalkit.pipeline import Run, format_table
from refusalkit.settings import Settings
from refusalkit.stages import data, evaluate, export, extract, select

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
        "dtype": "float32",  # the tiny models' dtype, whatever --dtype auto picks on this machine
    }
    if "measurements" in Settings.model_fields:
        base["measurements"] = ["refusal_judges"]  # the one measurement that needs no model or data files
    return Settings(**{**base, **overrides})


# Where each expensive call is looked up: the stage module that makes it.
CALLS = {
    "mean_activations": extract,
    "score_candidates": select,
    "generate": evaluate,
    "logits_for_prompts": evaluate,
    "write_model": export_cli,  # the export stage's writer (stages/export.py imports it when it runs)
    "carve": data,
    "load_model": pipeline,
}


def _forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def make(name: str) -> Callable[..., Any]:
        def fail(*_a: Any, **_k: Any) -> Any:
            raise AssertionError(f"{name} was called for a finished stage")

        return fail

    for name in names:
        monkeypatch.setattr(CALLS[name], name, make(name))


def _count(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(CALLS[name], name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        # generate: how many prompts it completes (settings share calls); other calls count 1
        calls.append(len(args[1]) if name == "generate" else 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(CALLS[name], name, counting)
    return calls


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
    _forbid(monkeypatch, "mean_activations", "score_candidates", "generate", "write_model", "carve")
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
    _forbid(monkeypatch, "mean_activations", "generate", "write_model")
    calls = _count(monkeypatch, "score_candidates")
    again = Run(out, _settings(), lm=lm).run_all()
    assert calls == [1]
    assert json.loads((out / "select" / "candidate_scores.json").read_text()) == before
    assert again["direction"] == summary["direction"]


def test_changed_setting_reruns_from_its_stage(
    finished: tuple[Path, Any, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, lm, _ = finished
    _forbid(monkeypatch, "mean_activations", "score_candidates", "write_model")
    calls = _count(monkeypatch, "generate")
    Run(out, _settings(max_new_tokens=3), lm=lm).run_all()
    # evaluate reran (orthogonalized reuses the ablation's completions; the other five settings share
    # one generate call); extract, select, export did not
    assert calls == [(len(COMPLETIONS) - 1) * 2]
    rates = json.loads((out / "evaluate" / "refusal_rates.json").read_text())
    assert rates["max_new_tokens"] == 3


def test_reuse_check_takes_the_ablation_logits_from_its_generation(
    finished: tuple[Path, Any, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, lm, _ = finished
    passes = _count(monkeypatch, "logits_for_prompts")
    Run(out, _settings(max_new_tokens=3), lm=lm).evaluate()
    assert passes == [
        1
    ]  # the orthogonalized weights' pass only: the ablation's logits came with its completions
    ortho = json.loads((out / "evaluate" / "completions" / "harmful__orthogonalized.json").read_text())
    assert ortho["reused"]["passed"] and ortho["reused"]["max_logit_diff"] <= ortho["reused"]["tolerance"]
    # resumed with the ablation's completions on disk: its logits are computed for the check
    (out / "evaluate" / "completions" / "harmful__orthogonalized.json").unlink()
    passes.clear()
    Run(out, _settings(max_new_tokens=3), lm=lm).evaluate()
    assert passes == [1, 1]


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
    manifest = json.loads((out / "manifest.json").read_text())
    assert "post-norm" in manifest["stages"]["export"]["skipped"]
    # The skip is recorded, so a rerun finds the stage done without asking the model again.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "export", lambda *_a, **_k: pytest.fail("export ran again"))
        assert Run(out, _settings(), lm=lm).export() is None


def test_finished_run_reruns_without_loading_the_model(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage fingerprints use the model's content fingerprint, computed without loading it."""
    from refusalkit.models.loading import load_model

    folder = tmp_path / "model"
    tiny = make_lm("qwen2")
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    settings = _settings(model=str(folder))
    out = tmp_path / "run"
    first = Run(out, settings, lm=load_model(str(folder), dtype="float32", device="cpu")).run_all()
    _forbid(monkeypatch, "load_model", "mean_activations", "score_candidates", "generate", "carve")
    again = Run(out, settings).run_all()
    assert again["direction"] == first["direction"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"].startswith("files-sha256:")

    # Other weights under the same name: every stage reruns.
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("}", ', "x": 1}', 1))
    monkeypatch.undo()
    calls = _count(monkeypatch, "mean_activations")
    Run(out, settings, lm=load_model(str(folder), dtype="float32", device="cpu")).extract()
    assert calls == [1, 1]  # harmful and harmless means again


def test_orthogonalized_completions_reuse_the_ablation(finished: tuple[Path, Any, dict[str, Any]]) -> None:
    out, _, summary = finished
    ortho = json.loads((out / "evaluate" / "completions" / "harmful__orthogonalized.json").read_text())
    ablation = json.loads((out / "evaluate" / "completions" / "harmful__ablation.json").read_text())
    assert ortho["reused"]["from"] == "ablation" and ortho["reused"]["passed"]
    assert 0 <= ortho["reused"]["max_logit_diff"] <= ortho["reused"]["tolerance"]
    assert ortho["rows"] == ablation["rows"]
    rates = json.loads((out / "evaluate" / "refusal_rates.json").read_text())
    assert rates["orthogonalized_reuse"] == ortho["reused"]
    assert (
        summary["refusal_rates"]["harmful"]["orthogonalized"]
        == summary["refusal_rates"]["harmful"]["ablation"]
    )


def test_failed_reuse_check_generates(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "REUSE_RTOL", -1.0)  # no difference passes
    calls = _count(monkeypatch, "generate")
    Run(tmp_path / "run", _settings(), lm=make_lm("qwen2")).evaluate()
    assert calls == [(len(COMPLETIONS) - 1) * 2, 2]  # the hook settings together, then the weights
    ortho = json.loads(
        (tmp_path / "run" / "evaluate" / "completions" / "harmful__orthogonalized.json").read_text()
    )
    assert ortho["reused"]["from"] is None and not ortho["reused"]["passed"]


def test_edited_data_file_gives_new_splits(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    """Splits are cached by the content of their sources, not by the file name."""
    data_file = tmp_path / "harmless.json"
    data_file.write_text(json.dumps([f"Describe made-up thing number {i}." for i in range(12)]))
    settings = _settings(harmless_train=str(data_file))
    run = Run(tmp_path / "run", settings, lm=make_lm("qwen2"))
    before = run.splits()["harmless_train"]
    data_file.write_text(json.dumps([f"Name made-up color number {i}." for i in range(12)]))
    after = Run(tmp_path / "run", settings, lm=make_lm("qwen2")).splits()["harmless_train"]
    assert all(x.startswith("Describe") for x in before) and all(x.startswith("Name") for x in after)


def test_manifest_stage_fingerprints_skips_and_records(tmp_path: Path) -> None:
    from refusalkit.layout import RunLayout
    from refusalkit.manifest import Manifest, SkipStage

    layout = RunLayout(tmp_path)
    artifact = tmp_path / "a.txt"
    runs: list[str] = []

    def compute() -> str:
        runs.append("x")
        artifact.write_text("x")
        return "computed"

    m = Manifest(layout)
    assert m.stage("s", {"k": 1}, [artifact], compute, lambda: "loaded") == "computed"
    assert Manifest(layout).stage("s", {"k": 1}, [artifact], compute, lambda: "loaded") == "loaded"
    assert Manifest(layout).stage("s", {"k": 2}, [artifact], compute, lambda: "loaded") == "computed"
    artifact.unlink()
    assert Manifest(layout).stage("s", {"k": 2}, [artifact], compute, lambda: "loaded") == "computed"
    assert runs == ["x", "x", "x"]

    def skip() -> str:
        raise SkipStage("does not apply")

    assert Manifest(layout).stage("t", {}, [tmp_path / "never"], skip, lambda: "loaded") is None
    assert Manifest(layout).data["stages"]["t"]["skipped"] == "does not apply"
    assert Manifest(layout).stage("t", {}, [tmp_path / "never"], skip, lambda: "loaded") == "loaded"


def test_shared_generation_equals_each_setting_alone(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    """The evaluate stage generates its hook settings together; each setting's completions equal
    generation under that setting's own intervention (the actadd coefficients included)."""
    from refusalkit.evaluation.coherence import intervention
    from refusalkit.generation import generate
    from refusalkit.prompts import format_prompts

    lm = make_lm("qwen2")
    settings = _settings(n_test=3, max_new_tokens=5, gen_batch_size=7)
    run = Run(tmp_path / "run", settings, lm=lm)
    run.evaluate()
    direction, splits = run.select(), run.splits()
    seen = set()
    for key in COMPLETIONS:
        prompt_set, name = key.split("__")
        if name == "orthogonalized":
            continue
        rows = json.loads((tmp_path / "run" / "evaluate" / "completions" / f"{key}.json").read_text())
        coeff = rows["setting"]["coeff"]
        assert (
            coeff
            == {"baseline": 0.0, "ablation": 0.0, "actadd": -1.0 if prompt_set == "harmful" else 1.0}[name]
        )
        instructions = splits[f"{prompt_set}_test"]
        with intervention(lm, name, direction, coeff):
            alone = generate(lm, format_prompts(lm.tokenizer, instructions), max_new_tokens=5, batch_size=3)
        assert [r["completion"] for r in rows["rows"]] == alone
        seen.add(tuple(alone))
    assert len(seen) > 2  # the settings gave different completions


@pytest.mark.parametrize("reuse_passes", [True, False])
def test_measure_reuses_ablation_for_orthogonalized_only_after_the_check(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reuse_passes: bool
) -> None:
    """Coherence and corpus CE take the orthogonalized numbers from the ablation when the evaluate
    stage's logit check passed (and say so), and compute them on the edited weights when it failed."""
    from refusalkit.evaluation import coherence as coh

    if not reuse_passes:
        monkeypatch.setattr(evaluate, "REUSE_RTOL", -1.0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i} and some more text" for i in range(400)))
    settings = _settings(
        measurements=["coherence", "corpus_ce"], corpus=str(corpus), corpus_windows=2, corpus_window_tokens=16,
        kl_n=4, coherence_n=2,
    )  # fmt: skip
    computed: list[str] = []
    real = coh.intervention

    def spy(lm: Any, setting: str, *a: Any, **k: Any) -> Any:
        computed.append(setting)
        return real(lm, setting, *a, **k)

    monkeypatch.setattr(coh, "intervention", spy)
    Run(tmp_path / "run", settings, lm=make_lm("qwen2")).run_all()
    cohe = json.loads((tmp_path / "run" / "measure" / "coherence.json").read_text())
    corp = json.loads((tmp_path / "run" / "measure" / "corpus_ce.json").read_text())
    if reuse_passes:
        assert "orthogonalized" not in computed
        assert cohe["orthogonalized_reuse"]["from"] == "ablation" and cohe["orthogonalized_reuse"]["passed"]
        assert cohe["kl"]["orthogonalized"] == cohe["kl"]["ablation"]
        assert corp["ce"]["orthogonalized"] == corp["ce"]["ablation"]
    else:
        assert "orthogonalized" in computed
        assert "orthogonalized_reuse" not in cohe and "orthogonalized_reuse" not in corp
        assert cohe["kl"]["orthogonalized"]["per_prompt"] != cohe["kl"]["ablation"]["per_prompt"]


def test_evaluate_resumes_only_the_missing_settings(
    finished: tuple[Path, Any, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted evaluate stage (one setting's file missing) regenerates that setting alone and
    keeps every other setting's saved completions."""
    out, lm, _ = finished
    done = out / "evaluate" / "completions"
    kept = {p.name: p.read_text() for p in done.glob("*.json")}
    (done / "harmless__actadd.json").unlink()
    (out / "evaluate" / "refusal_rates.json").unlink()
    calls = _count(monkeypatch, "generate")
    Run(out, _settings(), lm=lm).evaluate()
    assert calls == [2]  # the two harmless prompts of the one missing setting
    for name, text in kept.items():
        if name != "harmless__actadd.json":
            assert (done / name).read_text() == text
    again = json.loads((done / "harmless__actadd.json").read_text())
    assert again["rows"] and again["setting"]["coeff"] == 1.0


# ---- a fresh clone: data sets absent ------------------------------------------------------------------


def _without_data(tmp_path: Path, **overrides: Any) -> Settings:
    """The test settings with the measurements left at their defaults (not asked for by name) and a data
    folder that does not exist, as in a clone with no ../shared beside it."""
    values = _settings(data_dir=str(tmp_path / "no-shared-data"), kl_n=4, coherence_n=2).model_dump(
        exclude={"measurements"}
    )
    return Settings(**{**values, **overrides})


def test_defaults_skip_the_measurements_whose_data_is_missing(
    make_lm: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The main job finishes without the data folder: corpus CE and TruthfulQA are skipped with a warning
    that says how to add their data, and recorded as not measured; the rest is measured."""
    settings = _without_data(tmp_path)
    assert "measurements" not in settings.model_fields_set
    with caplog.at_level("WARNING", logger="refusalkit.pipeline"):
        Run(tmp_path / "run", settings, lm=make_lm("qwen2")).run_all()
    summary = json.loads((tmp_path / "run" / "measure" / "summary.json").read_text())
    assert set(summary["not_measured"]) >= {"corpus_ce", "truthfulqa"}
    assert {"refusal_judges", "coherence", "projections"} <= set(summary["measured"])
    why = summary["not_measured"]["corpus_ce"]
    assert "wikitext2_tokenized_test.txt not found" in why and "--data-dir" in why and "--corpus" in why
    warned = caplog.text
    assert "corpus_ce will be skipped" in warned and "truthfulqa will be skipped" in warned
    assert "--data-dir DIR holding truthfulqa/TruthfulQA.csv" in warned
    assert "topped up from builtin:harmless" in warned  # the KL pool's fallback is said, not silent


def test_asked_for_measurement_with_missing_data_fails_before_extraction(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--measurements corpus_ce without the corpus: one error in seconds, before any stage runs."""
    _forbid(monkeypatch, "mean_activations", "load_model")
    settings = _without_data(tmp_path, measurements=["refusal_judges", "corpus_ce", "truthfulqa"])
    with pytest.raises(RefusalkitError) as info:
        Run(tmp_path / "run", settings, lm=make_lm("qwen2")).run_all()
    message = str(info.value)
    assert "the run cannot start" in message
    assert "corpus_ce:" in message and "truthfulqa:" in message  # every problem at once
    assert "--corpus PATH" in message and "drop corpus_ce from --measurements" in message
    assert not (tmp_path / "run" / "extract").exists()


def test_check_lists_every_problem_before_loading_anything(tmp_path: Path) -> None:
    """A missing model, a missing data file and missing measure data: one error naming all three."""
    from refusalkit.layout import RunLayout

    missing_model, missing_data = tmp_path / "no-model", tmp_path / "harmful.json"
    settings = _without_data(
        tmp_path, model=str(missing_model), harmful_train=str(missing_data), measurements=["corpus_ce"]
    )
    with pytest.raises(RefusalkitError) as info:
        pipeline.check_inputs(RunLayout(tmp_path / "run"), settings, requested={"corpus_ce"})
    message = str(info.value)
    assert f"model: model '{missing_model}' not found" in message
    assert str(missing_data) in message and "corpus_ce:" in message
    # The same settings without the measure stage: that problem is not this command's.
    with pytest.raises(RefusalkitError) as info:
        pipeline.check_inputs(RunLayout(tmp_path / "run"), settings, stages=["extract", "select"])
    assert "corpus_ce" not in str(info.value)


def test_a_measurement_made_earlier_is_kept_when_its_data_is_gone(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    """A run measured where the data was, resumed where it is not: the earlier result stays."""
    lm, out = make_lm("qwen2"), tmp_path / "run"
    Run(out, _without_data(tmp_path), lm=lm).run_all()
    earlier = {
        "measurement": "corpus_ce",
        "measured": True,
        "fingerprint": "made-elsewhere",
        "ce": {"baseline": 2.5},
    }
    (out / "measure" / "corpus_ce.json").write_text(json.dumps(earlier))
    Run(out, _without_data(tmp_path, kl_n=3), lm=lm).run_all()  # the measure stage runs again
    assert json.loads((out / "measure" / "corpus_ce.json").read_text()) == earlier
    summary = json.loads((out / "measure" / "summary.json").read_text())
    assert "corpus_ce" in summary["measured"] and "truthfulqa" in summary["not_measured"]
