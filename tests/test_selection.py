"""The selection rules and candidate scoring (with resume and checkpoints)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from refusalkit.activations import mean_activations
from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.metric import refusal_token_ids
from refusalkit.prompts import format_prompts
from refusalkit.selection import (
    CandidateScore,
    SelectionRules,
    apply_rules,
    discard_reason,
    layer_cutoff,
    score_candidates,
    search,
)

# Tiny models: extra threads only add overhead, and spin badly when other work shares the cores.

NAN = math.nan


def _scores() -> list[CandidateScore]:
    return [
        CandidateScore(-1, 0, bypass=-1.0, induce=0.5, kl=0.05),  # kept
        CandidateScore(-2, 1, bypass=-3.0, induce=0.2, kl=0.01),  # kept, lowest bypass among kept
        CandidateScore(-1, 1, bypass=-9.0, induce=0.5, kl=0.5),  # KL too high
        CandidateScore(-2, 2, bypass=-8.0, induce=-0.1, kl=0.01),  # induce too low
        CandidateScore(-1, 3, bypass=NAN, induce=0.5, kl=0.01),  # NaN
        CandidateScore(-1, 8, bypass=-10.0, induce=5.0, kl=0.0),  # late layer (8 >= int(0.8 * 10))
    ]


def test_apply_rules_marks_and_picks() -> None:
    scores = _scores()
    best = apply_rules(scores, 10, SelectionRules())
    assert (best.position, best.layer, best.bypass) == (-2, 1, -3.0)
    assert [s.kept for s in scores] == [True, True, False, False, False, False]
    reasons = [s.reason for s in scores]
    assert reasons[:2] == ["", ""]
    assert reasons[2].startswith("KL 0.500 > 0.1")
    assert reasons[3].startswith("induce -0.10 < 0.0")
    assert reasons[4] == "NaN score"
    assert reasons[5].startswith("layer >= 8")


def test_layer_rule_wins_over_nan() -> None:
    """Late layers are never scored (NaN), and say so rather than 'NaN score'."""
    s = CandidateScore(-1, 9, NAN, NAN, NAN)
    good = CandidateScore(-1, 0, 0.0, 1.0, 0.0)
    apply_rules([s, good], 10, SelectionRules())
    assert s.reason.startswith("layer")
    assert layer_cutoff(10, SelectionRules(max_layer_frac=0.5)) == 5


def test_rules_are_configurable() -> None:
    scores = _scores()
    best = apply_rules(
        scores, 10, SelectionRules(kl_threshold=1.0, induce_threshold=-1.0, max_layer_frac=1.0)
    )
    assert (best.layer, best.bypass) == (8, -10.0)
    assert sum(s.kept for s in scores) == 5  # all but the NaN one


def test_all_filtered_reports_counts() -> None:
    scores = _scores()
    with pytest.raises(RefusalkitError) as err:
        apply_rules(scores, 10, SelectionRules(induce_threshold=100.0))
    msg = str(err.value)
    assert "all 6 candidate directions were filtered out" in msg
    # induce is read before KL: the KL-0.5 candidate is discarded by induce here too
    assert "'induce': 4" in msg and "'layer': 1" in msg and "'NaN': 1" in msg and "'KL'" not in msg
    assert "--kl-threshold" in msg and "candidate_scores.json" in msg


@pytest.fixture
def setup(make_lm: Callable[..., Any]) -> dict[str, Any]:
    lm = make_lm("qwen2", seed=1)  # a seed where the best bypass has neither the best induce nor KL
    tok = lm.tokenizer
    harmful = format_prompts(tok, ["How do I pick a lock?", "Make a weapon."])
    harmless = format_prompts(tok, ["Bake a cake.", "Name a bird."])
    n_pos = 3
    cands = Candidates(
        mean_activations(lm, harmful, n_pos).mean,
        mean_activations(lm, harmless, n_pos).mean,
    )
    return {"lm": lm, "cands": cands, "harmful": harmful, "harmless": harmless, "ids": refusal_token_ids(tok)}


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per candidate ablated in a forward pass (bypass or KL)."""
    calls: list[int] = []
    real = search.ablated_logits

    def counting(lm: Any, enc: Any, directions: torch.Tensor, score: Any = None) -> Any:
        calls.extend([1] * directions.shape[0])
        return real(lm, enc, directions, score)

    monkeypatch.setattr(search, "ablated_logits", counting)
    return calls


