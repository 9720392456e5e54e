"""The cheap selection passes equal the plain hooked passes: candidates sharing a forward pass, and
activation addition restarted at its layer from recorded residuals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from refusalkit.activations import encode_batches, length_batches, logits_for_prompts
from refusalkit.interventions import ablate_direction, add_direction
from refusalkit.prompts import format_prompts
from refusalkit.selection.passes import ResidReplay, ablated_logits

SYSTEM = "You are a careful assistant who answers briefly."  # a shared prefix long enough to cache
INSTRUCTIONS = ["Bake a cake.", "Name a bird that cannot fly at all.", "Hi", "Sum 2 and 3, then double it."]


def _prompts(lm: Any, system: str | None) -> list[str]:
    return format_prompts(lm.tokenizer, INSTRUCTIONS, system)


@pytest.mark.parametrize("system", [SYSTEM, None], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shared_ablation_pass_equals_one_candidate_at_a_time(
    make_lm: Callable[..., Any], attn: str, system: str | None
) -> None:
    lm = make_lm("qwen2")
    lm.model.config._attn_implementation = attn
    prompts = _prompts(lm, system)
    enc = encode_batches(lm, prompts, batch_size=3)  # padding inside batches, two batches
    assert bool(enc.prefix) == (system is not None)
    dirs = torch.randn(3, lm.arch.embed.weight.shape[1], generator=torch.Generator().manual_seed(1))
    shared = ablated_logits(lm, enc, dirs)
    assert shared.shape == (3, len(prompts), lm.arch.unembed.weight.shape[0])
    for j in range(3):
        with ablate_direction(lm.arch, dirs[j]):
            plain = logits_for_prompts(lm, prompts, 2, share_prefix=False)
        torch.testing.assert_close(shared[j], plain, atol=2e-4, rtol=1e-4)
    baseline = logits_for_prompts(lm, prompts, 2, share_prefix=False)
    assert (shared[0] - baseline).abs().max() > 1e-2  # the ablation did something


@pytest.mark.parametrize(
    ("family", "attn", "system"),
    [
        ("qwen2", "eager", SYSTEM),
        ("qwen2", "sdpa", SYSTEM),
        ("qwen2", "sdpa", None),
        ("llama", "eager", None),
        ("gemma2", "eager", SYSTEM),  # final logit soft-capping, sliding-window layers
        ("gemma3_text", "eager", SYSTEM),  # local and global rotary embeddings
    ],
)
def test_addition_restarted_at_its_layer_equals_full_pass(
    make_lm: Callable[..., Any], family: str, attn: str, system: str | None
) -> None:
    lm = make_lm(family)
    lm.model.config._attn_implementation = attn
    prompts = _prompts(lm, system)
    enc = encode_batches(lm, prompts, batch_size=3)
    replay = ResidReplay(lm, enc, [1, 2, 3])
    assert replay.exact  # the self-check passed: restarts are used
    torch.testing.assert_close(replay.baseline, logits_for_prompts(lm, prompts, 2, share_prefix=False))
    vs = 3 * torch.randn(3, lm.arch.embed.weight.shape[1], generator=torch.Generator().manual_seed(2))
    for layer in (1, 3):
        restarted = replay.added_logits(vs, layer)  # three candidates sharing each pass
        assert restarted.shape == (3, len(prompts), lm.arch.unembed.weight.shape[0])
        for v, got in zip(vs, restarted, strict=True):
            with add_direction(lm.arch, v, layer):
                plain = logits_for_prompts(lm, prompts, 2, share_prefix=False)
            torch.testing.assert_close(got, plain, atol=2e-4, rtol=1e-4)
            assert (got - replay.baseline).abs().max() > 1e-2


def test_addition_falls_back_when_the_restart_is_wrong(
    make_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose head the replay gets wrong fails the self-check and gets full hooked passes."""
    lm = make_lm("qwen2")
    prompts = _prompts(lm, SYSTEM)
    # No final norm: wrong numbers, which the self-check must notice.
    monkeypatch.setattr(ResidReplay, "_head", lambda self, h: lm.arch.unembed(h)[:, -1].float())
    replay = ResidReplay(lm, encode_batches(lm, prompts, 4), [1, 2])
    assert not replay.exact
    v = torch.randn(lm.arch.embed.weight.shape[1])
    with add_direction(lm.arch, v, 2):
        plain = logits_for_prompts(lm, prompts, 4)
    torch.testing.assert_close(replay.added_logits(v[None], 2)[0], plain)


def test_length_batches_split_off_long_prompts() -> None:
    lengths = [10] * 15 + [60]
    out = length_batches(list(range(16)), lengths, 16)
    assert out == [list(range(15)), [15]]  # the long one alone: 15*10 + 60 + 2 batches < 16*60
    even = length_batches(list(range(40)), [12] * 40, 16)
    assert len(even) == 3 and max(len(b) for b in even) <= 16  # batch_size holds; no extra batches
    assert [i for b in even for i in b] == list(range(40))


def test_length_batches_cut_finer_when_passes_cost_less() -> None:
    # Lengths 17..23 (a selection's harmful prompts): with a pass costing 32 tokens one batch wins
    # (7 * 23 + 32 < anything cut); at 2 tokens a pass (shared by 16 candidates) padding dominates.
    lengths = list(range(17, 24))
    assert length_batches(list(range(7)), lengths, 16) == [list(range(7))]
    fine = length_batches(list(range(7)), lengths, 16, overhead=2)
    assert len(fine) > 1 and [i for b in fine for i in b] == list(range(7))
    padded = sum(len(b) * lengths[b[-1]] + 2 for b in fine)
    assert padded < 7 * 23 + 2
