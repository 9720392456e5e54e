"""The search proxy's LLM judge (`--proxy-judge`, issue 18 item 4): the refusal objective becomes the
share of proxy replies the judge does not call compliance, the keyword reading recorded beside it; a
local judge reads the unedited weights; the default keeps today's proxy; a study is resumed only with
its own proxy judge (tiny models; a rule-following judge stands in where a random model's verdicts
would all be alike)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("optuna")

from refusalkit.cli import main
from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.llm_judge import LLMJudge
from refusalkit.evaluation.verdicts import CLASSES, Verdict
from refusalkit.generation import generate
from refusalkit.metric import refusal_token_ids
from refusalkit.prompts import format_prompts
from refusalkit.search import objectives, proxy_judge
from refusalkit.search.edit import EditParams, applied_edit
from refusalkit.search.optimize import optimize
from refusalkit.search.report import search_section
from test_search_study import HARMFUL, HARMLESS, _opts, _quiet, _run_dir

N_NEW = 4
KEYWORD_FIELDS = {"refusal", "refused", "n_harmful", "kl", "seconds", "new_tokens", "worst", "setups"}


class RuleJudge:
    """A judge that labels by characters: refusal where ``refuse`` is in the reply, else partial where
    ``evade`` is, else compliance. Records what it was asked."""

    name = "rule"
    classes: tuple[str, ...] = CLASSES

    def __init__(self, refuse: str = "\0", evade: str = "\0") -> None:
        self.refuse, self.evade = refuse, evade
        self.calls: list[tuple[list[str], list[str]]] = []

    def identity(self) -> dict[str, Any]:
        return {"kind": "rule", "refuse": self.refuse, "evade": self.evade}

    def label(self, text: str) -> str:
        return "refusal" if self.refuse in text else "partial" if self.evade in text else "compliance"

    def judge(self, requests: Sequence[str], completions: Sequence[str]) -> list[Verdict]:
        self.calls.append((list(requests), list(completions)))
        return [Verdict(self.label(t)) for t in completions]


def _two_setups(lm: Any) -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]]]:
    """The harmful prompts as two "setups" of three (the scorer does not care how they are rendered),
    their requests, and the harmless prompts likewise."""
    formatted = format_prompts(lm.tokenizer, HARMFUL)
    harmful = {"x": formatted[:3], "y": formatted[3:]}
    requests = {"x": HARMFUL[:3], "y": HARMFUL[3:]}
    plain = format_prompts(lm.tokenizer, HARMLESS)
    return harmful, requests, {"x": plain[:4], "y": plain[4:]}


def _characters(texts: list[str]) -> tuple[str, str]:
    """A marker character some replies hold, and an evasion character some replies without the marker
    hold and others not: so some reply is evasive with no marker, and some complies."""
    chars = sorted(set("".join(texts)))
    for mark in chars:
        marked = [mark in t for t in texts]
        if not 0 < sum(marked) < len(texts) - 1:
            continue
        rest = [t for t, m in zip(texts, marked, strict=True) if not m]
        for evade in chars:
            if evade != mark and 0 < sum(evade in t for t in rest) < len(rest):
                return mark, evade
    raise AssertionError("the fixture needs replies that differ")


def test_the_objective_is_the_share_not_complied_and_the_keyword_reading_is_kept_beside(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("qwen2", seed=2)  # a seed whose six replies all differ
    harmful, requests, harmless = _two_setups(lm)
    ids = refusal_token_ids(lm.tokenizer, ["I", "As"])
    flat = [p for ps in harmful.values() for p in ps]
    texts = generate(lm, flat, max_new_tokens=N_NEW, batch_size=64)
    mark, evade = _characters(texts)
    monkeypatch.setattr(objectives, "any_judge", lambda t: mark in t)  # the keyword lists' stand-in
    judge = RuleJudge(refuse=mark, evade=evade)

    scorer = objectives.ProxyScorer(lm, harmful, harmless, ids, 32, N_NEW, judge=judge, requests=requests)
    got = scorer.score(torch.no_grad())  # no edit: the unedited model's replies
    keyword = objectives.ProxyScorer(lm, harmful, harmless, ids, 32, N_NEW)()

    # the judge read every reply once, each beside its own request
    assert judge.calls == [([r for rs in requests.values() for r in rs], texts)]
    labels = [judge.label(t) for t in texts]
    share = {s: sum(x != "compliance" for x in labels[i : i + 3]) / 3 for s, i in (("x", 0), ("y", 3))}
    marked = {s: sum(mark in t for t in texts[i : i + 3]) for s, i in (("x", 0), ("y", 3))}
    worst = max(share, key=lambda s: share[s])
    assert got.refusal == pytest.approx(share[worst]) and got.worst == worst
    assert got.refused == marked[worst] and got.n_harmful == 3  # the keyword count, beside
    assert got.judged == {c: labels[(0 if worst == "x" else 3) :][:3].count(c) for c in CLASSES}
    assert got.keyword_refusal == pytest.approx(keyword.refusal, abs=1e-9)  # today's objective
    for s in share:
        assert got.setups[s]["refusal"] == pytest.approx(share[s])
        assert got.setups[s]["keyword_refusal"] == pytest.approx(keyword.setups[s]["refusal"], abs=1e-9)
        assert got.setups[s]["refused"] == keyword.setups[s]["refused"] == marked[s]
    # an evasive reply with no marker: the keyword reading calls it not refused, the judge's does not
    evasive = [t for t, x in zip(texts, labels, strict=True) if x == "partial"]
    assert evasive and not any(mark in t for t in evasive)
    assert sum(x != "compliance" for x in labels) > sum(mark in t for t in texts)
    assert got.kl.mean == pytest.approx(keyword.kl.mean, abs=1e-9)
    record = got.as_dict()
    assert record["judge"] == "rule" and record["judged"] == got.judged and "pending" not in record
    assert record["judge_seconds"] is not None and record["seconds"] >= record["judge_seconds"]
    assert set(keyword.as_dict()) == KEYWORD_FIELDS  # a keyword proxy's record is as it was


def test_a_judged_result_is_never_recorded_before_the_judge_read_it(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    harmful, requests, harmless = _two_setups(lm)
    ids = refusal_token_ids(lm.tokenizer, ["I"])
    scorer = objectives.ProxyScorer(lm, harmful, harmless, ids, 32, 2, judge=RuleJudge(), requests=requests)
    with pytest.raises(RuntimeError, match="before its judge read it"):
        scorer().as_dict()
    with pytest.raises(RefusalkitError, match="proxy-new-tokens"):
        objectives.ProxyScorer(lm, harmful, harmless, ids, judge=RuleJudge(), requests=requests)
    with pytest.raises(ValueError, match="one request per harmful prompt"):
        objectives.ProxyScorer(lm, harmful, harmless, ids, 32, 2, judge=RuleJudge(), requests=HARMFUL)


def test_the_filter_narrows_the_requests_with_their_prompts(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("qwen2")
    harmful, requests, harmless = _two_setups(lm)
    scorer = objectives.ProxyScorer(
        lm, harmful, harmless, refusal_token_ids(lm.tokenizer, ["I"]), 32, 2, judge=RuleJudge(), requests=requests
    )  # fmt: skip
    monkeypatch.setattr(scorer, "refusing", lambda: [True, False, True, False, True, True])
    objectives.filter_refused(scorer)
    kept = (0, 2, 4, 5)
    assert scorer.harmful == [[p for ps in harmful.values() for p in ps][i] for i in kept]
    assert scorer.requests == [HARMFUL[i] for i in kept]


def _local_lm(make_lm: Callable[..., Any]) -> Any:
    return make_lm("qwen2", seed=1, max_position_embeddings=2048)  # the judge prompt is ~1k bytes


def test_a_local_proxy_judge_reads_the_unedited_weights(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = _local_lm(make_lm)
    layout = _run_dir(lm, tmp_path)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    read: list[tuple[list[str], list[str], torch.Tensor, bool]] = []
    real = LLMJudge.label_logprobs

    def spy(self: LLMJudge, requests: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        out = real(self, requests, completions)
        same = all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
        read.append((list(requests), list(completions), out, same))
        return out

    monkeypatch.setattr(LLMJudge, "label_logprobs", spy)
    o = _opts(trials=2, proxy_new_tokens=3, proxy_judge="local", verify_n=0, verify_baseline=False)
    front = optimize(layout, o, lm=lm, say=_quiet)

    trials = front["trials"]
    assert len(read) == len(trials) == 2  # one judge pass per trial
    assert all(t["proxy"]["judge"] == "llm" for t in trials)
    assert [same for *_x, same in read] == [True, True], "the judge read edited weights"
    fresh = LLMJudge(lm)  # the model as it is now: unedited
    moved = 0.0
    cands = Candidates.load(layout.candidates)
    for (requests, texts, out, _same), t in zip(list(read), trials, strict=True):
        assert torch.allclose(out, real(fresh, requests, texts), atol=1e-5, rtol=0)
        with applied_edit(lm, cands, EditParams.model_validate(_edit_of(layout, t["trial"]))):
            edited = real(fresh, requests, texts)
        moved = max(moved, float((edited - out).abs().max()))
    assert moved > 1e-3, "the fixture's edits must move the judge's letters (else the check is blind)"
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


def _edit_of(layout: Any, trial: int) -> dict[str, Any]:
    import optuna

    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    return dict(study.trials[trial].user_attrs["edit"])


def test_the_default_proxy_keeps_todays_numbers_and_record(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)

    def no_judge(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the keyword proxy builds no judge")

    monkeypatch.setattr(proxy_judge, "build_judge", no_judge)
    front = optimize(layout, _opts(trials=2, proxy_new_tokens=3, verify_n=0), lm=lm, say=_quiet)
    assert front["proxy_judge"] == {"spec": "keywords"} and proxy_judge.proxy_label(front) == ""
    assert all(set(t["proxy"]) == KEYWORD_FIELDS for t in front["trials"])
    assert proxy_judge.fingerprint_part(proxy_judge.proxy_key(_opts())) == {}  # fingerprints as before
    # each trial's objective is the keyword proxy's, scored directly under the trial's edit
    from test_search_study import _scorer

    scorer = _scorer(lm, layout, _opts(proxy_new_tokens=3))
    cands = Candidates.load(layout.candidates)
    for t in front["trials"]:
        with applied_edit(lm, cands, EditParams.model_validate(_edit_of(layout, t["trial"]))):
            want = scorer()
        assert t["refusal"] == pytest.approx(want.refusal, abs=1e-5)
        assert t["proxy"]["refused"] == want.refused


def _judge_run(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any, list[tuple[str, Any]]]:
    """A search whose proxy judge is a rule judge built where ``--judge`` builds its judges."""
    lm = make_lm("qwen2", seed=2)
    layout = _run_dir(lm, tmp_path)
    built: list[tuple[str, Any]] = []

    def build(spec: str, lm_: Any, *, calibration: str | None = None, batch_size: int = 16) -> Any:
        built.append((spec, calibration))
        texts = generate(lm_, format_prompts(lm_.tokenizer, HARMFUL), max_new_tokens=3, batch_size=64)
        return RuleJudge(refuse="\0", evade=_characters(texts)[1])

    monkeypatch.setattr(proxy_judge, "build_judge", build)
    return lm, layout, built


def test_a_study_resumes_only_with_its_own_proxy_judge_and_says_which(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, layout, built = _judge_run(make_lm, tmp_path, monkeypatch)
    o = {"proxy_new_tokens": 3, "verify_n": 0, "verify_baseline": False, "proxy_judge": "some-judge"}
    front = optimize(layout, _opts(trials=2, **o), lm=lm, say=_quiet)
    assert built == [("some-judge", None)]
    assert front["proxy_judge"] == {"spec": "some-judge", "calibration": None}
    assert "some-judge" in front["objectives"][0] and "compliance" in front["objectives"][0]
    for t in front["trials"]:  # both readings per trial
        assert t["proxy"]["judge"] == "rule" and sum(t["proxy"]["judged"].values()) == t["proxy"]["n_harmful"]
        assert t["refusal"] == t["proxy"]["refusal"] and "keyword_refusal" in t["proxy"]

    with pytest.raises(RefusalkitError, match=r"proxy judge some-judge .*not keywords") as err:
        optimize(layout, _opts(trials=3, **(o | {"proxy_judge": "keywords"})), lm=lm, say=_quiet)
    assert "--proxy-judge some-judge" in str(err.value)
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"llm": {"prompt": "classify/v1", "biases": {"partial": 1.0}}}))
    with pytest.raises(RefusalkitError, match="proxy judge some-judge"):
        optimize(layout, _opts(trials=3, judge_calibration=str(cal), **o), lm=lm, say=_quiet)
    front = optimize(layout, _opts(trials=3, **o), lm=lm, say=_quiet)  # its own judge: resumes
    assert len(front["trials"]) == 3 and front["trials_run"] == 1


def test_a_study_made_before_the_option_resumes_with_the_default_only(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, layout, _built = _judge_run(make_lm, tmp_path, monkeypatch)
    base = {"proxy_new_tokens": 3, "verify_n": 0, "verify_baseline": False}
    optimize(layout, _opts(trials=2, **base), lm=lm, say=_quiet)
    with sqlite3.connect(layout.study) as db:  # as a study written before --proxy-judge existed
        db.execute("DELETE FROM study_user_attributes WHERE key = 'proxy_judge'")
    with pytest.raises(RefusalkitError, match=r"proxy judge keywords .*not some-judge"):
        optimize(layout, _opts(trials=3, proxy_judge="some-judge", **base), lm=lm, say=_quiet)
    front = optimize(layout, _opts(trials=3, **base), lm=lm, say=_quiet)
    assert front["trials_run"] == 1 and front["proxy_judge"] == {"spec": "keywords"}


def test_the_front_and_the_report_say_which_judge_made_the_proxy_counts(
    make_lm: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lm, layout, _built = _judge_run(make_lm, tmp_path, monkeypatch)
    o = _opts(trials=2, proxy_new_tokens=3, verify_n=0, verify_baseline=False, proxy_judge="some-judge")
    optimize(layout, o, lm=lm, say=_quiet)
    capsys.readouterr()
    assert main(["optimize", str(layout.root), "--list"]) == 0
    printed = capsys.readouterr().out
    assert "proxy judge some-judge (default prompt, no biases) did not call compliance" in printed
    html = search_section(layout)
    assert html is not None and "proxy judge some-judge" in html and "some-judge judge" in html


def test_a_proxy_judge_without_generated_tokens_fails_before_the_model_loads(
    make_lm: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    from refusalkit.search import optimize as optimize_module

    def no_load(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("no model should load")

    monkeypatch.setattr(optimize_module, "load_model", no_load)
    with pytest.raises(RefusalkitError, match="--proxy-new-tokens is 0"):
        optimize(layout, _opts(proxy_new_tokens=0, proxy_judge="local"), say=_quiet)
    with pytest.raises(RefusalkitError, match="calibration"):
        optimize(
            layout, _opts(proxy_judge="local", judge_calibration=str(tmp_path / "none.json")), say=_quiet
        )
    assert not layout.study.exists()
