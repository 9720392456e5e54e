"""The search's space for a run and the seed trials it starts from.

Directions seeded (docs/search.md, "Seeds"), each as the space's weight shapes (``space.SEED_WEIGHTS``:
weight 1 everywhere, attention-heavy, attention-light):

  mid       the last position's direction two thirds of the way up: what bench/vs_heretic.py's runs seed
            from (an extract-only run has no paper pick), and where every verified point of its
            measured fronts came from (its attention-heavy shapes, and scaled copies of them)
  paper     the paper's pick (the select stage's direction), exactly as the paper orthogonalizes it,
            and its direction inside the space
  bypass    the candidate with the lowest bypass score at a layer neither of the above seeds, inside
            the space's layer range (the select stage's scores): another depth, in case the curve is
            better there on another model

The mid direction's two attention-heavy shapes are the core seeds (they run before the trials aimed at
KL levels, which scale them); the rest follow the aims, so a default-budget search reaches its levels
first and spends what is left on other directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refusalkit.directions import Candidates, Direction
from refusalkit.layout import RunLayout
from refusalkit.search.edit import EditParams
from refusalkit.search.space import SearchSpace, seed_params
from refusalkit.search.study import Seed
from refusalkit.utils import read_json

CORE = ("mid-dir-attn-light", "mid-dir-attn")  # run before the aimed trials
LATER = (  # after the aims, in this order (the paper's exact trial first: the front then holds it)
    "paper",
    "paper-dir-attn-light",
    "bypass-dir-attn-light",
    "mid-dir",
    "paper-dir-attn",
    "bypass-dir-attn",
    "paper-dir",
    "bypass-dir",
)


@dataclass(frozen=True)
class Where:
    """A direction to seed: its name, layer and (negative) position."""

    name: str
    layer: int
    position: int


def paper_pick(layout: RunLayout) -> Direction | None:
    return Direction.load(layout.direction) if layout.direction.with_suffix(".json").is_file() else None


def mid_layer(n_layers: int) -> int:
    """Two thirds of the way up, where the paper's rules usually pick."""
    return round(2 * (n_layers - 1) / 3)


def best_bypass(
    layout: RunLayout, n_layers: int, taken: list[int], layer_range: tuple[float, float]
) -> Where | None:
    """The candidate with the lowest bypass score (its refusal metric with the direction ablated) at a
    layer at least two away from every layer in ``taken``, within ``layer_range`` (fractions of the
    last layer index); None without the select stage's scores."""
    if not layout.candidate_scores.is_file():
        return None
    top = max(n_layers - 1, 1)
    lo, hi = layer_range
    ok = [
        s
        for s in read_json(layout.candidate_scores).get("scores", [])
        if s.get("complete", True)
        and not math.isnan(float(s["bypass"]))
        and lo <= s["layer"] / top <= hi
        and all(abs(s["layer"] - t) >= 2 for t in taken)
    ]
    if not ok:
        return None
    best = min(ok, key=lambda s: float(s["bypass"]))
    return Where("bypass", int(best["layer"]), int(best["position"]))


def directions(layout: RunLayout, n_layers: int) -> list[Where]:
    """The directions seeded (the bypass one looked for in the default space's layer range)."""
    layer_range = SearchSpace().layer_range
    mid = Where("mid", mid_layer(n_layers), -1)
    out = [mid]
    d = paper_pick(layout)
    if d is not None:
        out.append(Where("paper", d.layer, d.position))
    bypass = best_bypass(layout, n_layers, [w.layer for w in out], layer_range)
    return [*out, bypass] if bypass is not None else out


def search_space(layout: RunLayout, sources: list[str], positions: list[int] | None, edit_embed: bool,
                 n_layers: int) -> SearchSpace:  # fmt: skip
    """The default space, its direction layers and positions widened to hold every seed's (the seeds
    lie inside it). Default positions: the last token (where abliteration tools read the direction)
    and the seeded directions' positions."""
    space = SearchSpace(sources=sources, positions=positions, edit_embed=edit_embed)
    seeded = directions(layout, n_layers)
    if positions is None:
        space.positions = sorted({-1, *(w.position for w in seeded)})
    lo, hi = space.layer_range
    top = max(n_layers - 1, 1)
    space.layer_range = (
        min([lo, *(w.layer / top for w in seeded)]),
        max([hi, *(w.layer / top for w in seeded)]),
    )
    return space


def seeds(layout: RunLayout, cands: Candidates, space: SearchSpace) -> list[Seed]:
    """The seed trials, in the order they run (``CORE`` first; see the module docstring)."""
    by_name: dict[str, Seed] = {}
    seen: list[dict[str, Any]] = []
    for w in directions(layout, cands.n_layers):
        if w.name == "paper":
            by_name["paper"] = Seed(
                "paper", edit=EditParams.orthogonalization(w.layer, w.position), core=False
            )
        for suffix, params in seed_params(w.layer, w.position, cands.n_layers, space).items():
            if params in seen:  # the paper's pick at the mid direction: one seed, named after mid
                continue
            seen.append(params)
            name = f"{w.name}-dir{suffix}"
            by_name[name] = Seed(name, params=params, core=name in CORE)
    return [by_name[n] for n in (*CORE, *LATER) if n in by_name]


__all__ = ["CORE", "LATER", "best_bypass", "directions", "mid_layer", "paper_pick", "search_space", "seeds"]
