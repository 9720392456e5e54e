"""The search loop: an Optuna multi-objective study stored in the run folder, resumable, on a budget.

Each trial draws an edit (``space.suggest``), applies it to the loaded model's weights, scores the two
cheap objectives (expected refusal, mean first-token KL), and restores the weights bit for bit. Trials
live in an Optuna RDB storage (sqlite) in the run folder: an interrupted search continues the same study
on the next call. Seed trials run first: the core seeds, then the trials aimed at KL levels, then the
other seeds, then the sampler's (``next_seed``); a seed counts as run once a completed trial bears its
name, so a seed interrupted or failed runs again on the next call. Every trial records its full
``EditParams`` and proxy scores as user attributes.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.models.loading import LoadedModel
from refusalkit.search.edit import EditParams, applied_edit
from refusalkit.search.objectives import ProxyScorer
from refusalkit.search.space import SearchSpace, suggest

log = logging.getLogger(__name__)

STUDY_NAME = "edit-search"
OBJECTIVES = (
    "expected refusal (harmful val: mean P of refusal tokens; 1 where a judge marks the first tokens)",
    "first-token KL mean (harmless)",
)


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise RefusalkitError(
            "the edit search needs Optuna: pip install 'refusalkit[search]' (or pip install optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class Budget:
    trials: int  # completed trials the study should hold in all (a resumed study counts its old ones)
    seconds: float | None = None  # wall time for this call's trials; None: no limit


@dataclass
class Seed:
    """A trial to run first: fixed ``edit`` (used as is) or ``params`` in the space's own names."""

    name: str
    edit: EditParams | None = None
    params: dict[str, Any] | None = None
    attrs: dict[str, Any] | None = None  # more user attributes to record (an aimed trial's base and factor)
    core: bool = True  # runs before the aimed trials (else after them)


def _completed(study: Any) -> list[Any]:
    optuna = require_optuna()
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def open_study(path: Path, fingerprint: str, seed: int, startup_trials: int) -> Any:
    """Create or resume the study in ``path``. Refuses a study made for another model/candidates/prompts."""
    optuna = require_optuna()
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{path}"
    # The sampler's seed moves with the study's size, so a resumed search does not redraw old trials.
    existing = 0
    if path.is_file():
        try:
            existing = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
        except KeyError:
            existing = 0
    with warnings.catch_warnings():
        # multivariate TPE is experimental in older Optuna and the default (its flag deprecated) in newer.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed + existing, n_startup_trials=startup_trials, multivariate=True
        )
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )
    claim(
        study,
        fingerprint,
        OBJECTIVES,
        f"{path} holds a search made with another model, candidates, prompt sets or proxy",
    )
    return study


def claim(study: Any, fingerprint: str, objectives: Sequence[str], mismatch: str) -> None:
    """Stamp a new study with ``fingerprint`` and its objectives' names, or refuse one made with another
    (``mismatch`` says what differs; its trials are not comparable with this search's)."""
    saved = study.user_attrs.get("fingerprint")
    if saved is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("objectives", list(objectives))
    elif saved != fingerprint:
        raise RefusalkitError(
            f"{mismatch}; move or delete it to start a new one (its trials are not comparable with this one's)"
        )


def saved_study(path: Path) -> Any | None:
    """The study saved in ``path`` as it is (no fingerprint check: nothing will be added to it), or None."""
    if not path.is_file():
        return None
    optuna = require_optuna()
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{path}")
    except KeyError:
        return None


def _recover_stale(study: Any) -> None:
    """Trials left running by a killed process: mark them failed (a seed among them runs again, as no
    completed trial bears its name)."""
    optuna = require_optuna()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _enqueue(study: Any, seed: Seed) -> None:
    attrs: dict[str, Any] = {"seed": seed.name, "seed_params": seed.params or {}} | (seed.attrs or {})
    if seed.edit is not None:
        attrs["edit"] = seed.edit.model_dump(mode="json")
    study.enqueue_trial(seed.params or {}, user_attrs=attrs)


def next_seed(study: Any, seeds: list[Seed], levels: tuple[float, ...] | list[float] = ()) -> Seed | None:
    """What the next trial runs: the first core seed not yet run, else a trial aimed at a KL level no
    trial has reached (``_aim``), else the first other seed not yet run, else None (the sampler).

    The core seeds are those a short search cannot do without (the shapes the aims scale); the others
    spread the search over more directions once the levels are served."""
    ran = {t.user_attrs.get("seed") for t in _completed(study)}
    pending = [s for s in seeds if s.name not in ran]
    core = [s for s in pending if s.core]
    if core:
        return core[0]
    aimed = _aim(study, levels)
    if aimed is not None:
        return aimed
    return pending[0] if pending else None


