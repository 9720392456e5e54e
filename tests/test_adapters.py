"""Architecture table, probe and user overrides, on tiny in-process models of every family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from conftest import FAMILIES, tiny_model
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import ablate_direction
from refusalkit.models import adapters
from refusalkit.models.adapters import ARCHITECTURES, ArchSpec, parse_override, probe_spec, resolve_arch

# Tiny models: extra threads only add overhead, and spin badly when other work shares the cores.


def _tiny_gpt2() -> nn.Module:
    """A family that is not in the table: learned positions and Conv1D writers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_resolves(make_lm: Callable[..., Any], family: str) -> None:
    lm = make_lm(family)
    arch = lm.arch
    model = lm.model
    assert arch.model_type == family
    assert arch.spec == ARCHITECTURES[family]
    assert arch.n_layers == model.config.num_hidden_layers == 4
    assert arch.embed is model.get_input_embeddings()
    assert arch.unembed is model.get_output_embeddings()
    assert arch.blocks == list(model.model.layers)
    assert len(arch.attn_write) == len(arch.mlp_write) == len(arch.attn) == 4
    assert arch.attn_write[2] is adapters._get(arch.blocks[2], arch.spec.attn_write)
    assert arch.n_heads == 4
    assert arch.head_dim * arch.n_heads == arch.attn_out_proj[0].in_features
    assert arch.spec.weights_orthogonalizable == (family not in ("gemma2", "gemma3_text"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_probe_agrees_with_table(family: str) -> None:
    """The probe, used for unlisted families, finds the same modules the table declares."""
    model = tiny_model(family, vocab_size=64)
    assert probe_spec(model) == ARCHITECTURES[family]


def test_unlisted_model_type_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapters, "ARCHITECTURES", {})
    model = tiny_model("llama", vocab_size=64)
    arch = resolve_arch(model)
    assert arch.spec == ArchSpec()
    assert arch.mlp_write[0] is model.model.layers[0].mlp.down_proj
    assert arch.final_norm is model.model.norm


def test_probe_unlisted_family_gpt2() -> None:
    model = _tiny_gpt2()
    assert model.config.model_type not in ARCHITECTURES
    arch = resolve_arch(model)
    assert arch.spec.blocks == "transformer.h"
    assert arch.spec.attn_write == "attn.c_proj"
    assert arch.spec.mlp_write == "mlp.c_proj"
    assert arch.spec.final_norm == "transformer.ln_f"
    assert arch.spec.pos_embed == "transformer.wpe"
    # GPT-2 writes through Conv1D ([d_in, d_out]) and learned positions: not an exact weight edit.
    assert not arch.spec.weights_orthogonalizable
    # The hooks still work on it: no block output keeps a component along the direction.
    u = torch.nn.functional.normalize(torch.randn(32), dim=0)
    outs: list[torch.Tensor] = []
    handles = [
        b.register_forward_hook(lambda _m, _a, o: outs.append(o if torch.is_tensor(o) else o[0]))
        for b in arch.blocks
    ]
    try:
        with ablate_direction(arch, u):
            model(input_ids=torch.randint(0, 64, (2, 7)))
    finally:
        for h in handles:
            h.remove()
    assert len(outs) == 2
    for h in outs:
        assert (h @ u).abs().max() < 1e-4 * h.norm(dim=-1).max()


def test_probe_without_blocks_says_to_override() -> None:
    with pytest.raises(RefusalkitError, match="arch-override"):
        probe_spec(nn.Sequential(nn.Linear(2, 2)))


def test_override_with_bad_path_names_it() -> None:
    model = tiny_model("llama", vocab_size=64)
    with pytest.raises(RefusalkitError, match=r"self_attn\.nope"):
        resolve_arch(model, "attn_write=self_attn.nope")
    with pytest.raises(RefusalkitError, match=r"model\.final"):
        resolve_arch(model, {"final_norm": "model.final"})


def test_override_unknown_key_is_rejected() -> None:
    with pytest.raises(RefusalkitError, match="bogus") as err:
        parse_override("bogus=1,attn_write=self_attn.o_proj")
    assert "attn_write" in str(err.value)  # lists the known keys


def test_override_without_equals_is_a_user_error() -> None:
    with pytest.raises(RefusalkitError, match="key=value"):
        parse_override("attn_write")


def test_override_applies() -> None:
    model = tiny_model("llama", vocab_size=64)
    arch = resolve_arch(model, "attn_write=self_attn.q_proj,weights_orthogonalizable=false")
    assert arch.attn_write[1] is model.model.layers[1].self_attn.q_proj
    assert arch.spec.weights_orthogonalizable is False
    assert parse_override(None) == {} and parse_override("") == {}
