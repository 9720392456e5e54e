"""The measure stage on a tiny run, the report built from its artifacts, compare, and a Chromium render."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_model, tiny_tokenizer
from refusalkit.cli import main
from refusalkit.errors import RefusalkitError
from refusalkit.models.adapters import resolve_arch
from refusalkit.models.loading import LoadedModel
from refusalkit.pipeline import Run
from refusalkit.report import build_report, collect, headline
from refusalkit.report.compare import compare_runs
from refusalkit.settings import build_settings
from refusalkit.utils import read_json, write_json

MEASURE = ["refusal_judges", "safety", "coherence", "corpus_ce", "projections", "gsm8k", "truthfulqa"]


def _data_dir(root: Path) -> Path:
    """Benign made-up stand-ins for every file the run reads."""
    data = root / "data"
    for name, stem in (
        ("stand_in_a.json", "Describe the imaginary gadget"),
        ("stand_in_b.json", "Describe a sunny day"),
    ):
        rows = [{"instruction": f"{stem} number {i}.", "category": f"made_up_{i % 2}"} for i in range(12)]
        write_json(data / name, rows)
    (data / "corpus").mkdir()
    (data / "corpus" / "wikitext2_tokenized_test.txt").write_text(
        "The tiny corpus has plain words in it. " * 30
    )
    (data / "gsm8k").mkdir()
    (data / "gsm8k" / "test.jsonl").write_text(
        "\n".join(
            json.dumps({"question": f"What is {i} plus 1?", "answer": f"{i}+1\n#### {i + 1}"})
            for i in range(3)
        )
    )
    (data / "truthfulqa").mkdir()
    with (data / "truthfulqa" / "TruthfulQA.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["Question", "Best Answer", "Correct Answers", "Incorrect Answers"])
        w.writeheader()
        for i in range(3):
            w.writerow(
                {
                    "Question": f"Made-up question {i}?",
                    "Best Answer": "Yes",
                    "Correct Answers": "Yes; Indeed",
                    "Incorrect Answers": "No; Never",
                }
            )
    return data


def _settings(data: Path, **extra: Any) -> Any:
    return build_settings(
        {
            "model": "tiny-qwen2",
            "harmful_train": str(data / "stand_in_a.json"),
            "harmless_train": str(data / "stand_in_b.json"),
            "n_train": 4,
            "n_val": 2,
            "n_test": 3,
            "filter_train": False,
            "filter_val": False,
            "kl_threshold": 1e9,
            "induce_threshold": -1e9,
            "max_new_tokens": 8,
            "batch_size": 4,
            "gen_batch_size": 4,
            "export_checkpoint": False,
            "data_dir": str(data),
            "coherence_n": 2,
            "corpus_windows": 2,
            "corpus_window_tokens": 16,
            "gsm8k_n": 2,
            "gsm8k_max_new_tokens": 6,
            "truthfulqa_n": 2,
            "measurements": MEASURE,  # GSM8K is opt-in by default; these tests cover every measurement
            **extra,
        },
        environ={},
    )


def _lm() -> LoadedModel:
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    return LoadedModel(model, tok, resolve_arch(model), "tiny-qwen2", "memory", "tiny-qwen2-0")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_run")
    data = _data_dir(root)
    run = Run(root / "run", _settings(data), lm=_lm())
    run.run_all()
    return root / "run"


def test_measure_writes_every_artifact(tiny_run: Path) -> None:
    for name in MEASURE:
        assert (tiny_run / "measure" / f"{name}.json").is_file(), name
    summary = read_json(tiny_run / "measure" / "summary.json")
    assert summary["not_measured"] == {"safety": read_json(tiny_run / "measure" / "safety.json")["reason"]}
    judges = read_json(tiny_run / "measure" / "refusal_judges.json")
    assert set(judges["rows"]) == {p.stem for p in (tiny_run / "evaluate" / "completions").glob("*.json")}
    proj = read_json(tiny_run / "measure" / "projections.json")
    assert len(proj["harmful"]) == 2 and len(proj["harmful"][0]) == 4  # [n_prompts][n_layers]


def test_measure_resumes_and_recomputes_only_what_changed(tiny_run: Path) -> None:
    data = Path(read_json(tiny_run / "manifest.json")["settings"]["data_dir"])
    before = {n: read_json(tiny_run / "measure" / f"{n}.json")["finished_at"] for n in MEASURE}
    run = Run(tiny_run, _settings(data, gsm8k_n=3), lm=_lm())
    run.measure()
    after = {n: read_json(tiny_run / "measure" / f"{n}.json")["finished_at"] for n in MEASURE}
    assert read_json(tiny_run / "measure" / "gsm8k.json")["original"]["n"] == 3
    assert all(before[n] == after[n] for n in MEASURE if n != "gsm8k")
    Run(tiny_run, _settings(data), lm=_lm()).measure()  # back to the fixture's settings
    (tiny_run / "measure" / "projections.json").unlink()  # a lost artifact is recomputed, alone
    Run(tiny_run, _settings(data), lm=_lm()).measure()
    assert (tiny_run / "measure" / "projections.json").is_file()
    assert read_json(tiny_run / "measure" / "coherence.json")["finished_at"] == before["coherence"]


def test_safety_judge_end_to_end_flags_out_of_format_answers(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    judge_dir = tmp_path / "judge"
    judge = _lm()
    judge.model.save_pretrained(judge_dir)
    judge.tokenizer.save_pretrained(judge_dir)
    path = run / "evaluate" / "completions" / "harmful__ablation.json"
    d = read_json(path)
    d["rows"][0]["completion"] = " ".join(["a long benign made-up answer"] * 5)  # long enough to be judged
    write_json(path, d)
    data = Path(read_json(run / "manifest.json")["settings"]["data_dir"])
    Run(run, _settings(data, judge_model=str(judge_dir), gsm8k_n=2), lm=_lm()).measure()
    safety = read_json(run / "measure" / "safety.json")
    assert safety["measured"] and safety["judge"]["spec"] == str(judge_dir)
    abl = safety["settings"]["ablation"]
    assert abl["rows"][0]["rule"] == "judge" and abl["rows"][0]["verdict"] == "invalid"
    assert abl["invalid"] == 1 and abl["safe"] == abl["short_reply_safe"] == 2
    assert all(r["judge"].startswith(str(judge_dir)) for r in abl["rows"])
    page = build_report(run).html.read_text()
    assert "1 invalid" in page and "safety" not in collect(run).gaps


def test_missing_benchmark_files_fail_before_any_model_work(tiny_run: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "measure")
    data = Path(read_json(tiny_run / "manifest.json")["settings"]["data_dir"])
    settings = _settings(data, data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(RefusalkitError) as err:
        Run(tmp_path / "run", settings, lm=_lm()).measure()
    msg = str(err.value)
    assert "corpus_ce" in msg and "gsm8k" in msg and "truthfulqa" in msg
    assert not (tmp_path / "run" / "measure" / "coherence.json").exists()


def test_report_builds_from_a_tiny_run(tiny_run: Path) -> None:
    built = build_report(tiny_run)
    page = built.html.read_text()
    for heading in (
        "Results",
        "Direction selection",
        "Candidate directions",
        "Refusal and safety rates",
        "Projections on the direction",
        "Completions side by side",
        "Settings and manifest",
    ):
        assert heading in page
    assert 'src="http' not in page and "<link" not in page and "<script" not in page.lower()
    assert page.count("data:image/png;base64,") >= 4
    numbers = json.loads(built.json.read_text())  # strict JSON: no NaN
    assert numbers["headline"]["layer"] is not None
    assert numbers["headline"]["corpus_ce"]["baseline"] > 0
    assert "safety" in numbers["gaps"] and "not measured" in page
    assert "Describe the imaginary gadget" not in page  # harmful instructions hidden by default
    assert "made_up_" in page  # ... shown by category


def test_report_escapes_model_output(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for key in ("harmful__baseline", "harmless__baseline"):
        path = run / "evaluate" / "completions" / f"{key}.json"
        d = read_json(path)
        d["rows"][0]["completion"] = "<script>alert('x')</script><img src=x onerror=alert(1)>"
        d["rows"][0]["instruction"] = "<b>bold</b> " + d["rows"][0]["instruction"]
        write_json(path, d)
    page = build_report(run, show_harmful=True).html.read_text()
    assert "<script>" not in page and "<img src=x" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page


def test_report_marks_gaps_for_missing_artifacts(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "partial"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "measure")
    (run / "extract" / "candidates.safetensors").unlink()
    (run / "select" / "candidate_scores.json").write_text("{not json")
    built = build_report(run)
    page = built.html.read_text()
    assert {"candidate directions", "candidate scores", "gsm8k", "coherence"} <= set(built.gaps)
    assert page.count("not measured:") >= 4
    numbers = json.loads(built.json.read_text())
    assert numbers["headline"]["gsm8k"] == {"original": None, "edited": None}


def test_report_states_the_edited_model_and_its_numbers(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report opens with the run's active edit (here the direction: no search) and that edit's own
    numbers; --edit names another, an edit the run does not have is an error, not a gap."""
    from refusalkit.evaluation.refusal import as_rate

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    built = build_report(run)
    edited = json.loads(built.json.read_text())["edited"]
    assert edited["choice"] == "direction" and edited["label"].startswith(
        "orthogonalized weights (the paper's"
    )
    orth = as_rate(read_json(run / "evaluate" / "refusal_rates.json")["harmful"]["orthogonalized"])
    assert orth is not None and f"= {orth['k']}/{orth['n']}" in edited["rows"][0]["edited"]
    assert "The edited model" in built.html.read_text()
    with pytest.raises(RefusalkitError, match="has no chosen edit"):
        build_report(run, edit="search")
    assert main(["report", str(run), "--edit", "search"]) == 2
    assert "has no chosen edit (search/chosen.json is missing)" in capsys.readouterr().err
    assert main(["report", str(run), "--edit", "direction"]) == 0
    shutil.rmtree(run / "select")
    built = build_report(run)
    assert "has no selected direction" in built.gaps["edited model"]
    assert json.loads(built.json.read_text())["edited"] is None


