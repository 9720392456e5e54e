"""Coherence measurements: CE against a manual computation, KL of a model with itself, corpus windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.coherence import (
    COHERENCE_SETTINGS,
    ContinuationScores,
    available_settings,
    corpus_ce,
    corpus_windows,
    direction_projections,
    first_token_kl,
    harmless_coherence,
    intervention,
    score_continuations,
    score_settings,
)
from refusalkit.evaluation.suite_inputs import Suite
from refusalkit.interventions import ablate_direction
from refusalkit.layout import RunLayout
from refusalkit.prompts import encode, format_prompts
from refusalkit.settings import Settings
from refusalkit.stages.measure import KL_POOL, suite_files

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _direction(lm: Any, seed: int = 1) -> Direction:
    g = torch.Generator().manual_seed(seed)
    d = lm.arch.embed.weight.shape[1]
    return Direction(vector=torch.randn(d, generator=g) * 3, layer=1, position=-1)


def test_ce_matches_a_manual_computation(make_lm: Any) -> None:
    lm = make_lm("qwen2")
    tok = lm.tokenizer
    contexts = [
        tok("Hello there", add_special_tokens=False)["input_ids"],
        tok("A", add_special_tokens=False)["input_ids"],
    ]
    conts = [
        tok(" friend!", add_special_tokens=False)["input_ids"],
        tok("BCDEFG", add_special_tokens=False)["input_ids"],
    ]
    scores = score_continuations(lm, contexts, conts, batch_size=2)
    total, count = 0.0, 0
    for ctx, cont in zip(contexts, conts, strict=True):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0].double()
        pred = logits[len(ctx) - 1 : -1]
        total += float(torch.nn.functional.cross_entropy(pred, torch.tensor(cont), reduction="sum"))
        count += len(cont)
    assert torch.isfinite(scores.logprob_sum).all()
    assert scores.n_tokens.tolist() == [len(c) for c in conts]
    assert scores.ce == pytest.approx(total / count, rel=1e-5)


def test_batched_equals_one_at_a_time(make_lm: Any) -> None:
    lm = make_lm("llama")
    tok = lm.tokenizer
    ctx = [
        tok(t, add_special_tokens=False)["input_ids"]
        for t in ("short", "a much longer context here", "mid size")
    ]
    cont = [tok(t, add_special_tokens=False)["input_ids"] for t in (" x", " yz and more", " w")]
    together = score_continuations(lm, ctx, cont, batch_size=3, keep_first_logits=True)
    for i in range(3):
        alone = score_continuations(lm, [ctx[i]], [cont[i]], keep_first_logits=True)
        assert float(alone.logprob_sum[0]) == pytest.approx(float(together.logprob_sum[i]), abs=1e-4)
        assert together.first_logits is not None and alone.first_logits is not None
        torch.testing.assert_close(alone.first_logits[0], together.first_logits[i], atol=1e-4, rtol=1e-4)


def test_kl_of_the_model_with_itself_is_zero(make_lm: Any) -> None:
    lm = make_lm("qwen2")
    tok = lm.tokenizer
    ctx = [
        tok(p, add_special_tokens=False)["input_ids"]
        for p in format_prompts(tok, ["Name a color.", "Count to three."])
    ]
    a = score_continuations(lm, ctx, [[], []], keep_first_logits=True).first_logits
    b = score_continuations(lm, ctx, [[], []], keep_first_logits=True).first_logits
    assert a is not None and b is not None
    assert first_token_kl(a, b).abs().max() < 1e-9


def test_harmless_coherence_settings(make_lm: Any) -> None:
    lm = make_lm("qwen2")
    prompts = format_prompts(lm.tokenizer, ["Name a color.", "Describe a cloud."])
    out = harmless_coherence(
        lm, _direction(lm), prompts, ["Blue is nice.", "Soft and white."], available_settings(lm)
    )
    assert set(out["completion_ce"]) == {"baseline", "ablation", "actadd", "orthogonalized"}
    assert set(out["kl"]) == {"ablation", "actadd", "orthogonalized"}
    for v in out["completion_ce"].values():
        assert v["ce"] > 0 and all(x is not None for x in v["per_completion"])
    # Weight orthogonalization and ablation hooks are the same edit.
    assert out["kl"]["orthogonalized"]["mean"] == pytest.approx(
        out["kl"]["ablation"]["mean"], rel=1e-3, abs=1e-4
    )
    assert out["completion_ce"]["orthogonalized"]["ce"] == pytest.approx(
        out["completion_ce"]["ablation"]["ce"], rel=1e-3
    )
    assert out["kl"]["ablation"]["mean"] > 0


def test_post_norm_families_are_not_orthogonalized(make_lm: Any) -> None:
    """Gemma 2 normalizes each sublayer's output before the residual add: its adapter says weights
    cannot be orthogonalized exactly, so coherence never measures that setting for it."""
    assert available_settings(make_lm("gemma2")) == ["baseline", "ablation", "actadd"]
    assert available_settings(make_lm("gemma")) == list(COHERENCE_SETTINGS)


def test_kl_on_separate_prompts_with_median_and_max(make_lm: Any) -> None:
    lm = make_lm("qwen2")
    d = _direction(lm)
    prompts = format_prompts(lm.tokenizer, ["Name a color."])
    kl_prompts = format_prompts(lm.tokenizer, ["Count to three.", "Describe a cloud.", "Say hi."])
    out = harmless_coherence(lm, d, prompts, ["Blue."], ["baseline", "ablation"], kl_prompts=kl_prompts)
    assert out["n_prompts"] == 1 and out["n_kl_prompts"] == 3
    kl = out["kl"]["ablation"]
    assert len(kl["per_prompt"]) == 3
    values = torch.tensor(kl["per_prompt"])
    assert kl["mean"] == pytest.approx(float(values.mean())) and kl["max"] == pytest.approx(
        float(values.max())
    )
    assert kl["median"] == pytest.approx(float(values.median()))


def test_kl_prompts_are_topped_up_disjoint_from_train_and_val(tmp_path: Path) -> None:
    """Fewer harmless test prompts than kl_n: the rest come from the broad pool, never from train/val."""
    pool = [f"Pool instruction {i}." for i in range(20)]
    pool_file = tmp_path.joinpath(*KL_POOL)  # the measure stage's place for it under the data folder
    pool_file.parent.mkdir(parents=True)
    pool_file.write_text(json.dumps(pool))
    splits = {
        "harmless_train": pool[:5],
        "harmless_val": pool[5:8],
        "harmless_test": ["Own test prompt A.", "Own test prompt B."],
    }
    settings = Settings(kl_n=10, data_dir=str(tmp_path))
    files = suite_files(RunLayout(tmp_path / "run"), settings)
    assert files.kl_pool == str(pool_file)
    suite = Suite(settings, files, None, splits, {}, lambda: None)  # type: ignore[arg-type]
    chosen, source = suite.kl_instructions
    assert len(chosen) == 10 and chosen[:2] == splits["harmless_test"]
    assert not set(chosen) & set(pool[:8]) and str(pool_file) in source
    many = Suite(Settings(kl_n=2, data_dir=str(tmp_path)), files, None, splits, {}, lambda: None)  # type: ignore[arg-type]
    assert many.kl_instructions == (splits["harmless_test"], "harmless_test")
    # Without the pool file (a fresh clone): the harmless training source tops the prompts up.
    assert (
        suite_files(RunLayout(tmp_path), Settings(data_dir=str(tmp_path / "none"))).kl_pool
        == "builtin:harmless"
    )


def test_corpus_windows_and_ce(make_lm: Any, tmp_path: Path) -> None:
    lm = make_lm("qwen2")
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    windows = corpus_windows(lm.tokenizer, path, 3, 32)
    assert [len(w) for w in windows] == [32, 32, 32]
    assert windows[0] == lm.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:32]
    out = corpus_ce(lm, _direction(lm), windows, ["baseline", "ablation"], batch_size=2)
    assert out["n_tokens_scored"] == 3 * 31
    assert all(torch.isfinite(torch.tensor(v)) for v in out["ce"].values())
    assert out["ce"]["baseline"] == pytest.approx(sum(out["ce_per_window"]["baseline"]) / 3, rel=1e-6)


def test_missing_corpus_says_what_to_do(make_lm: Any, tmp_path: Path) -> None:
    lm = make_lm("qwen2")
    with pytest.raises(RefusalkitError, match="--corpus PATH"):
        corpus_windows(lm.tokenizer, tmp_path / "nope.txt", 2, 16)


def test_short_corpus_is_an_error(make_lm: Any, tmp_path: Path) -> None:
    lm = make_lm("qwen2")
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(RefusalkitError, match="fewer than"):
        corpus_windows(lm.tokenizer, path, 2, 16)


def test_one_pass_gives_kl_and_ce_as_separate_passes_would(make_lm: Any) -> None:
    """Coherence runs each setting once over the KL prompts, the CE prompts among them carrying their
    completions: KL and CE equal what one prompt at a time gives, also for a CE prompt outside the KL
    set and with the shared system prefix in play."""
    lm = make_lm("qwen2")
    d = _direction(lm)
    tok = lm.tokenizer
    ce_prompts = format_prompts(tok, ["Name a color.", "Describe a cloud.", "Spell cat."], "Be brief.")
    completions = ["Blue is nice.", "Soft and white.", "C-A-T."]
    kl_prompts = [
        ce_prompts[1],
        *format_prompts(tok, ["Count to three.", "Say hi."], "Be brief."),
        ce_prompts[0],
    ]
    out = harmless_coherence(lm, d, ce_prompts, completions, ["baseline", "ablation"], kl_prompts=kl_prompts)

    def one(p: str, c: str) -> ContinuationScores:
        ctx, cont = (
            tok(p, add_special_tokens=False)["input_ids"],
            tok(c, add_special_tokens=False)["input_ids"],
        )
        return score_continuations(lm, [ctx], [cont], keep_first_logits=True)

    expected_ce = []
    for p, c in zip(ce_prompts, completions, strict=True):
        with ablate_direction(lm.arch, d.vector):
            s = one(p, c)
        expected_ce.append(float(-s.logprob_sum[0] / s.n_tokens[0]))
    assert out["completion_ce"]["ablation"]["per_completion"] == pytest.approx(expected_ce, rel=1e-4)
    expected_kl = []
    for p in kl_prompts:
        base = one(p, "").first_logits
        with ablate_direction(lm.arch, d.vector):
            edited = one(p, "").first_logits
        assert base is not None and edited is not None
        expected_kl.append(float(first_token_kl(base, edited)[0]))
    assert out["kl"]["ablation"]["per_prompt"] == pytest.approx(expected_kl, rel=1e-3, abs=1e-7)
    assert out["n_kl_prompts"] == 4 and out["n_prompts"] == 3


@pytest.mark.parametrize("position", [-1, -3])
def test_direction_projections_equal_hidden_states(make_lm: Any, position: int) -> None:
    """x . r^ at the direction's position, every layer, equals transformers' own hidden states
    (hidden_states[l] is resid_pre[l]) for prompts run one at a time."""
    lm = make_lm("qwen2")
    d = _direction(lm)
    d = Direction(d.vector, d.layer, position)
    prompts = format_prompts(lm.tokenizer, ["Name a color.", "Describe a big cloud.", "Hi"], "Be brief.")
    got = direction_projections(lm, prompts, d, batch_size=2)
    u = d.unit.double()
    for p, row in zip(prompts, got, strict=True):
        b = encode(lm.tokenizer, [p])
        with torch.inference_mode():
            hs = lm.model(**{"input_ids": b.input_ids}, output_hidden_states=True).hidden_states
        expected = [float(hs[layer][0, position].double() @ u) for layer in range(lm.arch.n_layers)]
        assert row == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("chat", [True, False])
def test_actadd_restarted_at_its_layer_equals_the_hooked_pass(
    make_lm: Any, family: str, chat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chat: formatted prompts share a system-turn prefix (its cache replayed too); plain ones do not.
    import refusalkit.evaluation.continuations as coh  # where the replay runs

    replayed = []
    real = coh.run_blocks
    monkeypatch.setattr(coh, "run_blocks", lambda *a, **k: replayed.append(1) or real(*a, **k))
    lm = make_lm(family)
    tok = lm.tokenizer
    texts = ["Name a color.", "Count to three, slowly please.", "Hi"]
    prompts = format_prompts(tok, texts) if chat else texts
    ctx = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    conts = [tok(t, add_special_tokens=False)["input_ids"] for t in (" Blue, mostly.", "", " One two")]
    d = _direction(lm)
    d.layer = 2
    runs = score_settings(lm, d, ctx, conts, ["baseline", "actadd"], batch_size=2, keep_first_logits=True)
    with intervention(lm, "actadd", d):
        hooked = score_continuations(lm, ctx, conts, batch_size=2, keep_first_logits=True)
    assert runs["actadd"].first_logits is not None and hooked.first_logits is not None
    assert not torch.allclose(runs["actadd"].first_logits, runs["baseline"].first_logits, atol=1e-2)
    torch.testing.assert_close(runs["actadd"].first_logits, hooked.first_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs["actadd"].logprob_sum, hooked.logprob_sum, atol=1e-4, rtol=1e-5)
    assert len(replayed) > 2  # the self-check and the batches ran as a restart, not as hooked passes


def test_actadd_falls_back_to_the_hooked_pass_when_a_restart_is_not_exact(
    make_lm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import refusalkit.evaluation.continuations as coh  # where the replay runs

    lm = make_lm("qwen2")
    tok = lm.tokenizer
    ctx = [
        tok(p, add_special_tokens=False)["input_ids"] for p in format_prompts(tok, ["Name a color.", "Hi"])
    ]
    d = _direction(lm)
    real = coh.head_logits
    calls = []

    def off(lm_: Any, h: torch.Tensor) -> torch.Tensor:  # a head that the replay gets wrong
        calls.append(1)
        return real(lm_, h) + 1.0

    monkeypatch.setattr(coh, "head_logits", off)
    runs = score_settings(lm, d, ctx, [[], []], ["baseline", "actadd"], keep_first_logits=True)
    with intervention(lm, "actadd", d):
        hooked = score_continuations(lm, ctx, [[], []], keep_first_logits=True)
    assert calls == [1]  # only the self-check replayed
    torch.testing.assert_close(runs["actadd"].first_logits, hooked.first_logits)
