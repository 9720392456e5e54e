"""Directional ablation and activation addition: the residual invariants, pad handling, hook hygiene."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from conftest import FAMILIES
from refusalkit.interventions import (
    ablate_direction,
    add_direction,
    capture_resid_pre,
    project_outputs,
    token_mask,
)
from refusalkit.prompts import Batch, encode, format_prompts

# Tiny models: extra threads only add overhead, and spin badly when other work shares the cores.

INSTRUCTIONS = ["hi", "Write a poem about the sea, please.", "What is 2+2?"]


def _batch(lm: Any, padding_side: str = "left") -> Batch:
    return encode(lm.tokenizer, format_prompts(lm.tokenizer, INSTRUCTIONS), padding_side)


def _forward(lm: Any, batch: Batch) -> torch.Tensor:
    with torch.no_grad(), token_mask(batch.attention_mask):
        out = lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    return out.logits


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


@contextmanager
def _record(lm: Any) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record every block's input (after hooks registered earlier) and every block's output."""
    rec: dict[str, list[torch.Tensor]] = {"pre": [], "post": []}
    handles = []
    for block in lm.arch.blocks:
        handles.append(
            block.register_forward_pre_hook(
                lambda _m, a, kw: rec["pre"].append((a[0] if a else kw["hidden_states"]).clone()),
                with_kwargs=True,
            )
        )
        handles.append(block.register_forward_hook(lambda _m, _a, o: rec["post"].append(_tensor(o).clone())))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _hook_counts(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize(
    ("family", "attn"), [(f, "eager") for f in FAMILIES] + [("qwen2", "sdpa"), ("phi3", "sdpa")]
)
def test_ablation_leaves_no_component_anywhere(make_lm: Callable[..., Any], family: str, attn: str) -> None:
    lm = make_lm(family, attn=attn)
    batch = _batch(lm)
    direction = torch.randn(lm.model.config.hidden_size) * 3
    u = direction / direction.norm()
    with _record(lm) as base:
        _forward(lm, batch)
    with ablate_direction(lm.arch, direction), _record(lm) as rec:
        _forward(lm, batch)
    real = batch.attention_mask.bool()
    assert len(rec["pre"]) == len(rec["post"]) == lm.arch.n_layers
    # The baseline has a visible component, so a ~0 projection below is the ablation's doing.
    assert (base["post"][-1][real] @ u).abs().max() > 1e-2
    for h in [*rec["pre"], *rec["post"]]:  # resid_pre of every layer and every block's output
        proj = (h[real] @ u).abs().max()
        assert proj <= 1e-5 * h[real].norm(dim=-1).max(), float(proj)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_add_direction_only_at_layer_and_real_tokens(
    make_lm: Callable[..., Any], padding_side: str, attn: str
) -> None:
    lm = make_lm("llama", attn=attn)
    batch = _batch(lm, padding_side)
    assert not batch.attention_mask.all()  # the batch has pads
    vector = torch.randn(lm.model.config.hidden_size)
    layer, coeff = 2, -1.5
    with _record(lm) as base:
        _forward(lm, batch)
    with add_direction(lm.arch, vector, layer, coeff), _record(lm) as rec:
        _forward(lm, batch)
    for earlier in range(layer):
        torch.testing.assert_close(rec["pre"][earlier], base["pre"][earlier], rtol=0, atol=0)
    delta = rec["pre"][layer] - base["pre"][layer]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(delta[real], (coeff * vector).expand_as(delta[real]), rtol=1e-5, atol=1e-5)
    assert torch.equal(delta[~real], torch.zeros_like(delta[~real]))


def test_add_direction_without_mask_adds_everywhere(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    ids = encode(lm.tokenizer, format_prompts(lm.tokenizer, ["hi"])).input_ids
    vector = torch.randn(lm.model.config.hidden_size)
    seen: list[torch.Tensor] = []
    with torch.no_grad():
        with capture_resid_pre(lm.arch, [1], lambda _layer, h: seen.append(h.clone())):
            lm.model(input_ids=ids)
        # Registered after the addition, so the capture sees the steered input.
        with (
            add_direction(lm.arch, vector, 1, 2.0),
            capture_resid_pre(lm.arch, [1], lambda _l, h: seen.append(h.clone())),
        ):
            lm.model(input_ids=ids)
    torch.testing.assert_close(seen[1] - seen[0], (2.0 * vector).expand_as(seen[0]), rtol=1e-5, atol=1e-5)


def test_add_direction_rejects_bad_layer(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    with pytest.raises(ValueError, match="out of range"), add_direction(lm.arch, torch.ones(64), 4):
        pass


def test_ablation_rejects_zero_direction(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    with pytest.raises(ValueError, match="non-zero"), ablate_direction(lm.arch, torch.zeros(64)):
        pass


@pytest.mark.parametrize("which", ["ablate", "add", "capture", "project"])
def test_hooks_removed_after_exception(make_lm: Callable[..., Any], which: str) -> None:
    lm = make_lm("gemma2")
    batch = _batch(lm)
    before = _forward(lm, batch)
    n_hooks = _hook_counts(lm.model)
    direction = torch.randn(lm.model.config.hidden_size)
    ctx = {
        "ablate": lambda: ablate_direction(lm.arch, direction),
        "add": lambda: add_direction(lm.arch, direction, 1, 4.0),
        "capture": lambda: capture_resid_pre(lm.arch, [0, 3], lambda _l, _h: None),
        "project": lambda: project_outputs([(lm.arch.mlp_write[1], direction, 0.5)]),
    }[which]
    with pytest.raises(RuntimeError, match="boom"), ctx():
        inside = _forward(lm, batch)
        assert _hook_counts(lm.model) > n_hooks
        if which != "capture":
            assert not torch.allclose(inside, before)
        raise RuntimeError("boom")
    assert _hook_counts(lm.model) == n_hooks
    assert torch.equal(_forward(lm, batch), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_project_outputs_removes_the_scaled_component(
    make_lm: Callable[..., Any], dtype: torch.dtype
) -> None:
    """Each listed module's output y becomes y - s (y.u) u (float32 products, one rounding), with its own
    direction and scale; a module not listed is left alone."""
    lm = make_lm("llama")
    lm.model.to(dtype)
    d = lm.model.config.hidden_size
    g = torch.Generator().manual_seed(4)
    writes = [
        (lm.arch.attn_write[1], torch.randn(d, generator=g), 0.6),
        (lm.arch.mlp_write[2], torch.randn(d, generator=g), -1.3),
        (lm.arch.mlp_write[0], torch.randn(d, generator=g), 0.0),  # scale 0: no change
    ]
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def spy(i: int, when: str) -> Callable[..., None]:
        def hook(_m: Any, _a: Any, out: torch.Tensor) -> None:
            seen[(i, when)] = out.clone()

        return hook

    # Forward hooks run in registration order and each sees the output the earlier ones returned.
    handles = [m.register_forward_hook(spy(i, "before")) for i, (m, _, _) in enumerate(writes)]
    try:
        with project_outputs(writes):
            handles += [m.register_forward_hook(spy(i, "after")) for i, (m, _, _) in enumerate(writes)]
            _forward(lm, _batch(lm))
    finally:
        for h in handles:
            h.remove()
    for i, (_m, direction, scale) in enumerate(writes):
        y, got = seen[(i, "before")].float(), seen[(i, "after")]
        u = (direction.double() / direction.double().norm()).float()
        assert torch.equal(got, (y - scale * (y @ u)[..., None] * u).to(dtype))
        assert torch.equal(got, seen[(i, "before")]) == (scale == 0.0)
        assert got.dtype == dtype


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_outputs_unchanged_after_context(make_lm: Callable[..., Any], family: str) -> None:
    lm = make_lm(family)
    batch = _batch(lm)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    before = _forward(lm, batch)
    direction = torch.randn(lm.model.config.hidden_size)
    with ablate_direction(lm.arch, direction):
        ablated = _forward(lm, batch)
    with add_direction(lm.arch, direction, 0):
        _forward(lm, batch)
    assert not torch.allclose(ablated, before)
    assert torch.equal(_forward(lm, batch), before)
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


def test_token_mask_resets(make_lm: Callable[..., Any]) -> None:
    """Addition skips pads only while a mask is declared; after the block (an exception included) it
    steers every position again."""
    lm = make_lm("qwen2")
    batch = _batch(lm)
    assert not batch.attention_mask.bool().all()  # left padding: pads to skip
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 3

    @torch.no_grad()
    def steered() -> torch.Tensor:  # one pass with no mask of its own
        with add_direction(lm.arch, vector, 0):
            out = lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        return out.logits

    unmasked = steered()
    with pytest.raises(KeyError), token_mask(batch.attention_mask):
        masked = steered()
        raise KeyError
    assert not torch.equal(masked, unmasked)  # the declared mask mattered
    assert torch.equal(steered(), unmasked)  # and is gone


# ---- half precision ------------------------------------------------------------------------------------

# Unit roundoff of each half-precision dtype: rounding a value to it moves it by at most 2^-p relative.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
HALF = pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF), ids=["bf16", "fp16"])


def _half_lm(
    make_lm: Callable[..., Any], family: str, dtype: torch.dtype, u: torch.Tensor, push: float
) -> Any:
    """A tiny model in ``dtype`` whose residual stream is dominated by ``u``: every embedding row gets
    ``push`` times its own norm along ``u`` (as real residuals carry a large refusal component)."""
    lm = make_lm(family)
    with torch.no_grad():
        w = lm.arch.embed.weight
        w += push * w.norm(dim=-1, keepdim=True) * u.float()
    lm.model.to(dtype)
    return lm


@HALF
@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_half_precision_ablation_rounds_once(
    make_lm: Callable[..., Any], family: str, dtype: torch.dtype
) -> None:
    """In bf16/fp16 the hooks project in float32 with a float32 unit vector and round the result once:
    each block input is exactly that rounding, and the component left along the direction is within
    one rounding, |h . u| <= 2^-p |h|. A unit vector rounded to the model dtype first misses both (in
    bf16 it leaves up to ~1.5 * 2^-8 |h| here)."""
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1))
    u64 = direction.double() / direction.double().norm()
    lm = _half_lm(make_lm, family, dtype, u64, push=16.0)
    batch = _batch(lm)
    real = batch.attention_mask.bool()
    with _record(lm) as before, ablate_direction(lm.arch, direction), _record(lm) as after:
        _forward(lm, batch)
    u32 = u64.float()
    for x, h in zip(before["pre"], after["pre"], strict=True):
        x32 = x.float()
        assert torch.equal(h, (x32 - (x32 @ u32)[..., None] * u32).to(dtype))
    for h in [*after["pre"], *after["post"]]:
        h64 = h[real].double()
        worst = float(((h64 @ u64).abs() / h64.norm(dim=-1)).max())
        assert worst <= UNIT_ROUNDOFF[dtype], worst / UNIT_ROUNDOFF[dtype]


@HALF
def test_half_precision_addition_rounds_once(make_lm: Callable[..., Any], dtype: torch.dtype) -> None:
    """Activation addition adds the float32 vector and rounds the sum once; pads stay bit for bit."""
    lm = make_lm("llama")
    lm.model.to(dtype)
    batch = _batch(lm)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(2)) / 3
    layer, coeff = 1, 1.7
    with _record(lm) as before, add_direction(lm.arch, vector, layer, coeff), _record(lm) as after:
        _forward(lm, batch)
    x, h = before["pre"][layer], after["pre"][layer]
    real = batch.attention_mask.bool()
    want = (x.float() + (coeff * vector.double()).float()).to(dtype)
    assert torch.equal(h[real], want[real])
    assert torch.equal(h[~real], x[~real])
