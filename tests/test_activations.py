"""Streaming means and last-token logits do not depend on padding side or batch size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from refusalkit.activations import last_logits, logits_for_prompts, mean_activations
from refusalkit.errors import RefusalkitError
from refusalkit.metric import refusal_metric, refusal_token_ids
from refusalkit.prompts import encode, format_prompts, post_instruction_ids

# Tiny models: extra threads only add overhead, and spin badly when other work shares the cores.

INSTRUCTIONS = [
    "hi",
    "Explain how rainbows form.",
    "Give me three names for a cat, and say why each one fits.",
    "2+2?",
    "Translate 'good morning' to French.",
]


def _prompts(lm: Any) -> list[str]:
    return format_prompts(lm.tokenizer, INSTRUCTIONS)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])
def test_means_independent_of_padding_and_batching(make_lm: Callable[..., Any], family: str) -> None:
    lm = make_lm(family)
    prompts = _prompts(lm)
    n_pos = len(post_instruction_ids(lm.tokenizer))
    left = mean_activations(lm, prompts, n_pos, batch_size=5, padding_side="left")
    right = mean_activations(lm, prompts, n_pos, batch_size=5, padding_side="right")
    single = mean_activations(lm, prompts, n_pos, batch_size=1)
    assert left.mean.shape == (n_pos, lm.arch.n_layers, lm.model.config.hidden_size)
    assert left.mean.dtype == torch.float64
    scale = single.mean.abs().max()
    torch.testing.assert_close(left.mean, single.mean, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(right.mean, single.mean, rtol=0, atol=1e-5 * scale)
    assert left.kept == right.kept == single.kept == len(prompts)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_last_logits_independent_of_padding(make_lm: Callable[..., Any], family: str) -> None:
    lm = make_lm(family)
    prompts = _prompts(lm)
    left = last_logits(lm, encode(lm.tokenizer, prompts, "left"))
    right = last_logits(lm, encode(lm.tokenizer, prompts, "right"))
    single = torch.cat([last_logits(lm, encode(lm.tokenizer, [p])) for p in prompts])
    assert left.shape == (len(prompts), lm.model.config.vocab_size)
    scale = single.abs().max()
    torch.testing.assert_close(left, single, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(right, single, rtol=0, atol=1e-5 * scale)
    # logits_for_prompts sorts by length internally; the rows come back in input order.
    torch.testing.assert_close(logits_for_prompts(lm, prompts, 2), single, rtol=0, atol=1e-5 * scale)


def test_mean_is_the_mean_of_single_prompts(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen3")
    prompts = _prompts(lm)[:3]
    each = [mean_activations(lm, [p], 2).mean for p in prompts]
    both = mean_activations(lm, prompts, 2, batch_size=2)
    torch.testing.assert_close(both.mean, torch.stack(each).mean(0), rtol=1e-6, atol=1e-6)


def test_metrics_and_filter(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    prompts = _prompts(lm)
    ids = refusal_token_ids(lm.tokenizer)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return refusal_metric(logits, ids)

    full = mean_activations(lm, prompts, 3, batch_size=2, metric=metric)
    # One float per prompt; the result holds only the means, not per-prompt activations.
    assert len(full.metrics) == full.total == full.kept == len(prompts)
    assert full.mean.shape == (3, lm.arch.n_layers, 64)
    expected = refusal_metric(logits_for_prompts(lm, prompts, 5), ids)
    torch.testing.assert_close(
        torch.tensor(full.metrics, dtype=torch.float64), expected, rtol=1e-5, atol=1e-5
    )

    sign = 1 if (expected > 0).any() else -1
    keep = [p for p, m in zip(prompts, expected.tolist(), strict=True) if (m > 0 if sign > 0 else m < 0)]
    filtered = mean_activations(lm, prompts, 3, batch_size=2, metric=metric, keep_sign=sign)
    assert filtered.kept == len(keep) and filtered.total == len(prompts)
    torch.testing.assert_close(filtered.mean, mean_activations(lm, keep, 3).mean, rtol=1e-6, atol=1e-6)


def test_filter_that_keeps_nothing_is_an_error(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    with pytest.raises(RefusalkitError, match="no prompt passed the filter"):
        mean_activations(lm, _prompts(lm), 2, metric=lambda lg: -torch.ones(lg.shape[0]), keep_sign=1)


def test_nan_activations_raise(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("llama")
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(RefusalkitError, match=r"non-finite activations at layer 2.*--dtype float32"):
        mean_activations(lm, _prompts(lm), 2)


def test_only_one_batch_is_held(make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink slices [batch, n_positions, d_model] per layer; nothing accumulates per prompt."""
    import refusalkit.activations as acts

    lm = make_lm("qwen2")
    shapes: list[tuple[int, ...]] = []
    real = acts.capture_resid_pre

    def spy(arch: Any, layers: list[int], sink: Callable[[int, torch.Tensor], None]) -> Any:
        def wrapped(layer: int, h: torch.Tensor) -> None:
            sink(layer, h)
            shapes.append(tuple(h.shape))

        return real(arch, layers, wrapped)

    monkeypatch.setattr(acts, "capture_resid_pre", spy)
    prompts = _prompts(lm)
    result = mean_activations(lm, prompts, 2, batch_size=2)
    assert len(shapes) == 3 * lm.arch.n_layers  # 3 batches x layers, one call each
    assert max(s[0] for s in shapes) == 2
    assert result.mean.shape == (2, lm.arch.n_layers, 64)
    assert result.metrics == []


