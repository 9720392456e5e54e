"""Searched edits: every hook-equivalent edit equals its hook, reverting is bit-exact, the paper's edit is
the paper's orthogonalization, and the norm-preserving edit keeps the norms it promises."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from edit_cases import assert_same_logits, prompt_batch, real_logits
from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.orthogonalize import orthogonalize_weights
from refusalkit.search.edit import (
    EditParams,
    Kernel,
    applied_edit,
    direction_at,
    hooked_edit,
    plan,
)


def make_candidates(n_layers: int, d_model: int, n_positions: int = 3, seed: int = 3) -> Candidates:
    """Made-up means: each layer's direction differs, and the harmless mean overlaps it."""
    g = torch.Generator().manual_seed(seed)
    harmless = torch.randn(n_positions, n_layers, d_model, generator=g, dtype=torch.float64) * 3
    harmful = harmless + torch.randn(n_positions, n_layers, d_model, generator=g, dtype=torch.float64) * 5
    return Candidates(harmful, harmless, ["a", "b", "c"][:n_positions])


def _cands(lm: Any) -> Candidates:
    return make_candidates(lm.arch.n_layers, lm.model.config.hidden_size)


EDITS = {
    "candidate": EditParams(source="candidate", layer=2, position=-1),
    "interpolated-projected": EditParams(
        source="interpolated",
        layer=1.4,
        position=-2,
        projected=True,
        attn=Kernel(peak=1.3, position=2.5, minimum=0.2, width=2.0),
        mlp=Kernel(peak=0.7, position=1.0, minimum=0.0, width=1.5),
    ),
    "per-layer-embed": EditParams(
        source="per_layer", position=-3, attn=Kernel(peak=0.0), mlp=Kernel(peak=0.9), embed=0.6
    ),
    "paper": EditParams.orthogonalization(layer=1, position=-1),
}


@pytest.mark.parametrize("name", list(EDITS))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_weight_edit_equals_hooks(make_lm: Callable[..., Any], name: str, tied: bool) -> None:
    lm = make_lm("qwen2", tie_word_embeddings=tied)
    cands, params, batch = _cands(lm), EDITS[name], prompt_batch(lm)
    base = real_logits(lm.model, batch)
    with hooked_edit(lm, cands, params):
        hooked = real_logits(lm.model, batch)
    assert not torch.allclose(hooked, base, atol=1e-3)  # the edit matters, so equality means something
    with applied_edit(lm, cands, params):
        assert_same_logits(real_logits(lm.model, batch), hooked)
    assert torch.equal(real_logits(lm.model, batch), base)


@pytest.mark.parametrize("family", ["llama", "gemma", "phi3"])
def test_equals_hooks_other_families(make_lm: Callable[..., Any], family: str) -> None:
    lm = make_lm(family)
    cands, params, batch = _cands(lm), EDITS["interpolated-projected"], prompt_batch(lm)
    base = real_logits(lm.model, batch)
    with hooked_edit(lm, cands, params):
        hooked = real_logits(lm.model, batch)
    assert not torch.allclose(hooked, base, atol=1e-3)  # the edit matters, so equality means something
    with applied_edit(lm, cands, params):
        assert_same_logits(real_logits(lm.model, batch), hooked)
    assert torch.equal(real_logits(lm.model, batch), base)


