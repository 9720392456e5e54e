"""Capability measurements: GSM8K number parsing, TruthfulQA MC1/MC2 construction and scoring."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from refusalkit.activations import common_prefix_len
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation import capability as C
from refusalkit.evaluation.coherence import MIN_PREFIX, score_continuations
from refusalkit.interventions import ablate_direction, add_direction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the total is 18.", "18"),
        ("The answer is $1,234.50.", "1234.5"),
        ("First 3 apples, then 4, so -7 is wrong; The answer is 7", "7"),
        ("It costs 2.0 dollars", "2"),
        ("no digits here", None),
        ("0.5 of 10 = 5.00", "5"),
    ],
)
def test_last_number_in_a_generation(text: str, expected: str | None) -> None:
    assert C.parse_prediction(text) == expected


def test_reference_after_four_hashes() -> None:
    assert C.parse_reference("2 + 2 = <<2+2=4>>4 apples\n#### 4") == "4"
    assert C.parse_reference("...\n#### 1,000") == "1000"
    with pytest.raises(RefusalkitError, match="####"):
        C.parse_reference("no final answer")


def _gsm8k(tmp_path: Path) -> Path:
    path = tmp_path / "test.jsonl"
    rows = [
        {"question": "Tom has 2 pens and buys 2 more. How many pens?", "answer": "2+2=4\n#### 4"},
        {"question": "A box holds 10 beads; 3 fall out. How many remain?", "answer": "10-3=7\n#### 7"},
        {"question": "Unused third problem?", "answer": "#### 1"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_load_gsm8k_first_n_and_missing_file(tmp_path: Path) -> None:
    problems = C.load_gsm8k(_gsm8k(tmp_path), 2)
    assert [p["reference"] for p in problems] == ["4", "7"]
    with pytest.raises(RefusalkitError, match="not found"):
        C.load_gsm8k(tmp_path / "missing.jsonl", 2)


def test_gsm8k_accuracy_runs_on_a_tiny_model(make_lm: Any, tmp_path: Path) -> None:
    lm = make_lm("qwen2")
    out = C.gsm8k_accuracy(lm, C.load_gsm8k(_gsm8k(tmp_path), 2), max_new_tokens=6, batch_size=2)
    assert out["n"] == 2 and 0.0 <= out["accuracy"] <= 1.0
    assert {"reference", "prediction", "correct", "hit_max_new_tokens", "completion"} <= set(out["rows"][0])


def _tqa(tmp_path: Path) -> Path:
    path = tmp_path / "TruthfulQA.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(
            f,
            ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"],
        )
        w.writeheader()
        w.writerow(
            {
                "Type": "A",
                "Category": "c",
                "Question": "What color is the made-up sky of Zorb?",
                "Best Answer": "Nobody knows",
                "Correct Answers": "Nobody knows; It is unknown",
                "Incorrect Answers": "Green; Purple; Nobody knows",
                "Source": "x",
            }
        )
        w.writerow(
            {
                "Type": "A",
                "Category": "c",
                "Question": "How many legs does a plain chair have?",
                "Best Answer": "Usually four",
                "Correct Answers": "Four; Usually four",
                "Incorrect Answers": "Ten",
                "Source": "x",
            }
        )
        w.writerow(
            {
                "Type": "A",
                "Category": "c",
                "Question": "Skipped: no incorrect answers?",
                "Best Answer": "Yes",
                "Correct Answers": "Yes",
                "Incorrect Answers": "",
                "Source": "x",
            }
        )
        w.writerow(
            {
                "Type": "A",
                "Category": "c",
                "Question": "Skipped: its only incorrect answer is also listed as correct?",
                "Best Answer": "Yes",
                "Correct Answers": "Yes",
                "Incorrect Answers": "Yes",
                "Source": "x",
            }
        )
    return path


def test_truthfulqa_construction(tmp_path: Path) -> None:
    items = C.load_truthfulqa(_tqa(tmp_path), 10)
    assert len(items) == 2
    a, b = items
    assert a.best == "Nobody knows" and a.correct == ["Nobody knows", "It is unknown"]
    assert a.incorrect == ["Green", "Purple"]  # an answer listed as both correct and incorrect stays correct
    assert b.correct == ["Usually four", "Four"]
    with pytest.raises(RefusalkitError, match="not found"):
        C.load_truthfulqa(tmp_path / "none.csv", 2)


def test_mc_scores_against_a_hand_computation() -> None:
    item = C.TQAItem("q", "a", ["a", "b"], ["c", "d", "e"])
    s = C.mc_scores(item, {"a": -1.0, "b": -2.0, "c": -1.5, "d": -3.0, "e": -0.5})
    assert s["mc1"] == 0.0  # "e" (-0.5) beats the best answer (-1.0)
    # MC2 = (e^-1 + e^-2) / (e^-1 + e^-2 + e^-1.5 + e^-3 + e^-0.5)
    #     = (0.367879 + 0.135335) / (0.367879 + 0.135335 + 0.223130 + 0.049787 + 0.606531) = 0.363946
    assert s["mc2"] == pytest.approx(0.363946, abs=1e-6)
    s = C.mc_scores(item, {"a": 0.0, "b": -9.0, "c": -1.0, "d": -1.0, "e": -1.0})
    assert s["mc1"] == 1.0  # the best answer beats every incorrect one, whatever "b" scores
    # (1 + e^-9) / (1 + e^-9 + 3 e^-1) = 1.000123 / 2.103762 = 0.475398
    assert s["mc2"] == pytest.approx(0.475398, abs=1e-6)


def _alone(lm: Any, context: list[int], options: list[list[int]]) -> torch.Tensor:
    """Each option's summed log-probability from one full pass over context + option, no cache, no pads."""
    out = []
    for o in options:
        ids = torch.tensor([context + o])
        logp = torch.log_softmax(lm.model(input_ids=ids, use_cache=False).logits[0].double(), -1)
        rows = torch.arange(len(context) - 1, len(context) + len(o) - 1)
        out.append(logp[rows, torch.tensor(o)].sum())
    return torch.stack(out)


