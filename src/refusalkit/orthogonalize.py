"""Weight orthogonalization (PAPER.md section 5): bake directional ablation into the weights.

Every matrix that writes into the residual stream is projected off the unit direction u:
  embedding rows (and learned position embeddings)  E <- E - (E u) u^T
  attention / MLP output projections (nn.Linear, weight [d_model, d_in])  W <- W - u (u^T W),  b <- b - (b.u) u
With every write projected, the residual never gains a component along u, which is what the ablation
hooks enforce; the logits match up to floating-point error. A tied output head is untied first and keeps
the original embedding, since the paper leaves the head unchanged.

Precision: the edit is computed in float64 and rounded to the parameter's dtype once; the hooks project
in float32 and round once (``interventions.project_out``). In float32 the two agree to ~1e-4 of the
largest logit (tests/test_orthogonalize.py). In half precision each side carries one rounding of the
dtype, so they agree only as closely as the dtype allows: on the tiny test models the largest logit
difference is <= 1.8% of the largest logit in bfloat16 and <= 0.25% in float16 (tested against 4% and
0.5%), about the size of the half-precision model's own difference from float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusalkit.errors import RefusalkitError
from refusalkit.interventions import unit
from refusalkit.models.adapters import Arch
from refusalkit.models.loading import LoadedModel

log = logging.getLogger(__name__)


def _check(arch: Arch) -> None:
    if not arch.spec.weights_orthogonalizable:
        raise RefusalkitError(
            f"architecture {arch.model_type!r} normalizes each sublayer's output before adding it to the "
            "residual, so projecting the weights is not equivalent to ablation. Use the ablation hooks "
            "(refusalkit evaluate) instead, or override with --arch-override weights_orthogonalizable=true "
            "to accept an approximate edit"
        )


def _writers(arch: Arch) -> list[nn.Module]:
    return [*arch.attn_write, *arch.mlp_write]


def _weight(mod: nn.Module) -> torch.Tensor:
    """``mod.weight`` as a tensor (torch types a module attribute as ``Tensor | Module``)."""
    w = mod.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(mod).__name__}.weight is a {type(w).__name__}, not a tensor")
    return w


def _untie(lm: LoadedModel) -> bool:
    """Give the output head its own copy of the weight if it shares the embedding's. True if it did."""
    arch = lm.arch
    head_w = getattr(arch.unembed, "weight", None)
    if head_w is not getattr(arch.embed, "weight", None) or not isinstance(head_w, torch.Tensor):
        return False
    arch.unembed.weight = nn.Parameter(head_w.detach().clone(), requires_grad=False)
    for cfg in (lm.model.config, getattr(lm.model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


@torch.no_grad()
def orthogonalize_weights(lm: LoadedModel, direction: torch.Tensor) -> None:
    """Edit ``lm``'s weights in place so that no residual write has a component along ``direction``.

    direction: [d_model]. Each edit runs on the parameter's own device (works with device_map="auto").
    """
    arch = lm.arch
    _check(arch)
    u64 = unit(direction.double())
    _untie(lm)
    for emb in [arch.embed, arch.pos_embed]:
        if emb is not None:
            _project_rows(_weight(emb), u64)  # [n, d_model]
    for mod in _writers(arch):
        _project_columns(_weight(mod), u64)  # [d_model, d_in]
        bias = getattr(mod, "bias", None)
        if bias is not None:
            b, u = bias.double(), u64.to(bias.device)
            bias.copy_((b - (b @ u) * u).to(bias.dtype))


# Elements per float64 block of an edit (32 MiB): the embedding in one piece would be several GiB of
# float64 temporaries (a 151936-token vocabulary: ~16 s per edit on a 2-core CPU, mostly allocating
# and zeroing fresh memory); blocks of rows (columns) give the same numbers, each independent.
BLOCK = 1 << 22


def _project_rows(w: torch.Tensor, u64: torch.Tensor) -> None:
    """w [n, d] <- w - (w u) u^T in place, in float64, rounded once to w's dtype."""
    u = u64.to(w.device)
    step = max(1, BLOCK // max(1, w.shape[1]))
    for i in range(0, w.shape[0], step):
        blk = w[i : i + step].double()
        blk -= (blk @ u)[:, None] * u[None, :]
        w[i : i + step] = blk.to(w.dtype)


def _project_columns(w: torch.Tensor, u64: torch.Tensor) -> None:
    """w [d, m] <- w - u (u^T w) in place, in float64, rounded once to w's dtype."""
    u = u64.to(w.device)
    step = max(1, BLOCK // max(1, w.shape[0]))
    for j in range(0, w.shape[1], step):
        blk = w[:, j : j + step].double()
        blk -= u[:, None] * (u[None, :] @ blk)
        w[:, j : j + step] = blk.to(w.dtype)


def _edited_params(lm: LoadedModel) -> list[torch.Tensor]:
    arch = lm.arch
    params = [_weight(arch.embed)] + ([_weight(arch.pos_embed)] if arch.pos_embed is not None else [])
    for mod in _writers(arch):
        params.append(_weight(mod))
        bias = getattr(mod, "bias", None)
        if bias is not None:
            params.append(bias)
    return params


@contextmanager
def orthogonalized(lm: LoadedModel, direction: torch.Tensor) -> Iterator[LoadedModel]:
    """Orthogonalize the weights for the duration of the block, then restore them bit for bit.

    Costs one copy of the edited matrices (embedding and output projections) in host memory.
    """
    _check(lm.arch)
    params = _edited_params(lm)
    saved = [p.detach().to("cpu", copy=True) for p in params]
    head = lm.arch.unembed
    old_head_w = getattr(head, "weight", None)
    tie_flags = {id(c): c.tie_word_embeddings for c in _configs(lm) if hasattr(c, "tie_word_embeddings")}
    try:
        orthogonalize_weights(lm, direction)
        yield lm
    finally:
        with torch.no_grad():
            for p, orig in zip(params, saved, strict=True):
                p.copy_(orig.to(p.device))
        if old_head_w is not None:
            head.weight = old_head_w
        for c in _configs(lm):
            if id(c) in tie_flags:
                c.tie_word_embeddings = tie_flags[id(c)]


def _configs(lm: LoadedModel) -> list[Any]:
    cfg = lm.model.config
    return [c for c in (cfg, getattr(cfg, "text_config", None)) if c is not None]


def save_folder(
    lm: LoadedModel,
    out: str | Path,
    *,
    extra: dict[str, str] | None = None,
    keep: Callable[[Path], bool] | None = None,
) -> Path:
    """Save ``lm`` as it is now (e.g. inside an edit's context) as an ordinary transformers folder.

    Written beside ``out`` and renamed into place, so an interrupted save never leaves a partial folder.
    ``extra`` files (name -> text) are written into it; files of an existing folder for which ``keep``
    is true (a model card, a control vector) are carried over.
    """
    import os
    import shutil

    out = Path(out)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(tmp)
    lm.tokenizer.save_pretrained(tmp)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    if out.exists():
        for p in [p for p in out.iterdir() if keep is not None and keep(p)]:
            os.replace(p, tmp / p.name)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_checkpoint(lm: LoadedModel, direction: torch.Tensor, out: str | Path) -> Path:
    """Save an orthogonalized copy of the model as an ordinary transformers checkpoint folder.

    The folder loads with plain ``AutoModelForCausalLM.from_pretrained`` (no refusalkit needed); the live
    model is restored afterwards.
    """
    with orthogonalized(lm, direction):
        return save_folder(lm, out)