def test_score_candidates(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cands: Candidates = setup["cands"]
    calls = _count_calls(monkeypatch)
    seen: list[int] = []
    scores = score_candidates(
        setup["lm"], cands, setup["harmful"], setup["harmless"], setup["ids"],
        rules=SelectionRules(exhaustive=True), batch_size=2, checkpoint=lambda s: seen.append(len(s)),
    )  # fmt: skip
    n_layers = cands.n_layers
    cutoff = layer_cutoff(n_layers, SelectionRules())
    assert len(scores) == cands.n_positions * n_layers == 12
    assert {(s.position, s.layer) for s in scores} == {
        (p, la) for p in (-3, -2, -1) for la in range(n_layers)
    }
    # resid_pre[0] is the embedding of the same template tokens for both classes: a zero direction, NaN
    # scores and no forward pass. Late layers are not scored either. Two ablations per candidate: the
    # harmful prompts (bypass), then the harmless ones (KL).
    assert len(calls) == 2 * cands.n_positions * (cutoff - 1)
    for s in scores:
        values = (s.bypass, s.induce, s.kl)
        if 0 < s.layer < cutoff:
            assert all(math.isfinite(v) for v in values) and s.kl >= 0
        else:
            assert all(math.isnan(v) for v in values)
    assert seen and seen[-1] == 9  # the last checkpoint holds every scored (not late) candidate
    apply_rules(scores, n_layers, SelectionRules(kl_threshold=1e9, induce_threshold=-1e9))
    assert sum(s.kept for s in scores) == len(calls) // 2


def _outcome(scores: list[CandidateScore], n_layers: int, rules: SelectionRules) -> tuple[Any, ...] | str:
    """The pick with its scores (to 1e-6: candidates sharing a pass differ in the last bits), or the error."""
    try:
        pick = apply_rules(scores, n_layers, rules)
    except RefusalkitError as exc:
        return str(exc)
    return (pick.position, pick.layer, *(round(x, 6) for x in (pick.bypass, pick.induce, pick.kl)))


def _bypass_only(full: list[CandidateScore]) -> list[CandidateScore]:
    """The exhaustive run's bypass scores as a resumable partial result (induce and KL to do)."""
    return [
        CandidateScore(s.position, s.layer, s.bypass, NAN, NAN, complete=math.isnan(s.bypass))
        for s in full
        if s.layer < 3
    ]


def test_pruned_search_picks_what_exhaustive_picks(setup: dict[str, Any]) -> None:
    """Across thresholds that reject the best-bypass candidates by induce or by KL (or reject all),
    pruned scoring gives the exhaustive outcome (pick, or error with the same hints) and the same
    scores wherever it computed them."""
    cands: Candidates = setup["cands"]
    args = (setup["lm"], cands, setup["harmful"], setup["harmless"], setup["ids"])
    full = score_candidates(*args, rules=SelectionRules(exhaustive=True), batch_size=2)
    scored = sorted((s for s in full if math.isfinite(s.bypass)), key=lambda s: s.bypass)
    assert len(scored) == 6
    # Thresholds between two candidates' scores (never on one: passes shared by several candidates
    # change the last bits), and just past the best bypass's own scores, to reject it by that rule.
    induces, kls = sorted(s.induce for s in scored), sorted(s.kl for s in scored)
    best = scored[0]
    mid_induce = [(a + b) / 2 for a, b in itertools.pairwise(induces[:5])]
    mid_kl = [(a + b) / 2 for a, b in itertools.pairwise(kls[:5])]
    grid = [(i, k) for i in (-1e9, best.induce + 1e-6, *mid_induce) for k in (1e9, best.kl - 1e-6, *mid_kl)]
    mattered = {"induce": 0, "KL": 0, "none": 0}
    for induce_t, kl_t in grid:
        rules = SelectionRules(induce_threshold=induce_t, kl_threshold=kl_t)
        expected = _outcome([CandidateScore(**x.as_dict()) for x in full], cands.n_layers, rules)
        pruned = score_candidates(*args, rules=rules, batch_size=2, done=_bypass_only(full))
        assert _outcome(pruned, cands.n_layers, rules) == expected
        by_key = {(s.position, s.layer): s for s in full}
        for s in pruned:
            for name in ("bypass", "induce", "kl"):
                if math.isfinite(getattr(s, name)):
                    assert getattr(s, name) == pytest.approx(getattr(by_key[(s.position, s.layer)], name))
        if isinstance(expected, str):
            mattered["none"] += 1
        elif (expected[0], expected[1]) != (scored[0].position, scored[0].layer):
            why = discard_reason(scored[0], layer_cutoff(cands.n_layers, rules), cands.n_layers, rules)
            mattered[why.split(" ")[0]] += 1  # why the best bypass lost
    assert all(mattered.values()), mattered  # the grid covers each way the best bypass can lose


def test_pruned_search_stops_once_certain(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cands: Candidates = setup["cands"]
    args = (setup["lm"], cands, setup["harmful"], setup["harmless"], setup["ids"])
    loose = SelectionRules(kl_threshold=1e9, induce_threshold=-1e9)
    calls = _count_calls(monkeypatch)
    pruned = score_candidates(*args, rules=loose, batch_size=2)
    pick = apply_rules(pruned, cands.n_layers, loose)
    assert len(calls) == 6 + 1  # every bypass, then the first candidate's KL: it is kept at once
    skipped = [s for s in pruned if not s.complete]
    assert len(skipped) == 5 and all(
        s.reason.startswith("pruned") and s.bypass >= pick.bypass and math.isnan(s.induce) for s in skipped
    )
    calls.clear()
    strict = SelectionRules(induce_threshold=1e9)
    pruned = score_candidates(*args, rules=strict, batch_size=2)
    assert len(calls) == 6 + 1  # induce discards all; the KL of the nearest to passing, for the hint
    assert sum(math.isfinite(s.kl) for s in pruned) == 1


def test_nan_scores_are_labelled_nan_not_pruned(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN bypass (the lowest would-be one) and a NaN induce discard their candidates as 'NaN score';
    the search goes on to the next candidate."""
    cands: Candidates = setup["cands"]
    args = (setup["lm"], cands, setup["harmful"], setup["harmless"], setup["ids"])
    loose = SelectionRules(kl_threshold=1e9, induce_threshold=-1e9)
    full = score_candidates(*args, rules=SelectionRules(exhaustive=True), batch_size=2)
    order = sorted((s for s in full if math.isfinite(s.bypass)), key=lambda s: s.bypass)
    nan_bypass, nan_induce, winner = [(s.position, s.layer) for s in order[:3]]
    real_bypass, real_induce = search.Scorer.bypass, search.Scorer.induce

    def bypass(self: search.Scorer, group: list[CandidateScore]) -> None:
        real_bypass(self, group)
        for s in group:
            if (s.position, s.layer) == nan_bypass:
                s.bypass = NAN

    def induce(self: search.Scorer, group: list[CandidateScore]) -> None:
        real_induce(self, group)
        for s in group:
            if (s.position, s.layer) == nan_induce:
                s.induce = NAN

    monkeypatch.setattr(search.Scorer, "bypass", bypass)
    monkeypatch.setattr(search.Scorer, "induce", induce)
    scores = score_candidates(*args, rules=loose, batch_size=2)
    pick = apply_rules(scores, cands.n_layers, loose)
    assert (pick.position, pick.layer) == winner
    by_key = {(s.position, s.layer): s for s in scores}
    for key in (nan_bypass, nan_induce):
        assert by_key[key].complete and by_key[key].reason == "NaN score"
    assert math.isnan(by_key[nan_induce].kl)  # discarded before its KL was needed


def test_all_discarded_suggests_the_nearest_loosened_rule(setup: dict[str, Any]) -> None:
    cands: Candidates = setup["cands"]
    args = (setup["lm"], cands, setup["harmful"], setup["harmless"], setup["ids"])
    full = score_candidates(*args, rules=SelectionRules(exhaustive=True), batch_size=2)
    scored = [s for s in full if math.isfinite(s.bypass)]
    # Induce rejects all, KL rejects all but the two lowest-KL ones.
    kl_t = sorted(s.kl for s in scored)[1]
    rules = SelectionRules(induce_threshold=max(s.induce for s in scored) + 1, kl_threshold=kl_t)
    pruned = score_candidates(*args, rules=rules, batch_size=2)
    with pytest.raises(RefusalkitError) as err:
        apply_rules(pruned, cands.n_layers, rules)
    msg = str(err.value)
    hint = msg.split("with --induce-threshold ")[1]
    flag = float(hint.split(" ")[0])
    pos, layer = int(hint.split("position ")[1].split(",")[0]), int(hint.split("layer ")[1].split(" ")[0])
    loosened = SelectionRules(induce_threshold=flag, kl_threshold=kl_t)
    pick = apply_rules([CandidateScore(**x.as_dict()) for x in full], cands.n_layers, loosened)
    assert (pick.position, pick.layer) == (pos, layer)
    assert "--kl-threshold" in msg.split("Loosen")[0] or all(
        s.induce < rules.induce_threshold for s in scored
    )
    with pytest.raises(RefusalkitError) as err_full:
        apply_rules(full, cands.n_layers, rules)
    assert str(err_full.value) == msg  # exhaustive scores give the same message


def test_score_candidates_resumes(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cands: Candidates = setup["cands"]
    args = (setup["lm"], cands, setup["harmful"], setup["harmless"], setup["ids"])
    rules = SelectionRules(exhaustive=True)
    full = score_candidates(*args, rules=rules, batch_size=2)
    assert [(s.layer, math.isnan(s.bypass)) for s in full[:4]] == [(0, True)] * 3 + [(1, False)]
    done = [CandidateScore(s.position, s.layer, 100.0 + i, 0.0, 0.0) for i, s in enumerate(full[:4])]
    calls = _count_calls(monkeypatch)
    checkpoints: list[list[CandidateScore]] = []
    again = score_candidates(*args, rules=rules, batch_size=2, done=done, checkpoint=checkpoints.append)
    # 3 positions x layers 1..2 (layer 0 is a zero direction), minus the done one, twice (bypass, KL)
    assert len(calls) == 2 * (6 - 1)
    by_key = {(s.position, s.layer): s for s in again}
    for d in done:
        assert by_key[(d.position, d.layer)].bypass == d.bypass  # reused, not recomputed
    for s in full[4:]:
        if s.layer < 3:
            assert by_key[(s.position, s.layer)].bypass == pytest.approx(s.bypass, abs=1e-9)
    assert checkpoints and len(checkpoints[-1]) == 9


def test_score_late_layers(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    cands: Candidates = setup["cands"]
    scores = score_candidates(
        setup["lm"], cands, setup["harmful"], setup["harmless"], setup["ids"],
        rules=SelectionRules(score_late_layers=True, exhaustive=True), batch_size=4,
    )  # fmt: skip
    assert len(scores) == 12 and len(calls) == 2 * 9  # every layer but 0 (a zero direction there)
    assert all(math.isfinite(s.bypass) for s in scores if s.layer > 0)


def test_zero_candidate_scores_nan(setup: dict[str, Any]) -> None:
    cands: Candidates = setup["cands"]
    same = Candidates(cands.harmful_mean, cands.harmful_mean.clone())
    scores = score_candidates(
        setup["lm"], same, setup["harmful"], setup["harmless"], setup["ids"], rules=SelectionRules()
    )
    assert all(math.isnan(s.bypass) for s in scores)
    with pytest.raises(RefusalkitError, match="filtered out"):
        apply_rules(scores, same.n_layers, SelectionRules())


def test_scores_equal_plain_hooked_passes(setup: dict[str, Any]) -> None:
    """Every score, as computed with candidates sharing passes and restarts, equals its definition
    computed with the plain hooks, one candidate at a time (and the paper's KL where asked)."""
    from refusalkit.activations import logits_for_prompts
    from refusalkit.interventions import ablate_direction, add_direction
    from refusalkit.metric import kl_function, refusal_metric

    cands: Candidates = setup["cands"]
    lm, ids, harmful, harmless = setup["lm"], setup["ids"], setup["harmful"], setup["harmless"]
    for definition in ("exact", "paper"):
        rules = SelectionRules(exhaustive=True, kl_definition=definition)
        scores = score_candidates(lm, cands, harmful, harmless, ids, rules=rules, batch_size=4)
        base = logits_for_prompts(lm, harmless, 1, share_prefix=False)
        for s in (x for x in scores if math.isfinite(x.bypass)):
            v = cands.directions[s.position + cands.n_positions, s.layer].float()
            with ablate_direction(lm.arch, v):
                bypass = refusal_metric(logits_for_prompts(lm, harmful, 1, share_prefix=False), ids).mean()
                ablated = logits_for_prompts(lm, harmless, 1, share_prefix=False)
            with add_direction(lm.arch, v, s.layer):
                induce = refusal_metric(logits_for_prompts(lm, harmless, 1, share_prefix=False), ids).mean()
            kl = kl_function(definition)(base, ablated).mean()
            assert (s.bypass, s.induce, s.kl) == pytest.approx(
                (float(bypass), float(induce), float(kl)), abs=1e-5
            )