QUESTIONS = ("Pick one", "Which of these would you choose on a rainy day?", "Why?")
OPTIONS = (
    ("yes", "no, not really", "it depends"),
    ("an umbrella", "a", "boots and a coat, maybe a hat"),
    ("because", "no reason at all", "x"),
)


def _questions(lm: Any) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Chat-formatted contexts of different lengths sharing a system turn; options of 1 to ~30 tokens."""
    tok = lm.tokenizer
    contexts = [
        tok(C.format_prompt(tok, q, "Answer briefly."), add_special_tokens=False)["input_ids"]
        for q in QUESTIONS
    ]
    options = [[tok(t, add_special_tokens=False)["input_ids"] for t in opts] for opts in OPTIONS]
    return contexts, options


@pytest.mark.parametrize(("family", "attn"), [("qwen2", "eager"), ("gemma2", "eager"), ("qwen2", "sdpa")])
def test_batched_option_scoring_equals_each_option_alone(
    make_lm: Any, monkeypatch: pytest.MonkeyPatch, family: str, attn: str
) -> None:
    """All questions scored together (shared prefix, left-padded contexts, options of several questions
    in one right-padded pass) give each option's log-probability from a pass of its own."""
    lm = make_lm(family, attn=attn)
    contexts, options = _questions(lm)
    assert common_prefix_len(contexts) >= MIN_PREFIX  # the prefix cache is exercised
    assert len({len(c) for c in contexts}) == 3
    expected = [_alone(lm, c, o) for c, o in zip(contexts, options, strict=True)]
    one_pass = C.option_logprobs(lm, contexts, options)  # one context pass, one option pass
    # Two context groups, and option passes of 3 rows mixing questions of different context lengths.
    monkeypatch.setattr(C, "QUESTION_ROWS", 2)
    monkeypatch.setattr(C, "OPTION_ROWS", 3)
    small = C.option_logprobs(lm, contexts, options)
    for got in (one_pass, small):
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("setting", ["ablation", "actadd"])
def test_batched_option_scoring_under_an_intervention(make_lm: Any, setting: str) -> None:
    """Under an active hook the batched scores equal each question scored on its own under it."""
    lm = make_lm("qwen2")
    contexts, options = _questions(lm)
    torch.manual_seed(1)
    direction = torch.randn(lm.model.config.hidden_size) * 4
    if setting == "ablation":
        edit = ablate_direction(lm.arch, direction)
    else:
        edit = add_direction(lm.arch, direction, 1, -1.0)
    with torch.inference_mode():
        plain = [_alone(lm, c, o) for c, o in zip(contexts, options, strict=True)]
    with edit:
        with torch.inference_mode():
            expected = [_alone(lm, c, o) for c, o in zip(contexts, options, strict=True)]
        got = C.option_logprobs(lm, contexts, options)
    for g, e, p in zip(got, expected, plain, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)
        assert (e - p).abs().max() > 1e-2  # the edit changes the scores: the hook was active


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_option_scoring_without_a_shared_prefix(make_lm: Any, attn: str) -> None:
    """Contexts sharing fewer than MIN_PREFIX tokens run whole (left padded), and one question alone."""
    lm = make_lm("llama", attn=attn)
    contexts = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 40, 41], [90]]
    options = [[[9], [10, 11, 12]], [[12, 13], [14], [15, 16, 17, 18]], [[20, 21], [22]]]
    assert common_prefix_len(contexts) < MIN_PREFIX
    got = C.option_logprobs(lm, contexts, options)
    for g, c, o in zip(got, contexts, options, strict=True):
        torch.testing.assert_close(g, _alone(lm, c, o), atol=1e-4, rtol=1e-5)
    (single,) = C.option_logprobs(lm, contexts[:1], options[:1])
    torch.testing.assert_close(single, _alone(lm, contexts[0], options[0]), atol=1e-4, rtol=1e-5)


