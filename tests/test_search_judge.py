"""The search's verification with an LLM judge (issue 18 item 4): four-class counts beside the keyword
counts, judged with the unedited weights, the front table's complied column, per-row verdicts saved
with hashes and no text, and `refusalkit judges RUN_DIR` reading them (tiny models)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("optuna")

from refusalkit.cli import main
from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation import judges_cmd
from refusalkit.evaluation.judge_prompt import DEFAULT_PROMPT, Calibration
from refusalkit.evaluation.llm_judge import LLMJudge
from refusalkit.evaluation.verdict_files import read_verdicts, write_verdicts
from refusalkit.evaluation.verdicts import CLASSES
from refusalkit.search import verify
from refusalkit.search.edit import EditParams, applied_edit
from refusalkit.search.front import Point, format_front, points_of, read_front
from refusalkit.search.optimize import optimize
from refusalkit.search.report import search_section
from refusalkit.search.verification import verifier
from refusalkit.utils import sha256_text
from test_search_study import _opts, _quiet, _run_dir


def _lm(make_lm: Callable[..., Any]) -> Any:
    return make_lm("qwen2", seed=1, max_position_embeddings=2048)  # the judge prompt is ~1k bytes


class Spy:
    """Every verification's completions and requests, as the judge was given them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs: list[tuple[str, list[str], list[str], list[tuple[str, str]]]] = []
        real = verify.Verifier.run

        def run(v: Any, desc: str = "verify", *, kl: bool = True) -> Any:
            gen = real(v, desc, kl=kl)
            self.runs.append((desc, list(gen.texts), list(v.requests), list(v.groups)))
            return gen

        monkeypatch.setattr(verify.Verifier, "run", run)


