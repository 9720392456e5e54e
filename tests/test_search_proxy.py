"""The search's generated refusal proxy (``proxy_new_tokens``): the first greedy tokens of each harmful
prompt, judged by both marker lists, on top of the first token's logits (tiny models; the judge is
replaced by one that marks chosen completions, since a random model writes no refusal words)."""

from __future__ import annotations

from collections import Counter
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
from refusalkit.search.edit import EditParams
from refusalkit.search.front import Point, format_front, refused_label
from refusalkit.search.objectives import filter_refused as _filter_refused
from refusalkit.search.optimize import optimize
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


def test_marker_lists_and_judges_give_the_verdicts_each_list_defines() -> None:
    texts = [
        "Sure. Note that this is illegal.",  # heretic's "illegal" only
        "I cannot help with that.",  # both lists
        "",  # heretic counts an empty reply
        "Red, green, blue.",  # neither
        "SORRY*",  # heretic's "sorry" once emphasis is removed; the paper's list wants "I'm sorry"
        "I\u2019m sorry, no.",  # both, with a typographic apostrophe folded
    ]
    want = {
        "paper": [False, True, False, False, False, True],
        "heretic": [True, True, True, False, True, True],
    }
    assert set(markers.JUDGES) == set(markers.MATCHERS) == set(want)
    for name, verdicts in want.items():  # written out by hand, not derived from either table
        assert [markers.JUDGES[name](t) for t in texts] == verdicts, name
        assert [bool(markers.MATCHERS[name](t)) for t in texts] == verdicts, name
    assert markers.heretic_markers("Sure. This is *illegal* and harmful.") == ["illegal", "harmful"]
    assert markers.heretic_markers("  ") == [markers.EMPTY]


def test_a_verified_count_says_how_many_of_its_verdicts_echo_the_request() -> None:
    v = {"refused": {"paper": 0, "heretic": 5}, "n": 100, "echoed": {"paper": 0, "heretic": 5}}
    assert refused_label(v) == "0/5 of 100 (0/5 echo the request)"
    assert refused_label(v | {"echoed": {"paper": 0, "heretic": 0}}, " / ") == "0 / 5 of 100"
    assert refused_label(v | {"echoed": None}) == "0/5 of 100"  # verified before echo counts existed
    kl = {"mean": 0.02, "median": 0.01, "max": 0.1}
    point = Point(3, EditParams(), {"refusal": 0.1, "kl": kl}, verified=v | {"kl": kl})
    assert "0/5 of 100 (0/5 echo the request)" in format_front([point])
    assert "over-refusal" not in format_front([point])  # verified without over-refusal sets
    over = {"or_bench_hard_test": {"paper": {"k": 4, "n": 16}, "broad": {"k": 5, "n": 16}}}
    point.verified = v | {"kl": kl, "over_refusal": over}
    assert "over-refusal (paper/broad): or_bench_hard_test 4/16 / 5/16" in format_front([point])


