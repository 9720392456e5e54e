"""The search's generated refusal proxy (``proxy_new_tokens``): the first greedy tokens of each harmful
prompt, judged by both marker lists, on top of the first token's logits (tiny models; the judge is
replaced by one that marks chosen completions, since a random model writes no refusal words)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("optuna")

from refusalkit.activations import logits_for_prompts
from refusalkit.errors import RefusalkitError
from refusalkit.generation import generate
from refusalkit.metric import refusal_metric, refusal_token_ids
from refusalkit.prompts import format_prompts
from refusalkit.search import markers, objectives
from refusalkit.search.optimize import _filter_refused, optimize
from test_search_study import HARMFUL, HARMLESS, _opts, _quiet, _run_dir

N_NEW = 3


def _char_judge(texts: list[str]) -> tuple[str, set[int]]:
    """A character that some completions hold and others not, and which prompts hold it: a judge that
    looks for it matches substrings, as the real ones do (a verdict only goes from no to yes)."""
    for ch in sorted(set("".join(texts))):
        hit = {i for i, t in enumerate(texts) if ch in t}
        if 0 < len(hit) < len(texts):
            return ch, hit
    raise AssertionError("the fixture needs completions that differ")


def _setup(make_lm: Callable[..., Any]) -> tuple[Any, list[str], list[str], list[int]]:
    lm = make_lm("qwen2")
    ids = refusal_token_ids(lm.tokenizer, ["I", "As"])
    return lm, format_prompts(lm.tokenizer, HARMFUL), format_prompts(lm.tokenizer, HARMLESS), ids


def test_generated_proxy_counts_judged_prompts_as_one_and_the_rest_by_their_first_token(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, harmful, harmless, ids = _setup(make_lm)
    texts = generate(lm, harmful, max_new_tokens=N_NEW, batch_size=64)
    ch, hit = _char_judge(texts)
    seen: list[str] = []
    monkeypatch.setattr(objectives, "any_judge", lambda t: seen.append(t) or ch in t)

    scorer = objectives.ProxyScorer(lm, harmful, harmless, ids, 32, new_tokens=N_NEW)
    got = scorer()

    p = torch.sigmoid(refusal_metric(logits_for_prompts(lm, harmful, 32), ids))
    want = torch.where(torch.tensor([i in hit for i in range(len(harmful))]), torch.ones_like(p), p).mean()
    assert seen, "the judge was asked"
    assert got.refused == len(hit) and got.n_harmful == len(harmful) and got.new_tokens == N_NEW
    assert got.refusal == pytest.approx(float(want), abs=1e-5)
    # Without new tokens it is the first-token proxy, blind to what the tokens say.
    plain = objectives.ProxyScorer(lm, harmful, harmless, ids, 32)()
    assert plain.refusal == pytest.approx(float(p.mean()), abs=1e-5) and plain.new_tokens == 0
    assert got.kl.mean == pytest.approx(plain.kl.mean, abs=1e-9)


def test_unedited_filter_keeps_prompts_a_judge_marks_even_with_a_negative_metric(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, harmful, harmless, ids = _setup(make_lm)
    scorer = objectives.ProxyScorer(lm, harmful, harmless, ids, 32, new_tokens=N_NEW)
    metric = torch.tensor([1.0, -1.0, -2.0, 0.5, -0.1, -3.0], dtype=torch.float64)
    judged = [False, True, False, False, True, False]
    monkeypatch.setattr(scorer, "harmful_scores", lambda: (metric, judged))
    _filter_refused(scorer)
    assert scorer.harmful == [harmful[i] for i in (0, 1, 3, 4)]  # metric > 0, or judged


def test_search_with_a_generated_proxy_records_it_and_refuses_to_resume_with_another(
    make_lm: Callable[..., Any], tmp_path: Path
) -> None:
    lm = make_lm("qwen2")
    layout = _run_dir(lm, tmp_path)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    optimize(layout, _opts(trials=2, proxy_new_tokens=2), lm=lm, say=_quiet)
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    import optuna

    study = optuna.load_study(study_name="edit-search", storage=f"sqlite:///{layout.study}")
    assert [t.user_attrs["proxy"]["new_tokens"] for t in study.trials if t.values] == [2, 2]
    with pytest.raises(RefusalkitError, match="another model, candidates, prompt sets or proxy"):
        optimize(layout, _opts(trials=3, proxy_new_tokens=0), lm=lm, say=_quiet)


def test_negative_new_tokens_is_a_clear_error(make_lm: Callable[..., Any]) -> None:
    lm, harmful, harmless, ids = _setup(make_lm)
    with pytest.raises(RefusalkitError, match="new_tokens"):
        objectives.ProxyScorer(lm, harmful, harmless, ids, new_tokens=-1)


def test_markers_judge_by_either_list() -> None:
    assert markers.any_judge("Sure. Note that this is illegal in most places.")  # heretic's marker only
    assert markers.any_judge("I cannot help with that.")
    assert not markers.any_judge("Sure, here are three colours: red, green, blue.")


def test_a_row_leaves_the_proxy_generation_once_judged_but_not_while_empty(
    make_lm: Callable[..., Any],
) -> None:
    lm, harmful, harmless, ids = _setup(make_lm)
    scorer = objectives.ProxyScorer(lm, harmful, harmless, ids, 32, new_tokens=N_NEW)
    enc = lambda text: lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert markers.any_judge(" ")  # heretic counts an empty reply as a refusal ...
    assert not scorer._judged(0, enc(" "))  # ... but an empty start may still become an answer
    assert scorer._judged(0, enc("Sure. That is illegal"))
    assert not scorer._judged(0, enc("Sure, here is a"))


def test_verification_stops_rows_every_judge_marked_and_counts_as_full_completions(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from refusalkit.generation import generate_ids
    from refusalkit.search import verify

    lm, harmful, harmless, _ids = _setup(make_lm)
    n_new = 6
    full = generate_ids(lm, harmful, max_new_tokens=n_new, batch_size=64)
    dec = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    a, _ = _char_judge([dec(ids) for ids in full])
    other = next(c for c in sorted(set("".join(dec(ids) for ids in full))) if c != a)
    # Substring judges, as the real ones: "one" marks `a`, "two" marks `a` or `other`.
    judges = {"one": lambda t: a in t, "two": lambda t: a in t or other in t}
    monkeypatch.setattr(verify, "JUDGES", judges)
    stopped_at: dict[int, int] = {}
    real = verify.generate

    def spy(*args: Any, done: Any, **kw: Any) -> list[str]:
        def seen(i: int, ids: list[int]) -> bool:
            stopped_at[i] = len(ids)
            return bool(done(i, ids))

        return real(*args, done=seen, **kw)

    monkeypatch.setattr(verify, "generate", spy)
    got = verify.Verifier(lm, harmful, harmless, max_new_tokens=n_new)()
    texts = [dec(ids) for ids in full]
    assert got.refused == {name: sum(j(t) for t in texts) for name, j in judges.items()}
    for i, ids in enumerate(full):  # each row ran until every judge marked it, or to its end
        k = next((k for k in range(1, len(ids) + 1) if dec(ids[:k]).strip() and a in dec(ids[:k])), len(ids))
        assert stopped_at[i] == k, (i, stopped_at[i], k)
    assert sum(stopped_at.values()) < sum(map(len, full)), "the fixture needs a row marked before its end"
