"""Architecture adapters: where each canonical piece of a decoder lives, declared as data.

Canonical names (module paths; block-relative ones are relative to one decoder block):
  embed        token embedding (model-relative)
  blocks       the ModuleList of decoder blocks (model-relative)
  attn         the attention module (block-relative; used by head attribution)
  attn_write   the module whose output is what attention adds to the residual (block-relative)
  mlp_write    the module whose output is what the MLP adds to the residual (block-relative)
  final_norm   the norm after the last block (model-relative)
  unembed      the output head (model-relative)
  pos_embed    learned position embedding (model-relative), empty when the family uses rotary
  weights_orthogonalizable  whether projecting the writing matrices equals ablation exactly; false
               where a norm sits between a sublayer's output projection and the residual (Gemma 2/3)

Residual positions, one vocabulary for the whole package:
  resid_pre[l]  input of block l (l = 0..L-1); resid_pre[0] is the scaled embedding
  resid_post[l] output of block l = resid_pre[l+1]; resid_post[L-1] is *before* the final norm
With ``output_hidden_states=True`` transformers returns L+1 tensors: hidden_states[l] == resid_pre[l]
for l < L, and hidden_states[L] is the final-norm output, not resid_post[L-1].
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

from refusalkit.errors import RefusalkitError


@dataclass(frozen=True)
class ArchSpec:
    embed: str = "model.embed_tokens"
    blocks: str = "model.layers"
    attn: str = "self_attn"
    attn_write: str = "self_attn.o_proj"
    mlp_write: str = "mlp.down_proj"
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    attn_out_proj: str = "self_attn.o_proj"  # the per-head output projection (head attribution)
    pos_embed: str = ""  # learned absolute position embedding, if the family has one (model-relative)
    weights_orthogonalizable: bool = True


_LLAMA_LIKE = ArchSpec()
_POST_NORM = ArchSpec(
    attn_write="post_attention_layernorm",
    mlp_write="post_feedforward_layernorm",
    weights_orthogonalizable=False,
)

# Keyed by config.model_type. Families not listed fall back to probing.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo2": ArchSpec(  # OLMo 2 normalizes sublayer outputs before the residual add, like Gemma 2
        attn_write="post_attention_layernorm",
        mlp_write="post_feedforward_layernorm",
        weights_orthogonalizable=False,
    ),
    "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
}


@dataclass
class Arch:
    """An ArchSpec resolved against one model instance: the actual modules."""

    spec: ArchSpec
    model_type: str
    embed: nn.Module
    blocks: list[nn.Module]
    attn: list[nn.Module]
    attn_write: list[nn.Module]
    mlp_write: list[nn.Module]
    final_norm: nn.Module
    unembed: nn.Module
    pos_embed: nn.Module | None
    attn_out_proj: list[nn.Module]
    n_heads: int
    head_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def _get(root: nn.Module, path: str) -> nn.Module:
    mod: Any = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise AttributeError(path)
        mod = getattr(mod, part)
    if not isinstance(mod, nn.Module):
        raise AttributeError(path)
    return mod


def _has(root: nn.Module, path: str) -> bool:
    try:
        _get(root, path)
    except AttributeError:
        return False
    return True


def probe_spec(model: nn.Module) -> ArchSpec:
    """Guess an ArchSpec for an unlisted architecture by looking at module names and shapes."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    blocks = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not blocks:
        raise RefusalkitError(
            "could not find the decoder blocks of this model; pass an architecture override "
            "(--arch-override blocks=PATH,attn_write=PATH,...) naming its modules"
        )
    blocks_path = blocks[0]
    block = _get(model, blocks_path + ".0")
    names = {name for name, _ in block.named_modules() if name}

    def first(candidates: list[str], what: str) -> str:
        for c in candidates:
            if c in names:
                return c
        raise RefusalkitError(
            f"could not find the {what} of a decoder block (looked for {candidates}); "
            f"pass --arch-override {what}=PATH with a path among: {sorted(names)[:30]}"
        )

    attn = first(["self_attn", "attn", "attention", "self_attention"], "attn")
    post_norm = "post_feedforward_layernorm" in names
    attn_proj = first([f"{attn}.{n}" for n in ("o_proj", "out_proj", "dense", "c_proj")], "attn_out_proj")
    mlp_proj = first(
        ["mlp.down_proj", "mlp.fc2", "mlp.c_proj", "mlp.dense_4h_to_h", "feed_forward.w2"], "mlp_write"
    )
    root = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    norm_candidates = [
        f"{root}.{n}" if root else n for n in ("norm", "final_layernorm", "ln_f", "final_norm")
    ]
    final_norm = next((c for c in norm_candidates if _has(model, c)), None)
    if final_norm is None:
        raise RefusalkitError("could not find the final norm; pass --arch-override final_norm=PATH")
    embed = next(name for name, mod in model.named_modules() if mod is model.get_input_embeddings())  # type: ignore[operator]
    unembed = next(name for name, mod in model.named_modules() if mod is model.get_output_embeddings())  # type: ignore[operator]
    pos_candidates = [f"{root}.{n}" if root else n for n in ("wpe", "embed_positions", "position_embeddings")]
    pos_embed = next((c for c in pos_candidates if isinstance(_opt(model, c), nn.Embedding)), "")
    # The weight edit assumes nn.Linear writers ([d_model, d_in]); GPT-2's Conv1D stores the transpose.
    linear = all(isinstance(_get(block, p), nn.Linear) for p in (attn_proj, mlp_proj))
    return ArchSpec(
        embed=embed,
        blocks=blocks_path,
        attn=attn,
        attn_write="post_attention_layernorm" if post_norm else attn_proj,
        mlp_write="post_feedforward_layernorm" if post_norm else mlp_proj,
        final_norm=final_norm,
        unembed=unembed,
        attn_out_proj=attn_proj,
        pos_embed=pos_embed,
        weights_orthogonalizable=linear and not post_norm,
    )


