"""Choosing a point of the search and search/chosen.json: after a search, or from a saved one alone.

``choose_saved`` is the whole of a call whose options only choose (``OptimizeOptions.choosing_only``):
it reads search/front.json (and the study, for a trial off the front), writes the choice, and runs no
trial and no verification; the model is loaded only to export.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.search.edit import EditParams
from refusalkit.search.front import Point, choose, points_of, read_front, write_front
from refusalkit.search.options import OptimizeOptions
from refusalkit.search.study import saved_study
from refusalkit.utils import write_json


def by_trial(study: Any | None, points: list[Point], number: int) -> Point:
    """Any completed trial can be chosen by number, on the front (with its verified numbers) or not."""
    for p in points:
        if p.trial == number:
            return p
    for t in study.get_trials(deepcopy=False) if study is not None else []:
        if t.number == number and t.values is not None:
            return Point.from_trial(t)
    raise RefusalkitError(f"trial {number} did not complete; on the front: {sorted(p.trial for p in points)}")


def choose_point(
    study: Any | None, points: list[Point], o: OptimizeOptions, before: int | None = None
) -> Point:
    """--trial, else --max-kl / --max-refusals, else the point chosen ``before`` (a saved choice kept
    when nothing new is asked), else the fewest refusals (``front.choose``)."""
    if o.trial is not None:
        return by_trial(study, points, o.trial)
    if o.max_kl is None and o.max_refusals is None and before is not None:
        return by_trial(study, points, before)
    return choose(points, max_kl=o.max_kl, max_refusals=o.max_refusals)


def write_chosen(layout: RunLayout, p: Point, n_layers: int) -> None:
    write_json(layout.chosen, p.as_dict() | {"kernels": p.edit.kernels(n_layers), "embed": p.edit.embed})


def choose_saved(
    layout: RunLayout, o: OptimizeOptions, export: Callable[[EditParams], None]
) -> dict[str, Any]:
    """Choose from the run's saved search and write the choice; ``export`` writes the checkpoint when
    --export is given. Returns the front, with ``trials_run`` 0."""
    front = read_front(layout)
    points = points_of(front)
    chosen = choose_point(saved_study(layout.study), points, o, before=front.get("chosen"))
    front |= {
        "chosen": chosen.trial,
        "trials_run": 0,
        "seconds": {"search": 0.0, "verify": 0.0, "total": 0.0},
    }
    write_front(layout, front)
    write_chosen(layout, chosen, int(front["n_layers"]))
    if o.export:
        export(chosen.edit)
    return front


__all__ = ["by_trial", "choose_point", "choose_saved", "write_chosen"]
