"""The search space: how a trial's suggested numbers become an ``EditParams``, and the seed trials.

Ranges are fractions of the layer count, so one space fits every depth. The kernel shapes follow the
ones abliteration tools found useful (peak in the later 60% of the layers, falloff over up to 60% of
them). Each component has its own weight range: on the default model (docs/search.md, "Exploration")
the MLP writes carried most of the harmless KL and the attention writes little, so the MLP may go
down to 0.2 and the attention up to 1.8. The direction's layer spans 45-85% of the depth (there, KL
fell by a factor of 5 from 56% to 67% of the depth, and the paper's rules drop the top 20%).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from refusalkit.search.edit import EditParams, Kernel


class SearchSpace(BaseModel):
    """Which kinds of edit the search may try."""

    sources: list[str] = Field(
        default=["interpolated", "per_layer"],
        description="Direction sources to try: interpolated, per_layer, candidate.",
    )
    positions: list[int] | None = Field(
        default=None,
        description="Post-instruction positions to try (negative); default: every candidate position.",
    )
    layer_range: tuple[float, float] = Field(
        default=(0.45, 0.85), description="Direction layer, as fractions of the last layer index."
    )
    projected: list[bool] = Field(
        default=[False, True], description="Try the direction projected off the harmless mean."
    )
    norm_preserving: list[bool] = Field(default=[False, True], description="Try the norm-preserving edit.")
    attn_peak_range: tuple[float, float] = Field(
        default=(0.8, 1.8), description="Attention-output kernel's peak weight."
    )
    mlp_peak_range: tuple[float, float] = Field(
        default=(0.2, 1.5), description="MLP-output kernel's peak weight."
    )
    peak_position_range: tuple[float, float] = Field(
        default=(0.4, 1.0), description="Kernel peak layer, as fractions of the last layer index."
    )
    width_range: tuple[float, float] = Field(
        default=(0.05, 0.6), description="Kernel width (layers to the edge), as fractions of the layer count."
    )
    edit_embed: bool = Field(
        default=False, description="Also search the token-embedding edit's weight (0..1)."
    )


def suggest(trial: Any, space: SearchSpace, n_layers: int, n_positions: int) -> EditParams:
    """Draw one edit from ``trial`` (an optuna Trial). Every parameter is suggested on every trial, so
    the sampler sees one fixed space; parameters the chosen source ignores are simply unused."""
    top = n_layers - 1
    positions = space.positions or list(range(-n_positions, 0))
    kernels = {}
    for comp in ("attn", "mlp"):
        peak = trial.suggest_float(f"{comp}_peak", *getattr(space, f"{comp}_peak_range"))
        lo, hi = space.peak_position_range
        kernels[comp] = Kernel(
            peak=peak,
            position=trial.suggest_float(f"{comp}_position", lo * top, hi * top),
            minimum=peak * trial.suggest_float(f"{comp}_min_frac", 0.0, 1.0),
            width=trial.suggest_float(
                f"{comp}_width", max(1.0, space.width_range[0] * n_layers), space.width_range[1] * n_layers
            ),
        )
    source = trial.suggest_categorical("source", space.sources)
    layer = trial.suggest_float("layer", space.layer_range[0] * top, space.layer_range[1] * top)
    return EditParams(
        source=source,
        position=trial.suggest_categorical("position", positions),
        layer=float(round(layer)) if source == "candidate" else layer,
        projected=trial.suggest_categorical("projected", space.projected),
        norm_preserving=trial.suggest_categorical("norm_preserving", space.norm_preserving),
        attn=kernels["attn"],
        mlp=kernels["mlp"],
        embed=trial.suggest_float("embed", 0.0, 1.0) if space.edit_embed else 0.0,
    )


# Seed edits around a known direction, each as (attention, MLP) weight everywhere: the direction erased
# from every write at weight 1 (the paper's orthogonalization without the embedding), an
# attention-heavy one (on the default model the MLP writes carried most of the KL: docs/search.md), and
# the lightest MLP edit the space allows, so that a short search starts with points spread along the
# refusal-KL trade-off rather than waiting for the sampler to find its low-KL end.
SEED_WEIGHTS: dict[str, tuple[float, float]] = {
    "": (1.0, 1.0),
    "-attn": (1.5, 0.5),
    "-attn-light": (1.8, 0.2),
}


def seed_params(layer: int, position: int, n_layers: int, space: SearchSpace) -> dict[str, dict[str, Any]]:
    """Trial parameters (in the space's own names) worth trying first around a known direction, by
    name suffix (``SEED_WEIGHTS``): every write edited, plain direction, no falloff."""
    top = n_layers - 1
    base: dict[str, Any] = {
        "source": "interpolated" if "interpolated" in space.sources else space.sources[0],
        "layer": float(layer),
        "position": position,
        "norm_preserving": False,
        "projected": False if False in space.projected else space.projected[0],
    }
    base |= {f"{c}_min_frac": 1.0 for c in ("attn", "mlp")}
    base |= {f"{c}_position": float(top) / 2 for c in ("attn", "mlp")}
    base |= {f"{c}_width": space.width_range[1] * n_layers for c in ("attn", "mlp")}
    if space.edit_embed:
        base["embed"] = 0.0
    return {
        suffix: base | {"attn_peak": attn, "mlp_peak": mlp} for suffix, (attn, mlp) in SEED_WEIGHTS.items()
    }