def _opt(root: nn.Module, path: str) -> nn.Module | None:
    return _get(root, path) if _has(root, path) else None


def parse_override(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """Parse 'key=value,key=value' (or a dict) into ArchSpec fields, rejecting unknown keys."""
    if not text:
        return {}
    if isinstance(text, dict):
        items = dict(text)
    else:
        pairs = [kv.split("=", 1) for kv in text.split(",") if kv]
        bad = ["=".join(p) for p in pairs if len(p) != 2]
        if bad:
            example = "attn_write=self_attn.o_proj"
            raise RefusalkitError(f"architecture override {bad} is not key=value, e.g. {example}")
        items = dict(pairs)
    known = {f.name for f in fields(ArchSpec)}
    unknown = sorted(set(items) - known)
    if unknown:
        raise RefusalkitError(f"unknown architecture override key(s) {unknown}; known: {sorted(known)}")
    if "weights_orthogonalizable" in items and isinstance(items["weights_orthogonalizable"], str):
        items["weights_orthogonalizable"] = items["weights_orthogonalizable"].lower() in ("1", "true", "yes")
    return items


def resolve_arch(model: nn.Module, override: str | dict[str, Any] | None = None) -> Arch:
    """Resolve the model's modules from the table (by config.model_type), else by probing."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "unknown"))
    spec = ARCHITECTURES.get(model_type) or probe_spec(model)
    spec = replace(spec, **parse_override(override))
    try:
        blocks_mod = _get(model, spec.blocks)
        blocks = list(blocks_mod)  # type: ignore[call-overload]
        arch = Arch(
            spec=spec,
            model_type=model_type,
            embed=_get(model, spec.embed),
            blocks=blocks,
            attn=[_get(b, spec.attn) for b in blocks],
            attn_write=[_get(b, spec.attn_write) for b in blocks],
            mlp_write=[_get(b, spec.mlp_write) for b in blocks],
            final_norm=_get(model, spec.final_norm),
            unembed=_get(model, spec.unembed),
            pos_embed=_get(model, spec.pos_embed) if spec.pos_embed else None,
            attn_out_proj=[_get(b, spec.attn_out_proj) for b in blocks],
            n_heads=int(getattr(config, "num_attention_heads", 0) or 0),
            head_dim=0,
        )
    except AttributeError as exc:
        raise RefusalkitError(
            f"architecture {model_type!r}: module path {exc.args[0]!r} does not exist in this model; "
            "fix it with --arch-override (e.g. --arch-override attn_write=self_attn.out_proj)"
        ) from None
    if arch.n_heads:
        in_features = getattr(arch.attn_out_proj[0], "in_features", None)
        head_dim = getattr(config, "head_dim", None) or (in_features // arch.n_heads if in_features else 0)
        arch.head_dim = int(head_dim)
    return arch