def test_paper_edit_is_the_orthogonalization(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2", tie_word_embeddings=True)
    cands, batch = _cands(lm), prompt_batch(lm)
    with applied_edit(lm, cands, EditParams.orthogonalization(layer=2, position=-2)):
        edited = {k: v.clone() for k, v in lm.model.state_dict().items()}
        ours = real_logits(lm.model, batch)
    orthogonalize_weights(lm, cands.directions[1, 2].float())
    assert_same_logits(real_logits(lm.model, batch), ours)
    for k, v in lm.model.state_dict().items():
        torch.testing.assert_close(edited[k], v, rtol=0, atol=1e-5 * float(v.abs().max()))


def test_revert_is_bit_exact_also_on_exception(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for block in lm.arch.blocks:
            block.mlp.down_proj.bias.normal_()
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    head = lm.arch.unembed.weight
    params = EDITS["per-layer-embed"].model_copy(update={"norm_preserving": True})
    with applied_edit(lm, _cands(lm), params):
        assert not torch.equal(lm.arch.embed.weight, state["model.embed_tokens.weight"])
        assert lm.arch.unembed.weight is not lm.arch.embed.weight
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    assert lm.arch.unembed.weight is head is lm.arch.embed.weight
    assert lm.model.config.tie_word_embeddings is True
    with pytest.raises(RuntimeError, match="inside"), applied_edit(lm, _cands(lm), EDITS["candidate"]):
        raise RuntimeError("inside")
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


def test_norm_preserving_keeps_norms_and_removes_the_direction(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("llama", mlp_bias=True)
    cands = _cands(lm)
    params = EditParams(source="candidate", layer=2, position=-1, norm_preserving=True, embed=1.0)
    u = direction_at(cands, params, 2.0).float()  # type: ignore[union-attr]
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    with applied_edit(lm, cands, params):
        for t in plan(lm, cands, params):
            w = t.module.weight
            dim = 1 if t.kind == "embedding" else 0
            old = before[next(n for n, p in lm.model.named_parameters() if p is w)]
            torch.testing.assert_close(w.norm(dim=dim), old.norm(dim=dim), rtol=1e-5, atol=1e-6)
            along = w @ u if t.kind == "embedding" else u @ w
            assert along.abs().max() < 1e-4 * old.abs().max()  # weight 1: nothing written along u
        bias = lm.arch.blocks[0].mlp.down_proj.bias
        assert abs(float(bias @ u)) < 1e-4
    with pytest.raises(RefusalkitError, match="no inference-time equivalent"), hooked_edit(lm, cands, params):
        pass


def test_projected_direction_leaves_the_harmless_mean(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    cands = _cands(lm)
    for source, layer in (("candidate", 2.0), ("interpolated", 1.5)):
        params = EditParams(source=source, layer=layer, position=-1, projected=True)  # type: ignore[arg-type]
        u = direction_at(cands, params, layer)
        assert u is not None and abs(float(u.norm()) - 1) < 1e-9
        lo = int(layer)
        h = (
            cands.harmless_mean[2, lo]
            if layer == lo
            else 0.5 * (cands.harmless_mean[2, 1] + cands.harmless_mean[2, 2])
        )
        assert abs(float(u @ h)) < 1e-9 * float(h.norm())
        plain = direction_at(cands, params.model_copy(update={"projected": False}), layer)
        assert plain is not None and abs(float(plain @ h)) > 1e-3 * float(h.norm())


def test_kernel_shapes() -> None:
    assert Kernel().weights(4) == [1.0] * 4
    assert Kernel(peak=0.0).weights(3) == [0.0] * 3
    w = Kernel(peak=1.0, position=2.0, minimum=0.5, width=2.0).weights(6)
    assert w == pytest.approx([0.5, 0.75, 1.0, 0.75, 0.5, 0.0])


def test_params_round_trip_json() -> None:
    p = EDITS["interpolated-projected"]
    assert EditParams.model_validate_json(p.model_dump_json()) == p
    assert EditParams.model_validate(json.loads(p.model_dump_json())) == p


def test_bad_params_are_clear(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    cands = _cands(lm)
    with pytest.raises(RefusalkitError, match="integer layer"):
        plan(lm, cands, EditParams(source="candidate", layer=1.5))
    with pytest.raises(RefusalkitError, match="beyond the last layer"):
        plan(lm, cands, EditParams(source="interpolated", layer=9))
    with pytest.raises(RefusalkitError, match="outside the candidates"):
        plan(lm, cands, EditParams(position=-7))
    with pytest.raises(RefusalkitError, match="has 4"):
        plan(lm, make_candidates(6, lm.model.config.hidden_size), EditParams())


def test_export_loads_with_plain_transformers(make_lm: Callable[..., Any], tmp_path: Path) -> None:
    """The searched edit written by the one writer of RUN_DIR/model (``export.cli.write_model``): an
    ordinary transformers folder with the edit's parameters beside it, equal to the hooked edit; the
    live model is restored."""
    from transformers import AutoModelForCausalLM

    from refusalkit.export.cli import write_model
    from refusalkit.layout import RunLayout
    from refusalkit.utils import write_json

    lm = make_lm("qwen2", tie_word_embeddings=True)
    cands, params, batch = _cands(lm), EDITS["per-layer-embed"], prompt_batch(lm)
    with hooked_edit(lm, cands, params):
        hooked = real_logits(lm.model, batch)
    layout = RunLayout(tmp_path / "run")
    write_json(layout.manifest, {"settings": {"model": "tiny-qwen2"}, "stages": {}})
    cands.save(layout.candidates)
    write_json(layout.chosen, {"trial": 0, "edit": params.model_dump(mode="json")})
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    out = write_model(layout.root, lm, edit="search")
    assert out == layout.model_dir
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    assert not list(layout.root.glob(".*partial"))
    assert EditParams.model_validate_json((out / "refusalkit_edit.json").read_text()) == params
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_same_logits(real_logits(loaded, batch), hooked)