def _run_trial(
    study: Any, lm: LoadedModel, cands: Candidates, scorer: ProxyScorer, space: SearchSpace
) -> float:
    optuna = require_optuna()
    trial = study.ask()
    try:
        fixed = trial.user_attrs.get("edit")
        if fixed is not None:
            params = EditParams.model_validate(fixed)
        else:
            params = suggest(trial, space, cands.n_layers, cands.n_positions)
            trial.set_user_attr("edit", params.model_dump(mode="json"))
        # the proxy judge (if any) reads once the edit is undone: a local judge sees unedited weights
        result = scorer.score(applied_edit(lm, cands, params))
        trial.set_user_attr("proxy", result.as_dict())
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # a seed among them runs again on resume
        raise
    study.tell(trial, [result.refusal, result.kl.mean])
    log.info(
        "trial %d: expected refusal %.3f (%d/%d), KL %.4f, %.1f s",
        trial.number,
        result.refusal,
        result.refused,
        result.n_harmful,
        result.kl.mean,
        result.seconds,
    )
    return result.seconds


def run_search(
    study: Any,
    lm: LoadedModel,
    cands: Candidates,
    scorer: ProxyScorer,
    space: SearchSpace,
    budget: Budget,
    *,
    seeds: list[Seed] | None = None,
    trial_estimate: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    kl_targets: tuple[float, ...] | list[float] = (),
) -> int:
    """Run trials until the study holds ``budget.trials`` completed ones or the time is spent.

    seeds: trials to run first, in ``next_seed``'s order. kl_targets: KL levels the front should reach
    (``_aim``): once the core seeds have run, each level no trial has reached yet gets a trial aimed at it.

    trial_estimate: seconds one trial is expected to take (default: the scorer's baseline pass); a
    time budget smaller than that raises before any trial runs. Returns the number of trials run.
    """
    _recover_stale(study)
    todo = budget.trials - len(_completed(study))
    if todo <= 0:
        return 0
    estimate = trial_estimate if trial_estimate is not None else 2.0 * scorer.baseline_seconds
    if budget.seconds is not None and budget.seconds < estimate:
        raise RefusalkitError(
            f"one trial takes about {estimate:.0f} s here, more than the time budget of {budget.seconds:.0f} s; "
            "raise --minutes (the study is unchanged)"
        )
    start, ran = time.perf_counter(), 0
    while ran < todo:
        if budget.seconds is not None and time.perf_counter() - start + estimate > budget.seconds:
            log.info("time budget reached after %d trials", ran)
            break
        first = next_seed(study, seeds or [], kl_targets)
        if first is not None:
            _enqueue(study, first)
        took = _run_trial(study, lm, cands, scorer, space)
        estimate = max(took, 0.5 * estimate + 0.5 * took)
        ran += 1
        if progress is not None:
            progress(ran, todo)
    return ran


AIM_TRIES = 3  # aimed trials per KL level
AIM_BAND = 0.85  # a level counts as reached by a trial with KL in [AIM_BAND * level, level]
AIM_AT = 0.93  # where in the band an aimed trial aims


def aim_factor(points: list[tuple[float, float]], target: float) -> float:
    """The weight factor expected to give first-token KL ``target``, from (factor, KL) points of one
    edit shape (the first at factor 1).

    KL(original || edited) is a smooth function of the factor f that is 0, with zero slope, at f = 0
    (the unedited model is its minimum), so its Taylor series starts at f^2: one point, the square law
    is assumed; two or more, ``KL = a f^2 + b f^3`` through the two points nearest the target (in log
    KL) is solved for f. On the default model that cubic, fitted at factors 1 and 0.85, predicted the
    KL at 0.80, 0.45, 0.32 and 0.28 within 1%, where the power law through the same two points (power
    1.7) read 17-20% high at 0.28-0.32. Where the two points do not fit such a curve (a <= 0, or the
    target beyond the cubic's rising branch: noise, or a saturated edit) a power law through them
    (a secant in log-log, power kept within 0.5-4, else the square) is used instead."""
    usable = [(f, kl) for f, kl in points if f > 0 and kl > 0]
    if not usable:
        raise ValueError("no point with a positive factor and KL")
    y = math.log(target)
    near = sorted(usable, key=lambda p: abs(math.log(p[1]) - y))[:2]
    if len(near) == 2 and near[0][0] != near[1][0]:
        cubic = _cubic_root(near, target)
        if cubic is not None:
            return cubic
    power = 2.0
    (f0, k0), rest = near[0], near[1:]
    if rest and rest[0][0] != f0:
        slope = (math.log(rest[0][1]) - math.log(k0)) / (math.log(rest[0][0]) - math.log(f0))
        if 0.5 <= slope <= 4.0:  # otherwise noise or a saturated edit: keep the square law
            power = slope
    return f0 * math.exp((y - math.log(k0)) / power)