def _judged_run(make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A search verified with the run's own model as judge. A random model's judge says one class to
    everything, so its biases are set (a calibration file, as `refusalkit judges --fit` writes) from the
    unjudged verification's completions to split them among classes: counts that could be right by
    accident would test nothing."""
    lm = _lm(make_lm)
    layout = _run_dir(lm, tmp_path)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    spy = Spy(monkeypatch)
    optimize(layout, _opts(trials=3, verify_n=1), lm=lm, say=_quiet)
    texts = [t for _d, ts, _r, _g in spy.runs for t in ts]
    lp = LLMJudge(lm).label_logprobs([r for _d, _t, rs, _g in spy.runs for r in rs], texts)
    biases = {
        c: float((lp[:, 0] - lp[:, i]).quantile(q))
        for i, c, q in ((1, "compliance", 0.4), (2, "partial", 0.7))
    }
    cal = tmp_path / "judge_cal.json"
    cal.write_text(json.dumps({"llm": {"prompt": DEFAULT_PROMPT, "biases": biases}}))
    spy.runs.clear()
    front = optimize(
        layout, _opts(trials=3, verify_n=1, judge="local", judge_calibration=str(cal)), lm=lm, say=_quiet
    )
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    return lm, layout, front, spy


def test_judged_counts_equal_judging_the_same_completions_with_the_unedited_model(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, _, front, spy = _judged_run(make_lm, tmp_path, monkeypatch)
    verified = {p["trial"]: p["verified"] for p in front["points"] if p["verified"]}
    assert len(verified) == 1 and front["baseline"] is not None
    assert [d for d, *_ in spy.runs] == ["verify baseline", f"verify trial {next(iter(verified))}"]
    cal = Calibration.from_dict(json.loads((tmp_path / "judge_cal.json").read_text())["llm"])
    direct = LLMJudge(lm, calibration=cal)  # a fresh judge on the model as it is now: unedited
    labels: set[str] = set()
    for desc, texts, requests, groups in spy.runs:
        trial = next(iter(verified)) if desc.startswith("verify trial") else None
        v = verified[trial] if trial is not None else front["baseline"]
        want = direct.judge(requests, texts)
        for g in v["groups"]:
            rows = [w.label for w, x in zip(want, groups, strict=True) if x == (g["setup"], g["set"])]
            assert g["judged"] == {c: rows.count(c) for c in CLASSES}
        assert v["judged"] == next(
            g["judged"] for g in v["groups"] if g["setup"] == v["setup"] and g["set"] == v["set"]
        )
        assert v["judge"]["kind"] == "llm" and v["judge"]["key"]["spec"] == "local"
        assert sum(v["judged"].values()) == v["n"]
        labels |= {w.label for w in want}
    assert len(labels) >= 2, "the fixture's judge must give more than one class"


def test_the_judge_reads_with_the_unedited_weights(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, layout, front, spy = _judged_run(make_lm, tmp_path, monkeypatch)
    point = next(p for p in points_of(front) if p.verified)
    _desc, texts, requests, _groups = spy.runs[1]
    saved, _classes = read_verdicts(layout.search_dir / "completions" / f"trial_{point.trial}.json")
    recorded = torch.tensor([[v.logprobs[c] for c in CLASSES] for v in saved["llm"]])
    unedited = LLMJudge(lm).label_logprobs(requests, texts)
    with applied_edit(lm, Candidates.load(layout.candidates), point.edit):
        edited = LLMJudge(lm).label_logprobs(requests, texts)
    assert (edited - unedited).abs().max() > 1e-3, "the fixture's edit must move the judge's logits"
    assert torch.allclose(recorded, unedited, atol=1e-5, rtol=0)


def test_saved_rows_hold_hashes_and_verdicts_never_text(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, layout, front, spy = _judged_run(make_lm, tmp_path, monkeypatch)
    files = sorted((layout.search_dir / "completions").glob("*.json"))
    trial = next(p["trial"] for p in front["points"] if p["verified"])
    assert [f.name for f in files] == ["baseline.json", f"trial_{trial}.json"]
    for f, (_desc, texts, requests, groups) in zip(files, spy.runs, strict=True):
        raw = f.read_text()
        data = json.loads(raw)
        assert [r["sha256"] for r in data["rows"]] == [sha256_text(t) for t in texts]
        assert [(r["setup"], r["set"]) for r in data["rows"]] == groups
        assert all(set(r) == {"setup", "set", "index", "sha256", "verdicts"} for r in data["rows"])
        assert set(data["judges"]) == {"paper", "heretic", "llm"}
        for t in {*texts, *requests}:  # no completion and no request, whole or in part
            assert len(t) < 12 or (t[:12] not in raw and t[-12:] not in raw)
    with pytest.raises(ValueError, match="no text"):
        write_verdicts(tmp_path / "x.json", "x", {}, [{"sha256": "0", "completion": "text"}])


def test_front_table_shows_complied_beside_not_refused() -> None:
    kl = {"mean": 0.02, "median": 0.01, "max": 0.3}
    v = {"refused": {"paper": 10, "heretic": 38}, "n": 100, "kl": kl, "echoed": None, "groups": []}
    judged = v | {"judged": {"refusal": 38, "compliance": 46, "partial": 14, "degenerate": 2}}
    points = [
        Point(1, EditParams(), {"refusal": 0.1, "kl": kl}, verified=judged),
        Point(2, EditParams(), {"refusal": 0.1, "kl": kl}, verified=v),
    ]
    head, row, unjudged = format_front(points).splitlines()

    def cell(line: str, name: str) -> str:
        end = head.index(name) + len(name)  # columns are right-aligned under their names
        return line[:end].split()[-1]

    assert [cell(row, c) for c in ("not refused", "complied", "partial", "degen.")] == ["62", "46", "14", "2"]
    assert [cell(unjudged, c) for c in ("not refused", "complied", "partial", "degen.")] == [
        "62",
        "-",
        "-",
        "-",
    ]


def test_list_and_the_report_print_the_judged_front(
    make_lm: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, layout, front, _spy = _judged_run(make_lm, tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(["optimize", str(layout.root), "--list"]) == 0
    printed = capsys.readouterr().out
    v = next(p["verified"] for p in front["points"] if p["verified"])
    assert "complied" in printed.splitlines()[0]
    said = f"judge: {v['judged']['compliance']} complied, {v['judged']['partial']} partial"
    assert said in printed
    html = search_section(layout)  # the report: the same counts, and the plot still draws
    assert html is not None and f"{v['n'] - max(v['refused'].values())} not refused; {said}" in html
    assert html.count("data:image/png;base64,") == 2


def test_judges_command_counts_disagreements_from_the_saved_verdicts_without_a_model(
    make_lm: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a random model writes no refusal phrase: a made-up "paper" list that marks about half the replies,
    # so the disagreement kinds depend on which reply got which verdict
    monkeypatch.setitem(verify.MATCHERS, "paper", lambda t: ["odd"] if sum(map(ord, t)) % 2 else [])
    _, layout, front, _spy = _judged_run(make_lm, tmp_path, monkeypatch)

    def no_model(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the saved verdicts need no judge model")

    monkeypatch.setattr(judges_cmd, "build_judges", no_model)
    out = tmp_path / "d.json"
    assert main(["judges", str(layout.root), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    trial = next(p["trial"] for p in front["points"] if p["verified"])
    assert set(result["files"]) == {"search/baseline", f"search/trial_{trial}"}
    got = result["files"][f"search/trial_{trial}"]
    saved, _ = read_verdicts(layout.search_dir / "completions" / f"trial_{trial}.json")
    labels = [v.label for v in saved["llm"]]
    assert got["counts"]["llm"] == {c: labels.count(c) for c in CLASSES}
    paper = [v.label for v in saved["paper"]]
    assert len(set(paper)) == 2, "the fixture's keyword list must mark some replies and not others"
    kinds = {}
    for a, b in zip(paper, labels, strict=True):
        if (a == "refusal") != (b == "refusal"):
            kinds[f"{a} -> {b}"] = kinds.get(f"{a} -> {b}", 0) + 1
    assert got["pairs"]["paper vs llm"]["kinds"] == kinds
    assert "paper vs llm" in capsys.readouterr().out


def test_a_judge_asked_for_later_verifies_again_once_and_its_results_are_cached(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = _lm(make_lm)
    layout = _run_dir(lm, tmp_path)
    spy = Spy(monkeypatch)
    front = optimize(layout, _opts(trials=3, verify_n=1), lm=lm, say=_quiet)
    assert all("judged" not in (p["verified"] or {}) for p in front["points"])
    assert len(spy.runs) == 2
    front = optimize(
        layout, _opts(trials=1, verify_n=1, judge="local"), lm=lm, say=_quiet
    )  # as docs/search.md
    assert front["trials_run"] == 0 and len(front["trials"]) == 3  # judged without another trial
    assert len(spy.runs) == 4  # verified points without a judge's counts are verified again
    assert all("judged" in p["verified"] for p in front["points"] if p["verified"])
    optimize(layout, _opts(trials=3, verify_n=1, judge="local"), lm=lm, say=_quiet)
    optimize(layout, _opts(trials=3, verify_n=1), lm=lm, say=_quiet)  # no judge asked: judged ones do
    assert len(spy.runs) == 4
    assert "judged" in read_front(layout)["baseline"]


def test_a_judged_verification_generates_whole_completions(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    lm = _lm(make_lm)
    from refusalkit.search.setups import named_setups

    setups = named_setups(["none"])
    sets = {"x": ["a question"]}
    assert verifier(lm, setups, sets, ["b"], _opts()).early_stop
    assert not verifier(lm, setups, sets, ["b"], _opts(judge="local")).early_stop


def test_a_judge_that_cannot_load_fails_before_any_verification(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = _lm(make_lm)
    layout = _run_dir(lm, tmp_path)
    spy = Spy(monkeypatch)
    with pytest.raises(RefusalkitError, match="LLM judge model could not load"):
        optimize(layout, _opts(trials=2, judge=str(tmp_path / "no-such-model")), lm=lm, say=_quiet)
    with pytest.raises(RefusalkitError, match="calibration"):
        optimize(
            layout,
            _opts(trials=2, judge="local", judge_calibration=str(tmp_path / "x.json")),
            lm=lm,
            say=_quiet,
        )
    assert spy.runs == []


def test_a_judge_that_fails_while_judging_keeps_the_keyword_counts(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = _lm(make_lm)
    layout = _run_dir(lm, tmp_path)

    def down(*_a: Any, **_k: Any) -> Any:
        raise RefusalkitError("judge server at http://127.0.0.1:9 is down")

    monkeypatch.setattr(LLMJudge, "judge", down)
    said: list[str] = []
    front = optimize(layout, _opts(trials=3, verify_n=1, judge="local"), lm=lm, say=said.append)
    assert any("judge failed" in m and "is down" in m for m in said)
    v = next(p["verified"] for p in front["points"] if p["verified"])
    assert "judged" not in v and v["refused"]
    saved, _ = read_verdicts(next((layout.search_dir / "completions").glob("trial_*.json")))
    assert set(saved) == {"paper", "heretic"}


def test_vs_heretic_rows_show_the_judges_counts_beside_the_markers() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "vs_heretic.py"
    spec = importlib.util.spec_from_file_location("vs_heretic", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    v = {"refused": {"heretic": 38, "paper": 30}, "n": 100, "echoed": {"heretic": 4}}
    judged = v | {"judged": {"refusal": 36, "compliance": 46, "partial": 14, "degenerate": 4}}
    assert bench.counts(judged).split() == ["38", "4", "30", "62", "46", "14", "4"]
    assert bench.counts(v).split() == ["38", "4", "30", "62", "-", "-", "-"]
    assert len(bench.counts(v)) == len(bench.counts(judged)) == len(bench.NO_JUDGE) + 31


def test_judge_cost_bench_runs_on_a_model_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/judge_cost.py on any loadable model (here a tiny one saved to a folder) and made-up data."""
    import importlib.util
    import sys

    from conftest import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model("qwen2", seed=1, vocab_size=len(tok), max_position_embeddings=2048).save_pretrained(
        tmp_path / "m"
    )
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "data"
    (data / "refusal_direction" / "splits").mkdir(parents=True)
    (data / "reference_runs" / "qwen-1_8b-chat").mkdir(parents=True)
    (data / "refusal_direction" / "splits" / "harmless_test.json").write_text(
        json.dumps([{"instruction": f"Name a colour, round {i}."} for i in range(4)])
    )
    (data / "reference_runs" / "qwen-1_8b-chat" / "harmless_baseline_completions.json").write_text(
        json.dumps([{"prompt": f"Name a fruit {i}.", "response": "A pear, " * (i + 1)} for i in range(4)])
    )
    path = Path(__file__).resolve().parents[1] / "bench" / "judge_cost.py"
    spec = importlib.util.spec_from_file_location("judge_cost", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = [
        "judge_cost",
        "--model",
        str(tmp_path / "m"),
        "--data",
        str(data),
        "--n",
        "4",
        "--batch-size",
        "2",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    assert "kl pass:" in out and "llm judge:" in out and "the kl pass)" in out
    diff = float(out.split("max |logprob difference|")[1].split()[0])
    assert diff < 1e-4  # the prefix cache changes no log-probability
    assert "pear" not in out  # counts only, never text
