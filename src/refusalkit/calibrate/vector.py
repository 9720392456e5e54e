"""The false-refusal vectors (Wang et al., ICLR 2025) and their orthogonalization against the refusal
direction.

v^(l)_i = mean of resid_pre over the pseudo-harmful training prompts the model refuses (the paper's
filter: the refusal metric of the unedited model > 0) - mean over the harmless training prompts (the
run's own, extract/candidates.safetensors), at every layer l and post-instruction position i.
Orthogonalized by lambda in [0, 1] against the run's selected refusal direction r (unit):
v' = v - lambda (v . r) r. lambda = 1 leaves no component along r (the edit keeps the refusal of
harmful requests); lambda = 0 is the raw vector; the paper sweeps it for finer control.

The edit is the orthogonalized vector's ablation: hooks (``interventions.ablate_direction``) or, the
same function, orthogonalized weights through the one edit core (``orthogonalize.targets`` ->
``edits.edited`` / ``edits.apply``); ``edit`` names both.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.activations import mean_activations
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import ablate_direction, unit
from refusalkit.metric import refusal_metric
from refusalkit.models.loading import LoadedModel

MIN_REFUSED = 2  # fewer refused pseudo-harmful prompts than this make no mean (stages/common.MIN_PROMPTS)


def orthogonalize(v: torch.Tensor, r: torch.Tensor, lam: float) -> torch.Tensor:
    """``v - lam (v . r^) r^`` for every vector of ``v`` ([..., d_model]), r^ = r / |r|; float64."""
    if not 0.0 <= lam <= 1.0:
        raise RefusalkitError(f"lambda {lam} is outside [0, 1]; give --lam between 0 and 1")
    u = unit(r).to(torch.float64)
    v64 = v.to(torch.float64)
    return v64 - lam * (v64 @ u)[..., None] * u


def place_vector(
    refused: torch.Tensor, harmless: torch.Tensor, r: torch.Tensor, layer: int, position: int, lam: float
) -> torch.Tensor:
    """The false-refusal vector at one (``layer``, ``position``) (negative), orthogonalized by ``lam``:
    the refused pseudo-harmful mean minus the harmless mean there (both [n_positions, n_layers,
    d_model]), v - lam (v.r^) r^; float32 [d_model]."""
    p = position + refused.shape[0]
    if not 0 <= p < refused.shape[0] or not 0 <= layer < refused.shape[1]:
        raise RefusalkitError(
            f"no false-refusal vector at layer {layer}, position {position}: the means span layers "
            f"0..{refused.shape[1] - 1}, positions -{refused.shape[0]}..-1"
        )
    return orthogonalize(refused[p, layer] - harmless[p, layer], r, lam).to(torch.float32)


@dataclass
class RefusedMean:
    """The mean activation of the pseudo-harmful prompts the model refuses, and how many it refuses."""

    mean: torch.Tensor  # [n_positions, n_layers, d_model] float64
    kept: int
    total: int


def refused_mean(
    lm: LoadedModel, prompts: list[str], n_positions: int, refusal_ids: list[int], *, batch_size: int
) -> RefusedMean:
    """Streamed means over the prompts whose unedited refusal metric is > 0 (the paper's filter).

    Raises: no prompt refused ("nothing to calibrate", with the rate), or fewer than ``MIN_REFUSED``."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return refusal_metric(logits, refusal_ids)

    try:
        acts = mean_activations(
            lm, prompts, n_positions, batch_size=batch_size, metric=metric, keep_sign=1,
            desc="pseudo-harmful activations",
        )  # fmt: skip
    except RefusalkitError as exc:
        if "no prompt passed the filter" not in str(exc):  # activations' own words for kept == 0
            raise
        check_refused(0, len(prompts))
        raise
    check_refused(acts.kept, acts.total)
    return RefusedMean(acts.mean, acts.kept, acts.total)


def check_refused(kept: int, total: int) -> None:
    if kept == 0:
        raise RefusalkitError(
            f"nothing to calibrate: the model refuses none of the {total} pseudo-harmful training prompts "
            f"(refusal rate 0/{total} by the refusal metric > 0), so it has no false refusals to remove"
        )
    if kept < MIN_REFUSED:
        raise RefusalkitError(
            f"only {kept} of {total} pseudo-harmful training prompts are refused (refusal metric > 0); a "
            f"false-refusal mean needs at least {MIN_REFUSED}: use more prompts (--n-train, now {total})"
        )


def edit(lm: LoadedModel, vector: torch.Tensor, how: str = "weights") -> AbstractContextManager[Any]:
    """The vector's ablation for a ``with`` block: ``"weights"`` (orthogonalized weights, the one edit
    core, restored bit for bit after) or ``"hooks"`` (ablation hooks)."""
    if how == "hooks":
        return ablate_direction(lm.arch, vector)
    from refusalkit.orthogonalize import orthogonalized

    return orthogonalized(lm, vector)


def edit_factory(lm: LoadedModel, vector: torch.Tensor) -> Callable[[], AbstractContextManager[Any]]:
    """``edit`` as a factory: the hooks where weights cannot be orthogonalized (post-norm families)."""
    how = "weights" if lm.arch.spec.weights_orthogonalizable else "hooks"
    return lambda: edit(lm, vector, how)