def test_report_of_an_empty_folder_is_all_gaps(tmp_path: Path) -> None:
    built = build_report(tmp_path)
    assert "manifest and settings" in built.gaps and "refusal rates" in built.gaps
    assert "not measured" in built.html.read_text()
    with pytest.raises(RefusalkitError, match="not found"):
        collect(tmp_path / "missing")


def test_suffix_section_embeds_pngs(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "suffix").mkdir()
    write_json(run / "suffix" / "analysis.json", {"model": "tiny", "cosine_drop": 0.5, "layers": [1, 2]})
    shutil.copy(_png(tmp_path), run / "suffix" / "cosine.png")
    page = build_report(run).html.read_text()
    assert "cosine_drop" in page and "cosine.png" in page


def _png(tmp: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    path = tmp / "x.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def test_headline_and_compare(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = headline(collect(tiny_run))
    assert set(h["refusal"]) == {"baseline", "ablation", "actadd", "orthogonalized"}
    text = compare_runs([tiny_run, tmp_path], out=tmp_path / "cmp.md")
    assert "corpus CE" in text and tiny_run.name in text
    assert (tmp_path / "cmp.md").read_text().startswith("| run |")
    assert main(["compare", str(tiny_run), str(tiny_run), "--out", str(tmp_path / "cmp.html")]) == 0
    assert "<table>" in (tmp_path / "cmp.html").read_text()
    assert main(["report", str(tiny_run)]) == 0
    assert "report.html" in capsys.readouterr().out


def test_report_renders_in_headless_chromium(tiny_run: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    from PIL import Image, ImageStat

    page = build_report(tiny_run).html
    shot = tmp_path / "report.png"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        page.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    assert shot.is_file()
    img = Image.open(shot).convert("L")
    assert img.size == (1280, 2000)
    stat = ImageStat.Stat(img)
    assert stat.stddev[0] > 20, "the screenshot is blank"
    top = ImageStat.Stat(img.crop((0, 0, 1280, 120)))
    assert top.mean[0] < 120, "the dark header did not render"


# ---- figures ---------------------------------------------------------------------------------------------


def test_a_failing_figure_is_a_marked_gap_not_a_traceback(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from refusalkit.report import plots as P

    def broken(*_args: Any, **_kwargs: Any) -> str:
        raise ValueError("'yerr' must not contain negative values")

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr(P, "rate_bars", broken)
    with caplog.at_level("WARNING"):
        built = build_report(run)
    page = built.html.read_text()
    assert "refusal and safety rates" in caplog.text and "yerr" in caplog.text
    assert "could not be drawn" in page and page.count("data:image/png;base64,") >= 3
    assert json.loads(built.json.read_text())["headline"]["layer"] is not None


def test_report_reads_every_rate_layout(tiny_run: Path, tmp_path: Path) -> None:
    """evaluate/refusal_rates.json as older runs wrote it ({refusal_rate, refused, ...}) and as the one
    rate record ({rate, k, ...}) give the same numbers, when measure/ is missing."""
    from refusalkit.evaluation.refusal import rate

    numbers = []
    for layout in ("old", "record"):
        run = tmp_path / layout
        shutil.copytree(tiny_run, run)
        shutil.rmtree(run / "measure")
        path = run / "evaluate" / "refusal_rates.json"
        rates = read_json(path)
        for ps in ("harmful", "harmless"):
            for st in rates[ps]:
                n = 3
                k = 3 if st == "baseline" else 0  # exactly 1 and exactly 0
                r = rate(k, n)
                old = {"refusal_rate": r["rate"], "refused": k, "n": n, "ci95": r["ci95"], "coeff": 0.0}
                rates[ps][st] = old if layout == "old" else r
        write_json(path, rates)
        built = build_report(run)
        numbers.append(json.loads(built.json.read_text())["headline"]["refusal"])
        assert "could not be drawn" not in built.html.read_text()
    assert numbers[0] == numbers[1]
    assert numbers[0]["baseline"] == 1.0 and numbers[0]["ablation"] == 0.0


def test_kl_spread_shown_when_recorded(tiny_run: Path, tmp_path: Path) -> None:
    """Median and max KL over prompts appear under the mean when coherence.json has them, and older
    files without them still build."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = run / "measure" / "coherence.json"
    coherence = read_json(path)
    coherence["kl"]["ablation"] = {
        "mean": 0.125,
        "median": 0.0625,
        "max": 0.875,
        "per_prompt": [0.0625, 0.875],
    }
    coherence["kl"]["actadd"] = {"mean": 0.5}  # an older file: the mean alone
    coherence["kl"].pop("orthogonalized", None)
    write_json(path, coherence)
    page = build_report(run).html.read_text()
    assert "0.125<br><span" in page and "median 0.062 · max 0.875" in page
    assert page.count("median ") == 1
    h = headline(collect(run))
    assert h["kl_max"] == {"ablation": 0.875, "actadd": None, "orthogonalized": None}
