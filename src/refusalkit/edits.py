"""Reversible weight edits: the one code that changes a model's weights along a direction.

A ``Target`` is one module that writes into the residual stream, a unit direction u and a scale s;
every residual-space vector of the module's weight loses s times its component along u:
  embedding [n_tokens, d_model] (rows are residual vectors)       E <- E - s (E u) u^T
  nn.Linear weight [d_model, d_in] (columns are residual vectors)  W <- W - s u (u^T W),  b <- b - s (b.u) u
With ``keep_norm`` every edited vector is rescaled to its norm before the edit. The module's output
then equals the unedited output y with s (y.u) u removed (the hook ``interventions.project_outputs``),
except under ``keep_norm``, which has no hook equivalent.

``apply`` edits in place; ``edited`` edits for the duration of a block and restores every edited tensor
bit for bit on exit, also on an exception. A tied output head is untied before an embedding edit and
keeps the original embedding, as in the paper. The paper's orthogonalization (orthogonalize.py) and the
searched edits (search/edit.py) are lists of targets handed to these two.

Precision: ``project`` computes in float32 (float64 only for float64 weights), the float64 unit vector
cast once, and rounds the result once into the weight's own dtype, so a bfloat16 weight gets the float32
edit rounded once; the hooks compute the same way (``interventions.work_dtype``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from refusalkit.errors import RefusalkitError
from refusalkit.interventions import unit, work_dtype
from refusalkit.memory import release
from refusalkit.models.adapters import Arch
from refusalkit.models.loading import LoadedModel

Part = Literal["embed", "pos_embed", "attn", "mlp"]

# Elements per block of an edit (16 MiB in float32). A bfloat16 weight is edited through a float32 copy
# of one block at a time, never of the whole matrix (the default model's embedding is 151936 x 1536); a
# float32 weight is edited in its own storage, with no copy at all.
BLOCK = 1 << 22


def check_orthogonalizable(arch: Arch) -> None:
    """Raise unless projecting the residual writes of ``arch`` equals projecting its residual."""
    if not arch.spec.weights_orthogonalizable:
        raise RefusalkitError(
            f"architecture {arch.model_type!r} normalizes each sublayer's output before adding it to the "
            "residual, so projecting the weights is not equivalent to ablation. Use the ablation hooks "
            "(refusalkit evaluate) instead, or override with --arch-override weights_orthogonalizable=true "
            "to accept an approximate edit"
        )


def weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (torch types a module attribute as ``Tensor | Module``)."""
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is a {type(w).__name__}, not a tensor")
    return w


@dataclass(frozen=True)
class Target:
    """One edited write: ``module``'s residual-space vectors lose ``scale`` times their component along
    ``unit`` (a float64 unit vector, [d_model])."""

    module: nn.Module
    kind: Literal["embedding", "linear"]
    unit: torch.Tensor
    scale: float = 1.0
    keep_norm: bool = False
    name: str = ""

    def parameters(self) -> list[torch.Tensor]:
        """The edited tensors: the weight, and a linear module's bias if it has one."""
        bias = getattr(self.module, "bias", None)
        extra = [bias] if self.kind == "linear" and isinstance(bias, torch.Tensor) else []
        return [weight(self.module), *extra]

    def rows(self) -> list[torch.Tensor]:
        """The edited tensors as rows of residual-space vectors (views: edits reach the parameters)."""
        return [p.T if self.kind == "linear" and p.ndim == 2 else p for p in self.parameters()]


def target(
    arch: Arch,
    part: Part,
    direction: torch.Tensor,
    scale: float = 1.0,
    *,
    layer: int | None = None,
    keep_norm: bool = False,
) -> Target:
    """The target editing ``part`` of ``arch`` (the adapters table's modules): the token or position
    embedding, or the attention / MLP output projection of ``layer``, along ``direction`` (normalized)."""
    u = unit(direction)
    if part in ("embed", "pos_embed"):
        module = arch.embed if part == "embed" else arch.pos_embed
        if module is None:
            raise ValueError(f"{arch.model_type} has no learned position embedding")
        return Target(module, "embedding", u, scale, keep_norm, part)
    if layer is None or not 0 <= layer < arch.n_layers:
        raise ValueError(f"{part} needs a layer in 0..{arch.n_layers - 1}, got {layer}")
    module = (arch.attn_write if part == "attn" else arch.mlp_write)[layer]
    return Target(module, "linear", u, scale, keep_norm, f"{part}.{layer}")


