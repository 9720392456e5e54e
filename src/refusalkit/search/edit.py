"""Parameterized refusal edits: rank-1 weight updates per layer and component, reverted bit for bit.

For every matrix that writes into the residual stream (attention output and MLP output of block l,
optionally the token embedding), with u the unit direction chosen for that write and w its weight:
  nn.Linear weight [d_model, d_in]   W <- W - w u (u^T W),   bias b <- b - w (b.u) u
  embedding [n_tokens, d_model]      E <- E - w (E u) u^T
Weight 1 everywhere with one direction is the paper's orthogonalization; weight 0 leaves a write alone.
Each such edit equals a hook that maps the module's output y to y - w (y.u) u (``hooked_edit``), so
the analysis tools run on searched edits too. The norm-preserving variant rescales every residual-space
vector of an edited matrix (a Linear weight's column, an embedding row, a bias) back to its norm before
the edit; it has no exact hook equivalent.

Directions (``EditParams.source``), all read from the run's candidates at one post-instruction position:
  candidate      r = r_position^(layer) for an integer layer, one direction for every write
  interpolated   a fractional layer: the unit directions of the two neighbouring layers, mixed linearly
  per_layer      each write uses the direction of the residual it lands in: block l's writes land in
                 resid_pre[l+1] (the last block's in resid_pre[L-1]), the embedding in resid_pre[0]
With ``projected`` the component along the harmless mean (at the same layer) is removed from r first, so
the edit leaves the harmless mean activation untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from refusalkit.directions import Candidates
from refusalkit.edits import Part, Target, edited, target
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import project_outputs, unit
from refusalkit.models.loading import LoadedModel

COMPONENTS: tuple[Part, ...] = ("attn", "mlp")
MIN_NORM = 1e-12  # directions shorter than this carry no information (e.g. layer 0 at template tokens)


class Kernel(BaseModel):
    """Edit weight over layers for one component: ``peak`` at layer ``position``, falling linearly to
    ``minimum`` at distance ``width`` and 0 beyond; ``width`` None means every layer (no falloff)."""

    model_config = ConfigDict(extra="forbid")

    peak: float = Field(default=1.0, description="Weight at the peak layer.")
    position: float = Field(default=0.0, description="Layer of the peak (fractional).")
    minimum: float = Field(default=1.0, description="Weight at distance `width` from the peak.")
    width: float | None = Field(
        default=None, gt=0, description="Layers from the peak to the edge; None: all."
    )

    def weights(self, n_layers: int) -> list[float]:
        if self.width is None:
            return [self.peak] * n_layers
        out = []
        for layer in range(n_layers):
            d = abs(layer - self.position)
            out.append(0.0 if d > self.width else self.peak + (self.minimum - self.peak) * d / self.width)
        return out


class EditParams(BaseModel):
    """One edit of the search space (JSON round-trips with ``model_dump_json`` / ``model_validate_json``)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["candidate", "interpolated", "per_layer"] = "candidate"
    position: int = Field(
        default=-1, lt=0, description="Post-instruction position, counted from the end (-1 last)."
    )
    layer: float = Field(
        default=0.0, ge=0, description="Direction layer: integer for candidate, fractional for interpolated."
    )
    projected: bool = Field(
        default=False, description="Remove the direction's component along the harmless mean."
    )
    norm_preserving: bool = Field(default=False, description="Keep each edited residual-space vector's norm.")
    attn: Kernel = Field(
        default_factory=lambda: Kernel(), description="Attention-output weights over layers."
    )
    mlp: Kernel = Field(default_factory=lambda: Kernel(), description="MLP-output weights over layers.")
    embed: float = Field(default=0.0, description="Weight of the token-embedding edit (0: untouched).")

    @classmethod
    def orthogonalization(cls, layer: int, position: int) -> EditParams:
        """The paper's weight orthogonalization with the candidate at (position, layer)."""
        return cls(source="candidate", layer=layer, position=position, embed=1.0)

    def kernels(self, n_layers: int) -> dict[str, list[float]]:
        return {"attn": self.attn.weights(n_layers), "mlp": self.mlp.weights(n_layers)}

    def scaled(self, factor: float) -> EditParams:
        """The same edit with every weight (kernel peaks and minima, the embedding's) times ``factor``."""
        k = lambda kern: kern.model_copy(  # noqa: E731
            update={"peak": kern.peak * factor, "minimum": kern.minimum * factor}
        )
        return self.model_copy(
            update={"attn": k(self.attn), "mlp": k(self.mlp), "embed": self.embed * factor}
        )


