"""The calibration edits as weight edits of the one edit core (``edits.edited``): the false-refusal
vector's ablation, everywhere at weight 1 (``refusalkit calibrate``: the paper's orthogonalization,
``orthogonalize.targets``) or with per-layer weights (``refusalkit optimize --goal calibrate``).

A ``CalibrationEdit`` names one edit of the calibration search: the vector's place (layer, position),
its lambda (how much of its component along the refusal direction is removed, ``vector.orthogonalize``)
and the removal search's weight shapes (``search.edit.Kernel`` per component over layers, and the token
embedding's weight). Saved, it is a ``Direction`` holding the orthogonalized vector whose ``meta``
carries the per-layer ``weights``; ``applied`` and ``modules`` read either kind of calibration, so
``--edit calibrate`` means one thing for chat, serve, export and the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from refusalkit.search.edit import Kernel

if TYPE_CHECKING:
    import torch
    from torch import nn

    from refusalkit.directions import Direction
    from refusalkit.edits import Target
    from refusalkit.models.adapters import Arch
    from refusalkit.models.loading import LoadedModel

Weights = Mapping[str, Any]  # {"attn": [w per layer], "mlp": [w per layer], "embed": w}


class CalibrationEdit(BaseModel):
    """One edit of the calibration search (JSON round-trips)."""

    model_config = ConfigDict(extra="forbid")

    lam: float = Field(default=1.0, ge=0.0, le=1.0, description="Refusal-direction component removed.")
    layer: int = Field(default=0, ge=0, description="The vector's resid_pre layer.")
    position: int = Field(default=-1, lt=0, description="The vector's post-instruction position.")
    attn: Kernel = Field(default_factory=lambda: Kernel(), description="Attention-output weights.")
    mlp: Kernel = Field(default_factory=lambda: Kernel(), description="MLP-output weights.")
    embed: float = Field(default=1.0, ge=0.0, description="Token (and position) embedding weight.")

    def weights(self, n_layers: int) -> dict[str, Any]:
        return {"attn": self.attn.weights(n_layers), "mlp": self.mlp.weights(n_layers), "embed": self.embed}


def targets(arch: Arch, vector: torch.Tensor, weights: Weights | None = None) -> list[Target]:
    """The writes the ablation of ``vector`` edits: every one at weight 1 (``weights`` None: the
    paper's orthogonalization, as ``refusalkit calibrate`` applies it), else each at its weight (0:
    left alone)."""
    from refusalkit.edits import target
    from refusalkit.orthogonalize import targets as everywhere

    if weights is None:
        return everywhere(arch, vector)
    out: list[Target] = []
    e = float(weights.get("embed", 0.0))
    if e:
        out.append(target(arch, "embed", vector, e))
        if arch.pos_embed is not None:
            out.append(target(arch, "pos_embed", vector, e))
    for layer in range(arch.n_layers):
        for part in ("attn", "mlp"):
            w = float(weights[part][layer])
            if w:
                out.append(target(arch, part, vector, w, layer=layer))
    return out


def applied(lm: LoadedModel, direction: Direction) -> AbstractContextManager[LoadedModel]:
    """A saved calibration (``refusalkit calibrate``'s vector, or the calibration search's choice with
    its ``meta["weights"]``) on ``lm``'s weights for a ``with`` block, restored bit for bit after."""
    from refusalkit.edits import edited

    return edited(lm, targets(lm.arch, direction.vector, direction.meta.get("weights")))


def modules(lm: LoadedModel, direction: Direction) -> list[nn.Module] | None:
    """The modules a saved calibration changes (None: every residual write)."""
    weights = direction.meta.get("weights")
    if weights is None:
        return None
    return [t.module for t in targets(lm.arch, direction.vector, weights)]


__all__ = ["CalibrationEdit", "applied", "modules", "targets"]
