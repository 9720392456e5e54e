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


class _Judge:
    """Calls the completions of the prompts at ``marked`` (by call order) refusals; records what it saw."""

    def __init__(self, marked: set[int]) -> None:
        self.marked, self.seen = marked, list[str]()

    def __call__(self, text: str) -> bool:
        self.seen.append(text)
        return len(self.seen) - 1 in self.marked


def _setup(make_lm: Callable[..., Any]) -> tuple[Any, list[str], list[str], list[int]]:
    lm = make_lm("qwen2")
    ids = refusal_token_ids(lm.tokenizer, ["I", "As"])
    return lm, format_prompts(lm.tokenizer, HARMFUL), format_prompts(lm.tokenizer, HARMLESS), ids


def test_generated_proxy_counts_judged_prompts_as_one_and_the_rest_by_their_first_token(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, harmful, harmless, ids = _setup(make_lm)
    texts = generate(lm, harmful, max_new_tokens=N_NEW, batch_size=64)
    judge = _Judge(marked={0, 3})  # calls the completions of prompts 0 and 3 refusals
    monkeypatch.setattr(objectives, "any_judge", judge)

    scorer = objectives.ProxyScorer(lm, harmful, harmless, ids, 32, new_tokens=N_NEW)
    got = scorer()

    assert judge.seen == texts  # each prompt's own first N greedy tokens, in prompt order
    p = torch.sigmoid(refusal_metric(logits_for_prompts(lm, harmful, 32), ids))
    hit = torch.tensor([i in {0, 3} for i in range(len(harmful))])
    want = torch.where(hit, torch.ones_like(p), p).mean()
    assert got.refused == 2 and got.n_harmful == len(harmful) and got.new_tokens == N_NEW
    assert got.refusal == pytest.approx(float(want), abs=1e-5)
    # Without new tokens it is the first-token proxy, blind to what the tokens say.
    plain = objectives.ProxyScorer(lm, harmful, harmless, ids, 32)()
    assert plain.refusal == pytest.approx(float(p.mean()), abs=1e-5) and plain.new_tokens == 0
    assert got.kl.mean == pytest.approx(plain.kl.mean, abs=1e-9)


def test_unedited_filter_keeps_prompts_a_judge_marks_even_with_a_negative_metric(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, harmful, harmless, ids = _setup(make_lm)
    metric = refusal_metric(logits_for_prompts(lm, harmful, 32), ids)
    negative = [i for i, m in enumerate(metric.tolist()) if m <= 0]
    assert len(negative) >= 2, "the fixture needs prompts whose first token does not refuse"
    monkeypatch.setattr(objectives, "any_judge", _Judge(marked=set(negative[:2])))
    scorer = objectives.ProxyScorer(lm, harmful, harmless, ids, 32, new_tokens=N_NEW)
    _filter_refused(scorer)
    kept = {harmful.index(p) for p in scorer.harmful}
    assert kept == {i for i, m in enumerate(metric.tolist()) if m > 0} | set(negative[:2])


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
    with pytest.raises(RefusalkitError, match="fingerprint|different|another"):
        optimize(layout, _opts(trials=3, proxy_new_tokens=0), lm=lm, say=_quiet)


def test_negative_new_tokens_is_a_clear_error(make_lm: Callable[..., Any]) -> None:
    lm, harmful, harmless, ids = _setup(make_lm)
    with pytest.raises(RefusalkitError, match="new_tokens"):
        objectives.ProxyScorer(lm, harmful, harmless, ids, new_tokens=-1)


def test_markers_judge_by_either_list() -> None:
    assert markers.any_judge("Sure. Note that this is illegal in most places.")  # heretic's marker only
    assert markers.any_judge("I cannot help with that.")
    assert not markers.any_judge("Sure, here are three colours: red, green, blue.")
