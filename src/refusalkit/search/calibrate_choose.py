"""The calibration search's points, its feasible front, choosing one, and the chosen edit as the run's
calibration (``--edit calibrate``).

A trial is feasible when its harmful refusal (the proxy on the harmful validation prompts) is at least
``--harmful-floor`` x the unedited model's, measured once when the study was made (kept in it); the
floor of this call decides, so a lower one on a rerun makes more trials feasible without new ones.
Infeasible trials are never chosen: not by default, not by --max-kl / --max-refusals, and
``--trial N`` on one is an error. The front is the feasible trials no other feasible trial dominates
on (over-refusal, KL).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.calibrate.edit import CalibrationEdit
from refusalkit.errors import RefusalkitError
from refusalkit.search.options import OptimizeOptions

DEFAULT_MAX_KL = 0.05  # issue 19's limit on held-out KL, and `refusalkit calibrate`'s --kl-max


@dataclass
class GoalPoint:
    trial: int
    edit: CalibrationEdit
    proxy: dict[str, Any]  # GoalResult.as_dict()
    seed: str | None = None
    verified: dict[str, Any] | None = None

    @property
    def over(self) -> float:
        return float(self.proxy["over"])

    @property
    def harmful(self) -> float:
        return float(self.proxy["harmful"])

    @property
    def kl(self) -> float:
        return float(self.proxy["kl"]["mean"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "seed": self.seed,
            "edit": self.edit.model_dump(mode="json"),
            "proxy": self.proxy,
            "verified": self.verified,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GoalPoint:
        edit = CalibrationEdit.model_validate(d["edit"])
        return cls(d["trial"], edit, d["proxy"], d.get("seed"), d.get("verified"))

    @classmethod
    def from_trial(cls, t: Any) -> GoalPoint:
        edit = CalibrationEdit.model_validate(t.user_attrs["edit"])
        return cls(t.number, edit, t.user_attrs["proxy"], t.user_attrs.get("seed"))


@dataclass(frozen=True)
class Floor:
    """The harmful-refusal floor: ``fraction`` x the unedited model's proxy harmful refusal ``base``."""

    fraction: float
    base: float

    @property
    def value(self) -> float:
        return self.fraction * self.base

    def holds(self, p: GoalPoint) -> bool:
        return not math.isnan(p.harmful) and p.harmful >= self.value

    def words(self) -> str:
        return f"{self.fraction:g} x the unedited model's {self.base:.3f} = {self.value:.3f}"


def front(points: list[GoalPoint], floor: Floor) -> list[GoalPoint]:
    """The feasible points no other feasible point dominates (over-refusal, KL), by increasing KL."""
    ok = [p for p in points if floor.holds(p)]

    def dominated(p: GoalPoint) -> bool:
        return any(
            q.over <= p.over and q.kl <= p.kl and (q.over < p.over or q.kl < p.kl) for q in ok if q is not p
        )

    return sorted((p for p in ok if not dominated(p)), key=lambda p: (p.kl, p.over, p.trial))


def no_feasible(points: list[GoalPoint], floor: Floor, study: Path) -> RefusalkitError:
    best = max(points, key=lambda p: p.harmful, default=None)
    near = (
        f"the highest harmful refusal was {best.harmful:.3f} (trial {best.trial}, over-refusal "
        f"{best.over:.3f}, KL {best.kl:.4f})"
        if best is not None
        else "no trial completed"
    )
    return RefusalkitError(
        f"no trial of the calibration search keeps harmful refusal at the floor ({floor.words()}) among "
        f"{len(points)} completed: {near}. Lower --harmful-floor (choosing again runs no trial), or run "
        f"more trials (--trials / --minutes); the study is kept in {study} and a rerun resumes it"
    )