@torch.no_grad()
def project(w: torch.Tensor, u: torch.Tensor, scale: float = 1.0, *, keep_norm: bool = False) -> None:
    """In place, every row r of ``w`` (a 1-D ``w`` is one row) becomes r - scale (r.u) u.

    ``u``: a float64 unit vector. Products in ``work_dtype(w.dtype)`` (float32 unless ``w`` is float64),
    ``u`` cast to it once, one rounding into ``w``'s dtype; in blocks of ``BLOCK`` elements. With
    ``keep_norm`` each row is rescaled to its norm before the edit (rows that vanish are left at zero).
    """
    rows = w if w.ndim == 2 else w[None]
    if rows.shape[1] != u.shape[0]:
        raise ValueError(f"rows of length {rows.shape[1]} cannot be projected along a [{u.shape[0]}] vector")
    work = work_dtype(w.dtype)
    uw = u.to(device=w.device, dtype=work)
    step = max(1, BLOCK // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        view = rows[i : i + step]
        in_place = view.dtype == work
        blk = view if in_place else _work_copy(view, work)
        coef = blk @ uw
        old = blk.norm(dim=1) if keep_norm else None
        blk.addr_(coef, uw, alpha=-scale)
        if old is not None:
            new = blk.norm(dim=1)
            blk.mul_(torch.where(new > 0, old / new.clamp_min(1e-30), torch.ones_like(new))[:, None])
        if not in_place:
            view.copy_(blk)


def _work_copy(view: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """A ``work``-dtype copy of a block of rows, laid out like the block: the rows of a Linear weight's
    transpose (its columns) stay column-major, so the products run the same BLAS kernels on a copy as
    on a float32 weight edited in place (and copying never transposes)."""
    if view.ndim == 2 and view.stride(0) == 1 and view.stride(1) != 1:
        return view.T.to(work, memory_format=torch.contiguous_format).T
    return view.to(work, memory_format=torch.contiguous_format)


def _configs(lm: LoadedModel) -> list[Any]:
    cfg = lm.model.config
    return [c for c in (cfg, getattr(cfg, "text_config", None)) if c is not None]


def untie_head(lm: LoadedModel) -> bool:
    """Give the output head its own copy of the weight if it shares the embedding's. True if it did."""
    arch = lm.arch
    head_w = getattr(arch.unembed, "weight", None)
    if head_w is not getattr(arch.embed, "weight", None) or not isinstance(head_w, torch.Tensor):
        return False
    arch.unembed.weight = nn.Parameter(head_w.detach().clone(), requires_grad=False)
    for cfg in _configs(lm):
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


@torch.no_grad()
def apply(lm: LoadedModel, targets: list[Target]) -> None:
    """Edit ``lm``'s weights in place (on each parameter's own device); untie a tied head first when the
    embedding is edited, so the head keeps the original embedding."""
    check_orthogonalizable(lm.arch)
    if any(t.kind == "embedding" for t in targets):
        untie_head(lm)
    for t in targets:
        for rows in t.rows():
            project(rows, t.unit, t.scale, keep_norm=t.keep_norm)


@contextmanager
def edited(lm: LoadedModel, targets: list[Target]) -> Iterator[LoadedModel]:
    """``apply`` the targets for the duration of the block; on exit (also on an exception) restore every
    edited tensor from a saved copy, bit for bit, and re-tie an output head the edit untied.

    Costs one host-memory copy of the edited tensors; untouched ones are not copied.
    """
    check_orthogonalizable(lm.arch)
    tensors = list({id(p): p for t in targets for p in t.parameters()}.values())
    release()  # the copies below land on a heap without the earlier steps' free pages resident (memory.py)
    saved = [p.detach().to("cpu", copy=True) for p in tensors]
    head = lm.arch.unembed
    head_w = getattr(head, "weight", None)
    ties = {id(c): c.tie_word_embeddings for c in _configs(lm) if hasattr(c, "tie_word_embeddings")}
    try:
        apply(lm, targets)
        yield lm
    finally:
        with torch.no_grad():
            for p, orig in zip(tensors, saved, strict=True):
                p.copy_(orig.to(p.device))
        del saved
        release()
        if head_w is not None and head.weight is not head_w:
            head.weight = head_w
        for c in _configs(lm):
            if id(c) in ties:
                c.tie_word_embeddings = ties[id(c)]