def _unit(v: torch.Tensor) -> torch.Tensor | None:
    """``v``'s unit vector, or None when it is too short to carry a direction."""
    try:
        return unit(v, MIN_NORM)
    except ValueError:
        return None


def _raw(cands: Candidates, params: EditParams, layer: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(direction, harmless mean) at a (possibly fractional) layer, float64; None if degenerate."""
    p = params.position + cands.n_positions
    if not 0 <= p < cands.n_positions:
        raise RefusalkitError(
            f"edit position {params.position} is outside the candidates' -{cands.n_positions}..-1"
        )
    lo = min(math.floor(layer), cands.n_layers - 1)
    hi, frac = min(lo + 1, cands.n_layers - 1), layer - lo
    dirs, harmless = cands.directions.double(), cands.harmless_mean.double()
    if frac == 0.0 or hi == lo:
        return dirs[p, lo], harmless[p, lo]
    a, b = _unit(dirs[p, lo]), _unit(dirs[p, hi])
    if a is None or b is None:
        return None
    return (1 - frac) * a + frac * b, (1 - frac) * harmless[p, lo] + frac * harmless[p, hi]


def direction_at(cands: Candidates, params: EditParams, layer: float) -> torch.Tensor | None:
    """The unit edit direction read at ``layer`` (float64 [d_model]); None where it vanishes."""
    raw = _raw(cands, params, layer)
    if raw is None:
        return None
    r, harmless = raw
    if params.projected:
        h = _unit(harmless)
        if h is not None:
            r = r - (r @ h) * h
    return _unit(r)


def _check_source(cands: Candidates, params: EditParams) -> None:
    top = cands.n_layers - 1
    if params.layer > top:
        raise RefusalkitError(f"edit layer {params.layer} is beyond the last layer {top}")
    if params.source == "candidate" and params.layer != int(params.layer):
        raise RefusalkitError(
            f"a candidate edit needs an integer layer, got {params.layer}; use interpolated"
        )


def plan(lm: LoadedModel, cands: Candidates, params: EditParams) -> list[Target]:
    """Every write the edit changes (weight != 0 and a non-vanishing direction), in model order."""
    arch = lm.arch
    if cands.n_layers != arch.n_layers:
        raise RefusalkitError(
            f"the candidates have {cands.n_layers} layers but the model has {arch.n_layers}; "
            "use the run folder made with this model"
        )
    _check_source(cands, params)
    n = arch.n_layers
    shared = None if params.source == "per_layer" else direction_at(cands, params, params.layer)
    if params.source != "per_layer" and shared is None:
        raise RefusalkitError(
            f"the direction at layer {params.layer}, position {params.position} is zero; pick another"
        )

    def at(layer: int) -> torch.Tensor | None:
        return shared if shared is not None else direction_at(cands, params, layer)

    keep = params.norm_preserving
    targets: list[Target] = []
    if params.embed != 0.0 and (u := at(0)) is not None:
        targets.append(target(arch, "embed", u, params.embed, keep_norm=keep))
    kernels = params.kernels(n)
    for layer in range(n):
        u = at(min(layer + 1, n - 1))
        if u is None:
            continue
        for comp in COMPONENTS:
            w = kernels[comp][layer]
            if w != 0.0:
                targets.append(target(arch, comp, u, w, layer=layer, keep_norm=keep))
    return targets


@contextmanager
def applied_edit(lm: LoadedModel, candidates: Candidates, params: EditParams) -> Iterator[LoadedModel]:
    """Edit ``lm``'s weights for the duration of the block; on exit (also on an exception) restore every
    edited tensor bit for bit and re-tie an output head the edit had to untie (``edits.edited``).

    Costs one copy of the edited matrices in host memory; untouched matrices are not copied.
    """
    with edited(lm, plan(lm, candidates, params)) as model:
        yield model


@contextmanager
def hooked_edit(lm: LoadedModel, candidates: Candidates, params: EditParams) -> Iterator[None]:
    """The inference-time version of ``applied_edit``: each edited module's output y becomes
    y - w (y.u) u (``interventions.project_outputs``). Equal to the weight edit (tested), without
    touching the weights."""
    if params.norm_preserving:
        raise RefusalkitError(
            "the norm-preserving edit has no inference-time equivalent; use applied_edit (weights)"
        )
    with project_outputs([(t.module, t.unit, t.scale) for t in plan(lm, candidates, params)]):
        yield