def test_option_batches_keep_logits_under_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(C, "LOGIT_BUDGET", 1000)
    for lengths in ([3, 1, 9, 2, 2, 7, 30, 1, 4, 4, 5], [10] * 20 + [12]):
        chunks = C._option_batches(lengths, vocab=10)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        for c in chunks:
            width = max(lengths[i] for i in c)
            assert len(c) <= C.OPTION_ROWS
            assert len(c) == 1 or len(c) * width * 10 <= 1000
        assert len(chunks) < len(lengths)  # short options share passes
    monkeypatch.setattr(C, "OPTION_ROWS", 2)
    assert max(len(c) for c in C._option_batches(lengths, vocab=10)) == 2


def test_truthfulqa_on_a_tiny_model(make_lm: Any, tmp_path: Path) -> None:
    """MC1 and MC2 against the same answers scored one by one, without the shared context cache."""
    lm = make_lm("qwen2")
    tok = lm.tokenizer
    items = C.load_truthfulqa(_tqa(tmp_path), 2)
    out = C.truthfulqa_mc(lm, items)
    assert out["n"] == 2
    for item, row in zip(items, out["rows"], strict=True):
        context = tok(C.format_prompt(tok, item.question), add_special_tokens=False)["input_ids"]
        answers = item.correct + item.incorrect
        ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
        lp = score_continuations(lm, [context] * len(ids), ids).logprob_sum.tolist()
        p = [math.exp(x - max(lp)) for x in lp]
        mc2 = sum(p[: len(item.correct)]) / sum(p)
        assert row["mc2"] == pytest.approx(mc2, abs=1e-4)
        assert row["mc1"] == float(all(lp[0] > x for x in lp[len(item.correct) :]))
    assert out["mc2"] == pytest.approx(sum(r["mc2"] for r in out["rows"]) / 2)


def test_lm_eval_missing_is_a_clear_error(make_lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(RefusalkitError, match=r"refusalkit\[lm-eval\]"):
        C.lm_eval_tasks(make_lm("qwen2"), ["arc_easy"])


def test_option_scoring_leaves_the_prefix_cache_as_it_was(
    make_lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared prefix's KV cache is copied for every batch, never extended in place (the second
    context group would otherwise continue from the first group's tokens)."""
    from refusalkit.activations import prefix_cache

    lm = make_lm("llama")
    seen: list[Any] = []

    def spy(lm_: Any, ids: list[int]) -> Any:
        seen.append(prefix_cache(lm_, ids))
        return seen[-1]

    monkeypatch.setattr(C, "prefix_cache", spy)
    monkeypatch.setattr(C, "QUESTION_ROWS", 1)
    shared = list(range(5, 15))
    contexts = [[*shared, 20], [*shared, 21, 22]]
    options = [[[9], [10, 11, 12]], [[13, 14]]]
    first = C.option_logprobs(lm, contexts, options)
    (cache,) = seen
    assert cache.get_seq_length() == 10
    assert all(layer.keys.shape[0] == 1 for layer in cache.layers)  # still one row, not repeated
    for g, c, o in zip(first, contexts, options, strict=True):
        torch.testing.assert_close(g, _alone(lm, c, o), atol=1e-4, rtol=1e-5)


def test_every_scoring_pass_declares_its_real_tokens(make_lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hooks read the real-token mask (``token_mask``) to leave pads alone: each pass declares one, so
    activation addition (which reads it) changes exactly the non-pad tokens it runs, in every pass."""
    from refusalkit.interventions import get_hidden

    lm = make_lm("qwen2")
    contexts, options = _questions(lm)
    monkeypatch.setattr(C, "OPTION_ROWS", 3)
    ids_seen: list[torch.Tensor] = []
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []

    def record(into: list[torch.Tensor]) -> Any:
        def hook(_module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            into.append(get_hidden(args, kwargs).detach().clone())

        return hook

    block = lm.arch.blocks[0]
    handles = [
        lm.model.register_forward_pre_hook(
            lambda _m, _a, kw: ids_seen.append(kw["input_ids"]), with_kwargs=True
        ),
        block.register_forward_pre_hook(record(before), with_kwargs=True),
    ]
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    try:
        with add_direction(lm.arch, vector, 0):  # its hook runs between the two recorders
            handles.append(block.register_forward_pre_hook(record(after), with_kwargs=True))
            C.option_logprobs(lm, contexts, options)
    finally:
        for h in handles:
            h.remove()
    assert len(ids_seen) >= 4 and len(before) == len(after) == len(ids_seen)  # prefix, contexts, options
    pad = lm.tokenizer.pad_token_id
    assert any(bool((ids == pad).any()) for ids in ids_seen)  # some pads, or the test shows nothing
    for ids, x, y in zip(ids_seen, before, after, strict=True):
        steered = (y - x).abs().sum(-1) > 0
        assert torch.equal(steered, ids != pad)
