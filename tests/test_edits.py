"""The reversible-edit core: each weight edit equals its hook, reverting is bit for bit, the precision is
float32 products rounded once, and a tied head is untied and re-tied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import refusalkit.edits as edits
from edit_cases import assert_same_logits, prompt_batch, real_logits
from refusalkit.edits import Target, edited, project, target, untie_head
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import project_outputs


def _vec(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


def _targets(lm: Any, keep_norm: bool = False) -> list[Target]:
    """A mixed edit: the embedding, some attention and MLP outputs, each with its own direction and
    scale (negative and above 1 included)."""
    arch, d = lm.arch, lm.model.config.hidden_size
    return [
        target(arch, "embed", _vec(d, 1), 0.7, keep_norm=keep_norm),
        target(arch, "attn", _vec(d, 2), 1.0, layer=0, keep_norm=keep_norm),
        target(arch, "mlp", _vec(d, 3), 1.6, layer=1, keep_norm=keep_norm),
        target(arch, "attn", _vec(d, 4), -0.4, layer=3, keep_norm=keep_norm),
        target(arch, "mlp", _vec(d, 2), 0.5, layer=3, keep_norm=keep_norm),
    ]


def _state(lm: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same_state(lm: Any, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize(
    ("family", "tied"),
    [("llama", False), ("qwen2", False), ("qwen2", True), ("gemma", True), ("phi3", False)],
)
def test_each_edit_equals_its_hook(make_lm: Callable[..., Any], family: str, tied: bool) -> None:
    lm = make_lm(family, tie_word_embeddings=tied)
    batch, targets = prompt_batch(lm), _targets(lm)
    base = real_logits(lm.model, batch)
    with project_outputs([(t.module, t.unit, t.scale) for t in targets]):
        hooked = real_logits(lm.model, batch)
    assert not torch.allclose(hooked, base, atol=1e-3)  # the edit matters, so equality means something
    with edited(lm, targets):
        weights = real_logits(lm.model, batch)
    assert_same_logits(weights, hooked)
    assert torch.equal(real_logits(lm.model, batch), base)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_restores_bit_for_bit_also_on_exception(make_lm: Callable[..., Any], tied: bool) -> None:
    lm = make_lm("llama", tie_word_embeddings=tied, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for block in lm.arch.blocks:
            block.mlp.down_proj.bias.normal_()
    state, head = _state(lm), lm.arch.unembed.weight
    # keep_norm and a module edited twice (the second edit sees the first's result) restore too.
    targets = [*_targets(lm, keep_norm=True), target(lm.arch, "mlp", _vec(64, 9), 1.0, layer=1)]
    with pytest.raises(RuntimeError, match="inside"), edited(lm, targets) as model:
        assert model is lm
        assert not torch.equal(lm.arch.embed.weight, state["model.embed_tokens.weight"])
        assert not torch.equal(
            lm.arch.blocks[1].mlp.down_proj.bias, state["model.layers.1.mlp.down_proj.bias"]
        )
        assert lm.arch.unembed.weight is not lm.arch.embed.weight
        assert lm.model.config.tie_word_embeddings is False
        raise RuntimeError("inside")
    assert _same_state(lm, state)
    assert lm.arch.unembed.weight is head
    assert (lm.arch.unembed.weight is lm.arch.embed.weight) == tied
    assert lm.model.config.tie_word_embeddings is tied


def test_head_keeps_the_original_embedding(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2", tie_word_embeddings=True)
    original = lm.arch.embed.weight.detach().clone()
    with edited(lm, _targets(lm)[:1]):
        assert torch.equal(lm.arch.unembed.weight, original)
        assert not torch.equal(lm.arch.embed.weight, original)
    assert untie_head(lm) is True and untie_head(lm) is False  # untied once; then nothing to untie
    assert torch.equal(lm.arch.unembed.weight, lm.arch.embed.weight)
    assert lm.arch.unembed.weight is not lm.arch.embed.weight


def test_an_edit_without_the_embedding_leaves_a_tied_head_tied(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2", tie_word_embeddings=True)
    with edited(lm, _targets(lm)[1:]):
        assert lm.arch.unembed.weight is lm.arch.embed.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_the_float32_edit_rounded_once(
    make_lm: Callable[..., Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = make_lm("llama", attention_bias=True)
    with torch.no_grad():
        for mod in lm.arch.attn_write:
            mod.bias.normal_()
    lm.model.to(dtype)
    monkeypatch.setattr(edits, "BLOCK", 3 * 64 + 1)  # several blocks per matrix
    targets = _targets(lm, keep_norm=False)
    want = []
    for t in targets:  # one edit per module in _targets: each sees the original weights
        for rows in t.rows():
            w32 = rows.float()  # a float32 copy, edited in float32 and rounded to the dtype once
            project(w32, t.unit, t.scale)
            want.append(w32.to(dtype))
            # Products in the half dtype itself round many entries differently: the test can tell.
            u = t.unit.to(dtype)
            low = rows - t.scale * (rows @ u)[..., None] * u
            assert not torch.equal(low, want[-1])
    state = _state(lm)
    with edited(lm, targets):
        got = [rows.clone() for t in targets for rows in t.rows()]
        assert all(g.dtype == dtype for g in got)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert _same_state(lm, state)


def test_project_rows_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row loses its scaled component, block boundaries or not, and a float32 weight is edited in
    its own storage; keep_norm keeps each row's norm."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 8, generator=g) * 4
    u = torch.randn(8, generator=g, dtype=torch.float64)
    u /= u.norm()
    ref = w.double() - 0.8 * (w.double() @ u)[:, None] * u
    monkeypatch.setattr(edits, "BLOCK", 3 * 8)  # blocks of 3 rows: 3, 3, 3, 1
    for layout in (w.clone(), w.T.clone().T):  # contiguous rows, and rows of a transposed matrix
        ptr = layout.data_ptr()
        project(layout, u, 0.8)
        assert layout.data_ptr() == ptr
        torch.testing.assert_close(layout.double(), ref, rtol=0, atol=4 * 2.0**-24 * float(w.abs().max()))
    kept = w.clone()
    project(kept, u, 1.0, keep_norm=True)
    torch.testing.assert_close(kept.norm(dim=1), w.norm(dim=1), rtol=1e-6, atol=0)
    assert float((kept.double() @ u).abs().max()) < 1e-5 * float(w.abs().max())
    bias = w[0].clone()
    project(bias, u, 1.0)  # a 1-D tensor is one row
    assert abs(float(bias.double() @ u)) < 1e-5 * float(w[0].abs().max())
    with pytest.raises(ValueError, match="cannot be projected"):
        project(torch.zeros(3, 5), u)


def test_targets_name_the_adapters_modules(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("llama", attention_bias=True)
    arch, d = lm.arch, 64
    t = target(arch, "attn", _vec(d, 1), 0.5, layer=2)
    assert (t.module, t.kind, t.name, t.scale) == (arch.attn_write[2], "linear", "attn.2", 0.5)
    assert abs(float(t.unit.norm()) - 1) < 1e-12 and t.unit.dtype == torch.float64
    assert target(arch, "mlp", _vec(d, 1), layer=3).module is arch.mlp_write[3]
    assert target(arch, "embed", _vec(d, 1)).module is arch.embed
    assert [p.shape for p in t.parameters()] == [arch.attn_write[2].weight.shape, torch.Size([d])]
    assert t.rows()[0].shape == (arch.attn_write[2].weight.shape[1], d)  # columns as rows
    with pytest.raises(ValueError, match="needs a layer"):
        target(arch, "mlp", _vec(d, 1), layer=4)
    with pytest.raises(ValueError, match="position embedding"):
        target(arch, "pos_embed", _vec(d, 1))
    with pytest.raises(ValueError, match="finite"):
        target(arch, "embed", torch.zeros(d))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_post_norm_families_refuse_untouched(make_lm: Callable[..., Any], family: str) -> None:
    lm = make_lm(family)
    state = _state(lm)
    with pytest.raises(RefusalkitError, match="normalizes each sublayer"), edited(lm, _targets(lm)):
        pass
    assert _same_state(lm, state)
