"""The search space: how a trial's suggested numbers become an ``EditParams``, and the seed trials.

Ranges are fractions of the layer count, so one space fits every depth. The kernel ranges follow the
ones abliteration tools found useful (peak weight 0.8-1.5 in the later 40% of the layers, falloff over
up to 60% of them); the direction's layer spans 30-90% of the depth.
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
        default=(0.3, 0.9), description="Direction layer, as fractions of the last layer index."
    )
    projected: list[bool] = Field(
        default=[False, True], description="Try the direction projected off the harmless mean."
    )
    norm_preserving: list[bool] = Field(default=[False, True], description="Try the norm-preserving edit.")
    peak_range: tuple[float, float] = Field(default=(0.8, 1.5), description="Kernel peak weight.")
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
        peak = trial.suggest_float(f"{comp}_peak", *space.peak_range)
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


def seed_params(layer: int, position: int, n_layers: int, space: SearchSpace) -> list[dict[str, Any]]:
    """Trial parameters (in the space's own names) worth trying first around a known direction: the
    paper's direction erased everywhere at weight 1 without the embedding, then the same projected."""
    top = n_layers - 1
    base: dict[str, Any] = {
        "source": "interpolated" if "interpolated" in space.sources else space.sources[0],
        "layer": float(layer),
        "position": position,
        "norm_preserving": False,
    }
    full = {f"{c}_{k}": v for c in ("attn", "mlp") for k, v in (("peak", 1.0), ("min_frac", 1.0))}
    full |= {f"{c}_position": float(top) / 2 for c in ("attn", "mlp")}
    full |= {f"{c}_width": space.width_range[1] * n_layers for c in ("attn", "mlp")}
    if space.edit_embed:
        full["embed"] = 0.0
    out = []
    for projected in dict.fromkeys(space.projected):
        out.append({**base, **full, "projected": projected})
    return out