def _cubic_root(two: list[tuple[float, float]], target: float) -> float | None:
    """f with a f^2 + b f^3 = target, the curve through both points, on its rising branch; None if the
    points do not both lie on a rising curve of that form, or it never reaches the target."""
    (f1, k1), (f2, k2) = two
    det = f1**2 * f2**3 - f1**3 * f2**2
    if det == 0:
        return None
    a = (k1 * f2**3 - k2 * f1**3) / det
    b = (f1**2 * k2 - f2**2 * k1) / det
    if a <= 0:
        return None
    kl = lambda f: a * f**2 + b * f**3  # noqa: E731
    top = -2 * a / (3 * b) if b < 0 else None  # where the curve stops rising
    if top is not None and (top < max(f1, f2) or kl(top) < target):
        return None  # a curve that falls between the points, or never reaches the target
    lo, hi = 0.0, top if top is not None else 1.0
    while top is None and kl(hi) < target:
        hi *= 2
    for _ in range(100):  # bisection: kl rises on [0, hi]
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _aim(study: Any, levels: tuple[float, ...] | list[float]) -> Seed | None:
    """A trial aimed at the first KL level no completed trial has reached, or None.

    A level is reached by a trial with KL in [``AIM_BAND`` x level, level]. The front point nearest
    above the level (else the front's highest KL) is the base; its weights are scaled (same direction,
    kernel shapes and options) by ``aim_factor`` towards ``AIM_AT`` x level. Where that point is itself an
    aimed trial, the base is the edit it scaled, so every aim of one shape shares one base and its curve
    of KL against the factor is read off all its tries, at any level (a second level's first try lands
    where the first level's tries measured, instead of assuming the square law). Runs once the queue is empty, at most
    ``AIM_TRIES`` times per level (counted in the study, so a resumed search keeps count); the sampler
    goes on where no aimed trial reached its level.
    """
    optuna = require_optuna()
    if not levels or study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        return None
    done = _completed(study)
    tried = [t.user_attrs.get("seed", "") for t in study.get_trials(deepcopy=False)]
    for level in levels:
        name = f"aim-kl-{level:g}"
        if any(AIM_BAND * level <= t.values[1] <= level for t in done) or tried.count(name) >= AIM_TRIES:
            continue
        family = [t for t in done if t.user_attrs.get("seed") == name and "aim" in t.user_attrs]
        by_number = {t.number: t for t in done}
        base = by_number.get(family[0].user_attrs["aim"]["from"]) if family else None
        if base is None:
            usable = [t for t in front_trials(study) if "edit" in t.user_attrs and t.values[1] > 0]
            above = [t for t in usable if t.values[1] > level]
            if not usable:
                continue
            base = min(above, key=lambda t: t.values[1]) if above else max(usable, key=lambda t: t.values[1])
            if "aim" in base.user_attrs:  # a scaled copy: aim from the edit it scaled (same shape)
                base = by_number.get(base.user_attrs["aim"]["from"], base)
        # every try scaled from this base, at any level, tells how KL grows with its weights
        shape = [t for t in done if t.user_attrs.get("aim", {}).get("from") == base.number]
        points = [(1.0, base.values[1])] + [(t.user_attrs["aim"]["factor"], t.values[1]) for t in shape]
        factor = aim_factor(points, AIM_AT * level)
        edit = EditParams.model_validate(base.user_attrs["edit"]).scaled(factor)
        log.info("trial aimed at KL %g: trial %d's edit, weights x %.3f", level, base.number, factor)
        return Seed(name, edit=edit, attrs={"aim": {"from": base.number, "factor": factor}})
    return None


def front_trials(study: Any) -> list[Any]:
    """The proxy Pareto front (completed trials no other trial dominates), by increasing KL."""
    if not _completed(study):
        raise RefusalkitError(
            "the search has no completed trial, so there is no front; run it with a larger budget "
            "(--trials / --minutes)"
        )
    return sorted(study.best_trials, key=lambda t: (t.values[1], t.values[0], t.number))


def trial_records(study: Any) -> list[dict[str, Any]]:
    """Every completed trial's number, objectives and proxy details (for the report's cloud of points)."""
    return [
        {"trial": t.number, "refusal": t.values[0], "kl": t.values[1], "proxy": t.user_attrs.get("proxy", {})}
        for t in _completed(study)
    ]