def choose_goal(
    points: list[GoalPoint], floor: Floor, o: OptimizeOptions, study: Path, before: int | None = None
) -> GoalPoint:
    """--trial N (an error when it is below the floor), else the fewest over-refusals within --max-kl,
    else the lowest KL within --max-refusals (over-refusal, 0..1), else the choice ``before`` if it is
    still feasible, else the fewest over-refusals within KL ``DEFAULT_MAX_KL`` (the lowest KL, with a
    note, when no feasible point is that close)."""
    if o.trial is not None:
        match = [p for p in points if p.trial == o.trial]
        if not match:
            raise RefusalkitError(
                f"trial {o.trial} of the calibration search did not complete; completed: "
                f"{sorted(p.trial for p in points)}"
            )
        p = match[0]
        if not floor.holds(p):
            raise RefusalkitError(
                f"trial {p.trial} is below the harmful-refusal floor: its harmful refusal {p.harmful:.3f} < "
                f"{floor.words()}, so it is never chosen; pick a trial on the front (refusalkit optimize "
                "RUN_DIR --goal calibrate --list) or lower --harmful-floor"
            )
        return p
    ok = front(points, floor)
    if not ok:
        raise no_feasible(points, floor, study)
    if o.max_kl is not None:
        within = [p for p in ok if p.kl <= o.max_kl]
        if not within:
            raise RefusalkitError(
                f"no feasible point has KL <= {o.max_kl}; the lowest is {min(p.kl for p in ok):.4f}. "
                "Raise --max-kl or search longer"
            )
        return min(within, key=lambda p: (p.over, p.kl))
    if o.max_refusals is not None:
        within = [p for p in ok if p.over <= o.max_refusals]
        if not within:
            raise RefusalkitError(
                f"no feasible point has over-refusal <= {o.max_refusals:.2f}; the fewest is "
                f"{min(p.over for p in ok):.3f}. Raise --max-refusals or search longer"
            )
        return min(within, key=lambda p: (p.kl, p.over))
    kept = [p for p in ok if p.trial == before]
    if kept:
        return kept[0]
    within = [p for p in ok if p.kl <= DEFAULT_MAX_KL]
    return min(within, key=lambda p: (p.over, p.kl)) if within else min(ok, key=lambda p: p.kl)


def format_goal(points: list[GoalPoint], floor: Floor, chosen: int | None = None) -> str:
    """The feasible front as a table: proxy numbers, and the verified ones where a point has them."""
    head = (
        f"{'trial':>6} {'seed':<20}{'lam':>5}{'layer':>6}{'pos':>4}{'over':>7}{'harmful':>8}{'KL':>8}"
        f"  verified: over-refusal (paper/broad) per set; harmful; KL"
    )
    lines = [f"harmful-refusal floor: {floor.words()}", head]
    for p in points:
        e = p.edit
        mark = "*" if p.trial == chosen else " "
        lines.append(
            f"{mark}{p.trial:>5} {(p.seed or ''):<20}{e.lam:>5.2f}{e.layer:>6}{e.position:>4}"
            f"{p.over:>7.3f}{p.harmful:>8.3f}{p.kl:>8.4f}  {verified_label(p.verified)}"
        )
    return "\n".join(lines)


def verified_label(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    sets = []
    for name, rates in (v.get("rates") or {}).items():
        sets.append(f"{name} {counts(rates)}")
    kl = v.get("kl") or {}
    return "; ".join([*sets, f"KL {kl.get('mean', float('nan')):.4f}"])


def counts(rates: dict[str, Any]) -> str:
    return "/".join(f"{r['k']}" for r in rates.values()) + f" of {next(iter(rates.values()))['n']}"


def chosen_record(
    p: GoalPoint, floor: Floor, base: dict[str, Any], n_layers: int, baseline: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What the chosen edit's saved vector carries besides itself (its ``Direction.meta``)."""
    return {
        "kind": "false-refusal-search",
        "lam": p.edit.lam,
        "trial": p.trial,
        "seed": p.seed,
        "edit": p.edit.model_dump(mode="json"),
        "weights": p.edit.weights(n_layers),
        "base": base,
        "floor": {"fraction": floor.fraction, "harmful": floor.value},
        "verified": p.verified,
        "baseline_verified": baseline,  # the unedited model on the same held-out prompts
    }


def say_floor_warnings(
    p: GoalPoint, baseline: dict[str, Any] | None, floor: Floor, say: Callable[[str], None]
) -> None:
    """Warn where the verification's judged harmful refusal of the chosen point falls below the floor
    fraction of the unedited model's on the same held-out set (the proxy kept it, the judges may not)."""
    if not p.verified or not baseline:
        return
    for name, rates in (p.verified.get("rates") or {}).items():
        if name not in (p.verified.get("harmful_sets") or []):
            continue
        for judge, r in rates.items():
            b = ((baseline.get("rates") or {}).get(name) or {}).get(judge) or {}
            if r.get("rate") is not None and b.get("rate") and r["rate"] < floor.fraction * b["rate"]:
                say(
                    f"warning: on {name}, by {judge}, the chosen trial {p.trial} refuses {r['rate']:.2f}, below "
                    f"{floor.fraction:g} x the unedited model's {b['rate']:.2f}; a higher --harmful-floor "
                    "keeps more"
                )


__all__ = [
    "DEFAULT_MAX_KL",
    "Floor",
    "GoalPoint",
    "choose_goal",
    "chosen_record",
    "format_goal",
    "front",
    "no_feasible",
    "say_floor_warnings",
]
