"""Weight orthogonalization equals the ablation hooks, restores exactly, and exports a plain checkpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import ORTHOGONALIZABLE
from edit_cases import assert_same_logits, prompt_batch, real_logits
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import ablate_direction
from refusalkit.orthogonalize import export_checkpoint, orthogonalize_weights, orthogonalized

# Tiny models: extra threads only add overhead, and spin badly when other work shares the cores.


def _direction(lm: Any) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(lm.model.config.hidden_size) * 5


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ORTHOGONALIZABLE)
def test_weights_equal_hooks(make_lm: Callable[..., Any], family: str, tied: bool) -> None:
    lm = make_lm(family, tie_word_embeddings=tied)
    embed, head = lm.arch.embed.weight, lm.arch.unembed.weight
    assert (head is embed) == tied
    original_embed = embed.detach().clone()
    batch, direction = prompt_batch(lm), _direction(lm)
    base = real_logits(lm.model, batch)
    with ablate_direction(lm.arch, direction):
        hooked = real_logits(lm.model, batch)
    assert not torch.allclose(
        hooked, base, atol=1e-3
    )  # the direction matters, so equality below means something
    orthogonalize_weights(lm, direction)
    assert_same_logits(real_logits(lm.model, batch), hooked)
    u = direction / direction.norm()
    assert (lm.arch.embed.weight @ u).abs().max() < 1e-5 * original_embed.abs().max()
    # The head keeps the original embedding (the paper leaves the output head unchanged).
    assert lm.arch.unembed.weight is not lm.arch.embed.weight
    torch.testing.assert_close(lm.arch.unembed.weight, original_embed if tied else head, rtol=0, atol=0)
    assert lm.model.config.tie_word_embeddings is False


def test_biases_are_projected(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("llama", attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for block in lm.arch.blocks:
            block.self_attn.o_proj.bias.normal_()
            block.mlp.down_proj.bias.normal_()
    batch, direction = prompt_batch(lm), _direction(lm)
    with ablate_direction(lm.arch, direction):
        hooked = real_logits(lm.model, batch)
    orthogonalize_weights(lm, direction)
    assert_same_logits(real_logits(lm.model, batch), hooked)
    u = direction / direction.norm()
    assert abs(float(lm.arch.blocks[0].mlp.down_proj.bias @ u)) < 1e-5


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_context_restores_bit_for_bit(make_lm: Callable[..., Any], tied: bool) -> None:
    lm = make_lm("qwen2", tie_word_embeddings=tied)
    batch, direction = prompt_batch(lm), _direction(lm)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    head_param = lm.arch.unembed.weight
    base = real_logits(lm.model, batch)
    with ablate_direction(lm.arch, direction):
        hooked = real_logits(lm.model, batch)
    with orthogonalized(lm, direction) as edited:
        assert edited is lm
        assert_same_logits(real_logits(lm.model, batch), hooked)
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    assert lm.arch.unembed.weight is head_param
    assert (lm.arch.unembed.weight is lm.arch.embed.weight) == tied
    assert lm.model.config.tie_word_embeddings is tied
    assert torch.equal(real_logits(lm.model, batch), base)


def test_context_restores_after_exception(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("llama")
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"), orthogonalized(lm, _direction(lm)):
        assert not torch.equal(lm.arch.embed.weight, state["model.embed_tokens.weight"])
        raise RuntimeError("inside")
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_post_norm_families_refuse(make_lm: Callable[..., Any], family: str, tmp_path: Path) -> None:
    lm = make_lm(family)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    direction = _direction(lm)
    with pytest.raises(RefusalkitError, match="normalizes each sublayer"):
        orthogonalize_weights(lm, direction)
    with pytest.raises(RefusalkitError, match="refusalkit evaluate"), orthogonalized(lm, direction):
        pass
    with pytest.raises(RefusalkitError):
        export_checkpoint(lm, direction, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_with_plain_transformers(
    make_lm: Callable[..., Any], tmp_path: Path, tied: bool
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = make_lm("llama", tie_word_embeddings=tied)
    batch, direction = prompt_batch(lm), _direction(lm)
    with ablate_direction(lm.arch, direction):
        hooked = real_logits(lm.model, batch)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    out = export_checkpoint(lm, direction, tmp_path / "model")
    assert out == tmp_path / "model" and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".*partial"))
    # The live model is untouched by the export.
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())

    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.get_output_embeddings().weight is not loaded.get_input_embeddings().weight
    assert_same_logits(real_logits(loaded, batch), hooked)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == lm.tokenizer.chat_template

    # Exporting again over an existing folder replaces it.
    export_checkpoint(lm, direction, out)
    assert (out / "config.json").is_file()


# Largest |logit difference| between the ablation hooks and the orthogonalized weights, as a fraction of
# the largest |logit|, in half precision (real positions, 3 prompts, 3 seeds per family). Measured on
# these tiny models: bf16 <= 0.024, fp16 <= 0.0022 (the same with a float64 edit); each dtype's own rounding against float32 is of the
# same size (bf16 0.010-0.031, fp16 0.0011-0.0031), so the two agree as closely as the dtype allows.
HALF_TOLERANCE = {torch.bfloat16: 0.04, torch.float16: 0.005}


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCE), ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ORTHOGONALIZABLE)
def test_half_precision_weights_equal_hooks(
    make_lm: Callable[..., Any], family: str, dtype: torch.dtype
) -> None:
    tol = HALF_TOLERANCE[dtype]
    lm = make_lm(family)
    lm.model.to(dtype)
    batch, direction = prompt_batch(lm), _direction(lm)
    base = real_logits(lm.model, batch).float()
    with ablate_direction(lm.arch, direction):
        hooked = real_logits(lm.model, batch).float()
    scale = float(hooked.abs().max())
    # The ablation moves the logits far more than the tolerance, so agreement below means something.
    assert float((hooked - base).abs().max()) > 4 * tol * scale
    with orthogonalized(lm, direction):
        edited = real_logits(lm.model, batch).float()
    diff = float((edited - hooked).abs().max()) / scale
    assert diff <= tol, diff
    assert lm.arch.embed.weight.dtype == dtype


# The edit computes in float32 (edits.project); against the float64 formula each entry differs by at
# most 1.4 units of float32 rounding of the matrix's largest entry (2^-24 max|W|) on these tiny models
# (6 families x 3 seeds, biases included), so 4 units is the bound.
FLOAT32_ROUNDING = 4 * 2.0**-24


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3"])
def test_weights_within_float32_rounding_of_the_float64_edit(
    make_lm: Callable[..., Any], family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import refusalkit.edits as edits

    lm = make_lm(family, attention_bias=True) if family == "llama" else make_lm(family)
    with torch.no_grad():
        for block in lm.arch.blocks:
            if block.self_attn.o_proj.bias is not None:
                block.self_attn.o_proj.bias.normal_()
    direction = _direction(lm)
    u = direction.double() / direction.double().norm()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    writers = {id(m.weight) for m in [*lm.arch.attn_write, *lm.arch.mlp_write]}
    kinds = {
        n: ("embed" if p is lm.arch.embed.weight else "out" if id(p) in writers else "other")
        for n, p in lm.model.named_parameters()
    }
    monkeypatch.setattr(edits, "BLOCK", 3 * u.numel() + 1)  # 3 rows per block: boundaries everywhere
    orthogonalize_weights(lm, direction)
    checked = 0
    for name, p in lm.model.named_parameters():
        w = before[name].double()
        if kinds[name] == "embed":
            want = w - (w @ u)[:, None] * u[None, :]
        elif kinds[name] == "out":
            want = w - u[:, None] * (u[None, :] @ w)
        elif name.endswith("o_proj.bias"):
            want = w - (w @ u) * u
        else:
            assert torch.equal(p, before[name]), name  # nothing else is touched
            continue
        assert not torch.equal(p, before[name]), name
        torch.testing.assert_close(
            p.double(), want, rtol=0, atol=FLOAT32_ROUNDING * float(w.abs().max()), msg=name
        )
        checked += 1
    assert checked >= 1 + 2 * lm.arch.n_layers
