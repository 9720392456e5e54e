"""Capability measurements: GSM8K number parsing, TruthfulQA MC1/MC2 construction and scoring."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation import capability as C
from refusalkit.evaluation.coherence import score_continuations


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


@pytest.mark.parametrize(("family", "attn"), [("qwen2", "eager"), ("gemma2", "eager"), ("qwen2", "sdpa")])
def test_cached_option_scoring_equals_uncached(make_lm: Any, family: str, attn: str) -> None:
    lm = make_lm(family, attn=attn)
    tok = lm.tokenizer
    ctx = tok("<|im_start|>user\nPick one<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
        "input_ids"
    ]
    opts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("yes", "no, not really", "it depends")]
    cached = C.option_logprobs(lm, ctx, opts)
    plain = score_continuations(lm, [ctx] * 3, opts).logprob_sum
    torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-5)


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


def test_option_scoring_leaves_the_context_cache_as_it_was(
    make_lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The context's KV cache is copied for the options, never extended in place (a cache shared with
    another caller would otherwise hold the options' keys too)."""
    from refusalkit.activations import run_prefix

    lm = make_lm("llama")
    seen: list[Any] = []

    def spy(lm_: Any, ids: list[int]) -> Any:
        cache, logits = run_prefix(lm_, ids)
        seen.append(cache)
        return cache, logits

    monkeypatch.setattr(C, "run_prefix", spy)
    ctx, opts = [5, 6, 7, 8], [[9], [10, 11, 12]]
    first = C.option_logprobs(lm, ctx, opts)
    (cache,) = seen
    assert cache.get_seq_length() == len(ctx)
    assert all(layer.keys.shape[0] == 1 for layer in cache.layers)  # still one row, not repeated
    torch.testing.assert_close(C.option_logprobs(lm, ctx, opts), first, rtol=0, atol=0)