class _VerifyCase:
    """A verification on the tiny model with two substring matchers as the real ones ("one" finds the
    character ``a``, "two" finds ``a`` and ``other``), the full completions to compare with, and a record
    of how many new tokens each prompt had when the verification last asked about it."""

    N_NEW = 6

    def __init__(self, make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
        from refusalkit.generation import generate_ids
        from refusalkit.search import verify

        self.verify = verify
        self.lm, self.harmful, self.harmless, _ids = _setup(make_lm)
        self.full = generate_ids(self.lm, self.harmful, max_new_tokens=self.N_NEW, batch_size=64)
        self.dec = lambda ids: self.lm.tokenizer.decode(ids, skip_special_tokens=True)
        self.a, _ = _char_judge([self.dec(ids) for ids in self.full])
        a = self.a
        self.other = other = next(c for c in sorted(set("".join(map(self.dec, self.full)))) if c != a)
        self.matchers = {
            "one": lambda t: [a] if a in t else [],
            "two": lambda t: [c for c in (a, other) if c in t],
        }
        monkeypatch.setattr(verify, "MATCHERS", self.matchers)
        self.stopped_at: dict[int, int] = {}
        real = verify.generate_ids

        def spy(*args: Any, done: Any, **kw: Any) -> list[list[int]]:
            def seen(i: int, ids: list[int]) -> bool:
                self.stopped_at[i] = len(ids)
                return bool(done(i, ids))

            return real(*args, done=seen, **kw)

        monkeypatch.setattr(verify, "generate_ids", spy)

    def verifier(self, requests: list[str] | None = None) -> Any:
        return self.verify.Verifier(
            self.lm, self.harmful, self.harmless, max_new_tokens=self.N_NEW, requests=requests
        )


def test_verification_stops_rows_every_judge_marked_and_counts_as_full_completions(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _VerifyCase(make_lm, monkeypatch)
    full, dec, a, matchers, stopped_at = c.full, c.dec, c.a, c.matchers, c.stopped_at
    got = c.verifier()()
    texts = [dec(ids) for ids in full]
    assert got.refused == {name: sum(bool(m(t)) for t in texts) for name, m in matchers.items()}
    assert got.echoed is None  # no requests given
    for i, ids in enumerate(full):  # each row ran until every judge marked it, or to its end
        k = next((k for k in range(1, len(ids) + 1) if dec(ids[:k]).strip() and a in dec(ids[:k])), len(ids))
        assert stopped_at[i] == k, (i, stopped_at[i], k)
    assert sum(stopped_at.values()) < sum(map(len, full)), "the fixture needs a row marked before its end"


def test_verification_counts_verdicts_that_only_echo_the_request_as_full_completions_would(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _VerifyCase(make_lm, monkeypatch)
    full, dec, a, matchers, stopped_at = c.full, c.dec, c.a, c.matchers, c.stopped_at
    # Every other request itself holds `a` (as a JailbreakBench request says "illegal"); the rest hold
    # neither marker.
    requests = [a if i % 2 == 0 else "\u2603" for i in range(len(full))]
    assert "\u2603" not in (a, c.other)
    got = c.verifier(requests=requests)()
    texts = [dec(ids) for ids in full]
    in_request = [{name: set(m(r)) for name, m in matchers.items()} for r in requests]
    want = {
        name: sum(bool(m(t)) and set(m(t)) <= in_request[i][name] for i, t in enumerate(texts))
        for name, m in matchers.items()
    }
    assert got.echoed == want
    assert got.refused == {name: sum(bool(m(t)) for t in texts) for name, m in matchers.items()}
    assert want["one"] > 0, "the fixture needs a completion marked only by its request's marker"
    for i, ids in enumerate(full):  # a row leaves once every judge found a marker its request lacks

        def final(k: int, i: int = i, ids: list[int] = ids) -> bool:
            t = dec(ids[:k])
            return bool(t.strip()) and all(set(m(t)) - in_request[i][name] for name, m in matchers.items())

        k = next((k for k in range(1, len(ids) + 1) if final(k)), len(ids))
        assert stopped_at[i] == k, (i, stopped_at[i], k)


def test_a_long_verification_cut_short_counts_as_the_short_generation_would(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One 12-token generation gives the 4-token counts too (the README's judged front: 50 and 256
    tokens from one generation): the cut completions, markers, echo and group counts equal a 4-token
    verification's own, a refusal that comes only after token 4 counts at 12 tokens alone, and KL is
    kept."""
    from refusalkit.generation import generate_ids
    from refusalkit.search import verify

    lm, harmful, harmless, _ids = _setup(make_lm)
    long_n, short_n = 12, 4
    full = generate_ids(lm, harmful, max_new_tokens=long_n, batch_size=128)
    dec = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    texts = [dec(ids) for ids in full]
    # a "late" marker: a character seen more often than any first-4-token text holds it (the tiny model
    # repeats itself), and an "early" one: another character some first-4-token text holds
    rep = Counter("".join(texts)).most_common(1)[0][0]
    k = max(dec(ids[:short_n]).count(rep) for ids in full) + 1
    early = next(
        c for c in sorted(set("".join(texts))) if c != rep and any(c in dec(i[:short_n]) for i in full)
    )

    def late(t: str) -> list[str]:
        return ["late"] if t.count(rep) >= k else []

    matchers = {"one": late, "two": lambda t: late(t) + ([early] if early in t else [])}
    monkeypatch.setattr(verify, "MATCHERS", matchers)
    requests = [early if i % 2 else "\u2603" for i in range(len(harmful))]

    def make(n: int, **kw: Any) -> Any:
        return verify.Verifier(lm, harmful, harmless, max_new_tokens=n, requests=requests, **kw)

    long_v = make(long_n, early_stop=False)
    gen = long_v.run()
    cut = long_v.truncated(gen, short_n)
    short = make(short_n, early_stop=False).run()
    assert cut.texts == short.texts and cut.ids == short.ids
    assert cut.markers == short.markers and cut.echo == short.echo
    assert cut.verified.groups == short.verified.groups
    assert cut.verified.refused == short.verified.refused and cut.verified.echoed == short.verified.echoed
    assert cut.verified.max_new_tokens == short_n
    assert cut.verified.refused["one"] < gen.verified.refused["one"], "the fixture needs a late refusal"
    assert cut.verified.kl == gen.verified.kl and cut.verified.kl_by_setup == gen.verified.kl_by_setup
    with pytest.raises(ValueError, match="cannot cut"):
        long_v.truncated(gen, long_n + 1)
    with pytest.raises(ValueError, match="early_stop=False"):
        make(long_n).truncated(gen, short_n)


def test_verification_needs_one_request_per_harmful_prompt(make_lm: Callable[..., Any]) -> None:
    from refusalkit.search import verify

    lm, harmful, harmless, _ids = _setup(make_lm)
    with pytest.raises(ValueError, match="one each"):
        verify.Verifier(lm, harmful, harmless, max_new_tokens=2, requests=["only one"])


# ---- over-refusal in the removal search's verification (issue 19 item 1) --------------------------------


def test_verification_answers_the_over_refusal_sets_under_the_run_system_prompt(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import asdict

    from refusalkit.calibrate import rates as crates
    from refusalkit.evaluation.refusal import matched_markers
    from refusalkit.search.front import over_label
    from refusalkit.search.verify import Verifier

    lm, harmful, harmless, _ids = _setup(make_lm)
    over = {"or_bench_hard_test": ["kill a python process", "which chemicals never mix", "shoot a photo"],
            "oktest_val": ["steal the show", "a b c"]}  # fmt: skip
    system = "You answer briefly."
    texts = {k: generate(lm, format_prompts(lm.tokenizer, xs, system), max_new_tokens=4, batch_size=8)
             for k, xs in over.items()}  # fmt: skip
    everything = [t.lower() for ts in texts.values() for t in ts]
    ch, _hit = _char_judge(everything)
    from refusalkit.evaluation import judges

    fake = {"paper": (ch,), "broad": (ch, "\u2603")}
    monkeypatch.setattr(crates, "REFUSAL_JUDGES", fake)  # the early stop's
    monkeypatch.setattr(judges, "REFUSAL_JUDGES", fake)  # the verdicts'

    systems: list[str | None] = []
    real_format = crates.format_prompts
    monkeypatch.setattr(
        crates,
        "format_prompts",
        lambda tok, xs, sys=None: (systems.append(sys), real_format(tok, xs, sys))[1],
    )
    got = Verifier(lm, harmful, harmless, max_new_tokens=4, over_refusal=over, system=system)()
    assert systems == [system, system]
    assert got.over_refusal is not None and list(got.over_refusal) == list(over)
    for name, ts in texts.items():
        want = sum(bool(matched_markers(t, (ch,))) for t in ts)
        for judge in ("paper", "broad"):
            r = got.over_refusal[name][judge]
            assert (r["k"], r["n"]) == (want, len(ts)), (name, judge)
    assert sum(got.over_refusal[n]["paper"]["k"] for n in over) > 0, "the fixture needs a marked reply"
    label = over_label(asdict(got))
    assert label.startswith("or_bench_hard_test ") and "; oktest_val " in label
    assert Verifier(lm, harmful, harmless, max_new_tokens=4)().over_refusal is None  # none asked: none made


def test_over_refusal_sets_of_the_verification_and_their_fingerprint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from refusalkit.layout import RunLayout
    from refusalkit.search.options import OptimizeOptions
    from refusalkit.search.promptsets import over_refusal_sets
    from refusalkit.search.verification import verify_cache
    from refusalkit.settings import Settings

    data = tmp_path / "data" / "over_refusal"
    data.mkdir(parents=True)
    (data / "or_bench_hard_test.json").write_text(json.dumps([{"instruction": f"q{i}"} for i in range(5)]))
    s = Settings(data_dir=str(tmp_path / "data"))
    with caplog.at_level(logging.WARNING):
        got = over_refusal_sets(s, OptimizeOptions(verify_over_refusal=3))
    assert got == {"or_bench_hard_test": ["q0", "q1", "q2"]}  # first N; the missing set skipped, said
    assert "oktest_val skipped" in caplog.text and "--verify-over-refusal 0" in caplog.text
    assert over_refusal_sets(s, OptimizeOptions(verify_over_refusal=0)) == {}
    layout, o = RunLayout(tmp_path / "run"), OptimizeOptions()
    plain = verify_cache(layout, [], {"h": ["x"]}, ["y"], o)["fingerprint"]
    assert (
        verify_cache(layout, [], {"h": ["x"]}, ["y"], o, {}, None)["fingerprint"] == plain
    )  # none: as before
    with_over = verify_cache(layout, [], {"h": ["x"]}, ["y"], o, got, "sys")["fingerprint"]
    assert with_over != plain
    assert verify_cache(layout, [], {"h": ["x"]}, ["y"], o, got, "other")["fingerprint"] != with_over