@pytest.mark.parametrize(
    ("family", "attn"), [("qwen2", "eager"), ("gemma2", "eager"), ("qwen2", "sdpa"), ("llama", "sdpa")]
)
def test_shared_prefix_equals_plain_batches(make_lm: Callable[..., Any], family: str, attn: str) -> None:
    """A long system turn is a common prefix; running it once must not change the logits, hooks or not.

    After the cached prefix, a left-padded batch has its pads in the middle of each row (prefix, pads,
    prompt); sdpa and eager handle such masks differently, so both run.
    """
    from refusalkit.interventions import ablate_direction

    lm = make_lm(family, attn=attn)
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS, system="You are a careful, helpful assistant.")
    single = torch.cat([last_logits(lm, encode(lm.tokenizer, [p])) for p in prompts])
    shared = logits_for_prompts(lm, prompts, 2, share_prefix=True)
    plain = logits_for_prompts(lm, prompts, 2, share_prefix=False)
    scale = single.abs().max()
    torch.testing.assert_close(shared, single, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(plain, single, rtol=0, atol=1e-5 * scale)
    direction = torch.randn(lm.model.config.hidden_size)
    with ablate_direction(lm.arch, direction):
        single = torch.cat([last_logits(lm, encode(lm.tokenizer, [p])) for p in prompts])
        shared = logits_for_prompts(lm, prompts, 3, share_prefix=True)
    torch.testing.assert_close(shared, single, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layer", [0, 2])
def test_activation_addition_under_the_prefix_cache(
    make_lm: Callable[..., Any], attn: str, layer: int
) -> None:
    """Activation addition steers the cached prefix and every real prompt token, never the pads between
    them: the shared-prefix batches give each prompt's own logits, and the addition changes them."""
    from refusalkit.interventions import add_direction

    lm = make_lm("qwen2", attn=attn)
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS, system="You are a careful, helpful assistant.")
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    base = logits_for_prompts(lm, prompts, 3, share_prefix=True)
    with add_direction(lm.arch, vector, layer, 1.5):
        single = torch.cat([last_logits(lm, encode(lm.tokenizer, [p])) for p in prompts])
        shared = logits_for_prompts(lm, prompts, 3, share_prefix=True)
    scale = single.abs().max()
    assert (single - base).abs().max() > 1e-2 * scale  # the addition matters
    torch.testing.assert_close(shared, single, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_run_prefix_matches_a_full_pass(make_lm: Callable[..., Any], attn: str) -> None:
    """run_prefix's last logits equal a plain pass, and a copy of its cache continues a prompt exactly
    as the whole prompt run at once, leaving the cache itself as it was."""
    from refusalkit.activations import cache_kwarg, repeat_cache, run_prefix

    lm = make_lm("llama", attn=attn)
    ids = lm.tokenizer(_prompts(lm)[2], add_special_tokens=False)["input_ids"]
    cut = len(ids) // 2
    cache, logits = run_prefix(lm, ids[:cut])
    whole = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(logits, whole[cut - 1], rtol=0, atol=1e-5 * whole.abs().max())
    rest = lm.model(
        input_ids=torch.tensor([ids[cut:]]), use_cache=True, **{cache_kwarg(lm.model): repeat_cache(cache, 1)}
    ).logits[0]
    torch.testing.assert_close(rest.float(), whole[cut:], rtol=0, atol=1e-5 * whole.abs().max())
    assert cache.get_seq_length() == cut


def test_shared_prefix_never_takes_the_positions_read(make_lm: Callable[..., Any]) -> None:
    """Identical prompts share every token but the positions the mean reads stay out of the prefix."""
    lm = make_lm("qwen2")
    p = format_prompts(lm.tokenizer, ["Explain how rainbows form."], "Be brief.")[0]
    n_pos = len(post_instruction_ids(lm.tokenizer))
    alone = mean_activations(lm, [p], n_pos).mean
    torch.testing.assert_close(mean_activations(lm, [p, p, p], n_pos).mean, alone, rtol=0, atol=1e-5)
