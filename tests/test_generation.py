"""Greedy generation with a shared prefix cache and finished rows leaving the batch equals
transformers' own greedy generate, with and without interventions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.generation import eos_ids, generate, generate_ids
from refusalkit.interventions import RowSteering, ablate_direction, add_direction, token_mask
from refusalkit.prompts import encode, format_prompts

SYSTEM = "You are a careful assistant who answers briefly."
INSTRUCTIONS = ["Bake a cake.", "Name a bird that cannot fly.", "Hi", "Sum 2 and 3, then double it.", "Why?"]


def hf_generate(lm: Any, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding, no cache sharing)."""
    out = []
    for p in prompts:
        b = encode(lm.tokenizer, [p])
        with token_mask(b.attention_mask):
            ids = lm.model.generate(
                input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=sorted(eos_ids(lm)),
            )  # fmt: skip
        out.append(ids[0, b.input_ids.shape[1] :].tolist())
    return out


@contextmanager
def intervention(lm: Any, kind: str) -> Iterator[None]:
    v = 2 * torch.randn(lm.arch.embed.weight.shape[1], generator=torch.Generator().manual_seed(3))
    ctx = {
        "none": nullcontext(),
        "ablate": ablate_direction(lm.arch, v),
        "add": add_direction(lm.arch, v / 4, 1),
    }
    with ctx[kind]:
        yield


@pytest.mark.parametrize("system", [SYSTEM, None], ids=["prefix", "no-prefix"])
@pytest.mark.parametrize("kind", ["none", "ablate", "add"])
def test_generate_equals_transformers_greedy(
    make_lm: Callable[..., Any], system: str | None, kind: str
) -> None:
    lm = make_lm("qwen2")
    lm.model.config._attn_implementation = "sdpa"
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS, system)
    with intervention(lm, kind):
        ours = generate_ids(lm, prompts, max_new_tokens=6, batch_size=3)
        theirs = hf_generate(lm, prompts, 6)
        texts = generate(lm, prompts, max_new_tokens=6, batch_size=3)
    assert ours == theirs
    if kind == "none":
        assert len({tuple(x) for x in ours}) > 1  # prompts got different completions
    else:
        assert ours != generate_ids(lm, prompts, max_new_tokens=6, batch_size=3)  # the hook acted
    assert texts == lm.tokenizer.batch_decode(theirs, skip_special_tokens=True)


def test_finished_rows_stop_and_leave_the_batch(make_lm: Callable[..., Any]) -> None:
    """Make a token some rows emit early the EOS: those rows end there, the others go on, and every
    completion still equals one-at-a-time generation."""
    lm = make_lm("qwen2")
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS, SYSTEM)
    first = generate_ids(lm, prompts, max_new_tokens=8, batch_size=5)
    # a token some rows emit and others do not
    stop = next(t for row in first for t in row if 0 < sum(t in r for r in first) < len(first))
    lm.model.generation_config.eos_token_id = stop
    ours = generate_ids(lm, prompts, max_new_tokens=8, batch_size=5)
    assert ours == hf_generate(lm, prompts, 8)
    lengths = [len(x) for x in ours]
    assert min(lengths) < 8 and max(lengths) == 8  # some rows stopped early, some ran to the limit


def test_done_ends_a_prompt_early_and_leaves_the_others_as_they_were(make_lm: Callable[..., Any]) -> None:
    """``done(i, ids)`` ends prompt i where it says so (its completion is the prefix up to there), the
    other prompts' completions are unchanged, and it is asked with the prompt's own index and tokens."""
    lm = make_lm("qwen2")
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS, SYSTEM)
    full = generate_ids(lm, prompts, max_new_tokens=8, batch_size=2)
    assert all(len(x) == 8 for x in full), "the fixture needs completions that reach the limit"
    asked: list[tuple[int, list[int]]] = []

    def done(i: int, ids: list[int]) -> bool:
        asked.append((i, list(ids)))
        return i in (1, 3) and len(ids) == 3

    ours = generate_ids(lm, prompts, max_new_tokens=8, batch_size=2, done=done)
    assert ours[1] == full[1][:3] and ours[3] == full[3][:3]
    assert [ours[i] for i in (0, 2, 4)] == [full[i] for i in (0, 2, 4)]
    assert all(ids == full[i][: len(ids)] for i, ids in asked)  # each prompt's own tokens so far
    assert {i for i, _ in asked} == set(range(len(prompts)))


@pytest.mark.parametrize("system", [SYSTEM, None], ids=["prefix", "no-prefix"])
def test_rows_of_different_settings_share_batches(make_lm: Callable[..., Any], system: str | None) -> None:
    """Baseline, ablation and addition rows mixed in the same batches (RowSteering) give each row what
    its setting gives alone, also when rows of some kinds finish early and leave the batch."""
    lm = make_lm("qwen2")
    lm.model.config._attn_implementation = "sdpa"
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS, system)
    d = lm.arch.embed.weight.shape[1]
    v = 2 * torch.randn(d, generator=torch.Generator().manual_seed(3))
    zero = torch.zeros(d)
    steering = RowSteering(torch.stack([zero, v / v.norm(), zero]), torch.stack([zero, zero, v / 4]), 1)
    alone = {
        0: generate_ids(lm, prompts, max_new_tokens=8, batch_size=5),
        1: None,
        2: None,
    }
    with ablate_direction(lm.arch, v):
        alone[1] = generate_ids(lm, prompts, max_new_tokens=8, batch_size=5)
    with add_direction(lm.arch, v / 4, 1):
        alone[2] = generate_ids(lm, prompts, max_new_tokens=8, batch_size=5)
    assert alone[0] != alone[1] and alone[0] != alone[2]  # the settings differ
    # a token that ends some rows early, so rows leave mixed batches
    stop = next(t for row in alone[0] for t in row if 0 < sum(t in r for r in alone[0]) < len(alone[0]))
    lm.model.generation_config.eos_token_id = stop
    alone = {k: [r[: r.index(stop) + 1] if stop in r else r for r in rows] for k, rows in alone.items()}
    kinds = [k for k in (2, 0, 1) for _ in prompts]  # kinds in another order than their index
    mixed_prompts = [p for _ in (2, 0, 1) for p in prompts]
    first: dict[int, torch.Tensor] = {}
    with steering.active(lm.arch):
        mixed = generate_ids(
            lm, mixed_prompts, max_new_tokens=8, batch_size=7, steering=steering, kinds=kinds,
            first_logits=first,
        )  # fmt: skip
    expected = [row for k in (2, 0, 1) for row in alone[k]]
    assert mixed == expected
    assert min(len(r) for r in mixed) < 8  # some rows finished early
    # each row's first-step logits are its setting's next-token logits of the prompt
    assert sorted(first) == list(range(len(mixed_prompts)))
    with ablate_direction(lm.arch, v):
        ablated = logits_for_prompts(lm, prompts, batch_size=5)
    n = len(prompts)
    torch.testing.assert_close(
        torch.stack([first[i] for i in range(2 * n, 3 * n)]), ablated, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.stack([first[i] for i in range(n, 2 * n)]),
        logits_for_prompts(lm, prompts, 5),
        atol=1e-4,
        rtol=1e-4,
    )


def test_steering_needs_its_kinds(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    d = lm.arch.embed.weight.shape[1]
    steering = RowSteering(torch.zeros(1, d), torch.zeros(1, d), 0)
    with pytest.raises(ValueError, match="one kind per prompt"):
        generate_ids(lm, ["a", "b"], steering=steering, kinds=[0])
