"""`refusalkit optimize RUN_DIR --goal calibrate`: search calibration edits (docs/calibrate.md).

The space: the false-refusal vector of ``refusalkit calibrate`` (calibrate/means.safetensors minus the
run's harmless means, ``calibrate.vector.place_vector``) at a layer (10-80% of the depth) and
post-instruction position, orthogonalized against the refusal direction by lambda in [0, 1], ablated
with the removal search's weight shapes (a ``Kernel`` per component over layers, the embedding's
weight): ``calibrate.edit.CalibrationEdit``, applied through the one edit core.

Two objectives, minimized: over-refusal, the expected refusal of the first ``over_n`` OR-Bench-Hard
validation prompts (the pseudo-harmful prompts the vector was not made from), and the mean first-token KL
on the ``kl_n`` harmless prompts (the removal search's). One constraint: harmful refusal, the same proxy
on the run's harmful validation prompts, at least ``harmful_floor`` x the unedited model's (measured
once, when the study is made, and kept in it). Optuna's TPE sampler gets it as ``constraints_func``;
choosing (``search.calibrate_front``) never takes a trial below it.

The refusal proxy is the removal search's (``search.objectives``): with ``new_tokens`` (--proxy-new-tokens,
24) each prompt gets its first greedy tokens, and a prompt whose tokens hold one of the paper's refusal
phrases (the phrases the verification's headline counts) scores 1, any other its P(refusal token) =
sigmoid(refusal metric); with 0, the first token's P alone. The first token alone is not enough here:
on the default model (bfloat16) it calls 8 of 64 OR-Bench-Hard validation prompts refused where the
phrases in 24 generated tokens find 17, and the first-token search's seed edit (`refusalkit
calibrate`'s pick) cut its first-token count to 1 of 64 while replies still declined a few tokens in
(docs/calibrate.md).

Everything lives in RUN_DIR/calibrate/search/ (study.db, front.json, chosen.*), apart from the removal
search's search/; the chosen edit becomes the calibration ``--edit calibrate`` names.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import logits_for_prompts
from refusalkit.calibrate.edit import CalibrationEdit, targets
from refusalkit.calibrate.vector import place_vector
from refusalkit.edits import edited
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.judges import REFUSAL_JUDGES
from refusalkit.evaluation.refusal import matched_markers
from refusalkit.metric import kl_div, refusal_metric
from refusalkit.models.loading import LoadedModel
from refusalkit.search.edit import Kernel
from refusalkit.search.objectives import KLStats, expected_refusal, generated_refusal
from refusalkit.search.study import STUDY_NAME, Budget, claim, require_optuna
from refusalkit.utils import read_json

log = logging.getLogger(__name__)

OBJECTIVES = (
    "over-refusal (OR-Bench-Hard val: mean P of refusal tokens)",
    "first-token KL mean (harmless)",
)
LAYER_RANGE = (0.1, 0.8)  # the vector's layer, fractions of the last index (calibrate's max_layer_frac)
PEAK_RANGE = (0.2, 1.5)  # each component's peak weight (1: the vector's full ablation)
SPACE_VERSION = 1  # bump when the space (its ranges or parameters) changes: old studies are refused
MIN_NORM = 1e-6  # a vector this short (lambda 1 removed all of it) is no direction: the trial is pruned


@dataclass
class GoalResult:
    over: float  # objective: mean P(refusal token) of the pseudo-harmful validation prompts
    over_rate: float  # their share with refusal metric > 0
    harmful: float  # constraint: mean P(refusal token) of the harmful validation prompts
    harmful_rate: float
    kl: KLStats
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GoalScorer:
    """Scores whatever edit is active on ``lm``: the refusal proxy of the pseudo-harmful and harmful
    prompts (``new_tokens`` greedy tokens judged by the paper's phrases, else first-token logits) and
    first-token KL on the harmless ones (against the unedited logits, computed once)."""

    def __init__(
        self, lm: LoadedModel, pseudo: list[str], harmful: list[str], harmless: list[str], ids: list[int],
        batch_size: int, new_tokens: int = 0, gen_batch_size: int = 16,
    ) -> None:  # fmt: skip
        if not pseudo or not harmful or not harmless:
            raise RefusalkitError("the calibration search needs pseudo-harmful, harmful and harmless prompts")
        if new_tokens < 0:
            raise RefusalkitError(f"new_tokens must be 0 (logits only) or more, not {new_tokens}")
        self.lm, self.pseudo, self.harmful, self.harmless = lm, pseudo, harmful, harmless
        self.ids, self.batch_size = ids, batch_size
        self.new_tokens, self.gen_batch_size = new_tokens, gen_batch_size
        self.markers = REFUSAL_JUDGES["paper"]
        t0 = time.perf_counter()
        self.base_harmless = logits_for_prompts(lm, harmless, batch_size)
        self.baseline_seconds = time.perf_counter() - t0

    def _marked(self, _i: int, ids: list[int]) -> bool:
        """A prompt whose tokens so far hold a phrase is judged whatever follows: its row leaves the batch."""
        return bool(matched_markers(self.lm.tokenizer.decode(ids, skip_special_tokens=True), self.markers))

    def _rates(self, prompts: list[str]) -> tuple[float, float]:
        """(expected refusal, share refused) of ``prompts`` under the active edit."""
        if not self.new_tokens:
            m = refusal_metric(logits_for_prompts(self.lm, prompts, self.batch_size), self.ids).double()
            return float(torch.sigmoid(m).mean()), float((m > 0).double().mean())
        metric, judged, _texts = generated_refusal(
            self.lm, prompts, self.ids, new_tokens=self.new_tokens, batch_size=self.gen_batch_size,
            desc="calibration proxy", done=self._marked, judge=lambda t: bool(matched_markers(t, self.markers)),
        )  # fmt: skip
        m, hits = metric.double(), torch.tensor(judged, dtype=torch.bool)
        return float(expected_refusal(m, hits).mean()), float((hits | (m > 0)).double().mean())

    def refusal(self) -> dict[str, float]:
        """Over-refusal and harmful refusal under the active edit (the unedited model's: the base)."""
        over, over_rate = self._rates(self.pseudo)
        harmful, harmful_rate = self._rates(self.harmful)
        return {"over": over, "over_rate": over_rate, "harmful": harmful, "harmful_rate": harmful_rate}

    def __call__(self) -> GoalResult:
        t0 = time.perf_counter()
        r = self.refusal()
        kl = kl_div(self.base_harmless, logits_for_prompts(self.lm, self.harmless, self.batch_size))
        return GoalResult(**r, kl=KLStats.of(kl), seconds=time.perf_counter() - t0)


@dataclass
class Vectors:
    """What a trial's vector is made of: the refused pseudo-harmful means, the harmless means (both
    [n_positions, n_layers, d_model]) and the refusal direction."""

    refused: torch.Tensor
    harmless: torch.Tensor
    direction: torch.Tensor

    def at(self, e: CalibrationEdit) -> torch.Tensor:
        return place_vector(self.refused, self.harmless, self.direction, e.layer, e.position, e.lam)


@dataclass(frozen=True)
class Space:
    n_layers: int
    positions: list[int]
    layers: tuple[int, int]  # the vector's layer, inclusive

    def middle(self) -> tuple[int, int, float]:
        """Where the seeds sit without a calibration: mid layer range, last position, lambda 1."""
        return (self.layers[0] + self.layers[1]) // 2, -1, 1.0


def space_for(n_layers: int, n_positions: int, seed_layer: int | None) -> Space:
    top = max(n_layers - 1, 1)
    lo, hi = round(LAYER_RANGE[0] * top), round(LAYER_RANGE[1] * top)
    if seed_layer is not None:
        lo, hi = min(lo, seed_layer), max(hi, seed_layer)
    return Space(n_layers, list(range(-n_positions, 0)), (lo, hi))


def suggest(trial: Any, space: Space) -> CalibrationEdit:
    """One edit from ``trial`` (every parameter drawn on every trial: one fixed space for TPE)."""
    n, top = space.n_layers, space.n_layers - 1
    kernels = {}
    for comp in ("attn", "mlp"):
        peak = trial.suggest_float(f"{comp}_peak", *PEAK_RANGE)
        kernels[comp] = Kernel(
            peak=peak,
            position=trial.suggest_float(f"{comp}_position", 0.0, float(top)),
            minimum=peak * trial.suggest_float(f"{comp}_min_frac", 0.0, 1.0),
            width=trial.suggest_float(f"{comp}_width", max(1.0, 0.05 * n), float(n)),
        )
    return CalibrationEdit(
        lam=trial.suggest_float("lam", 0.0, 1.0),
        layer=trial.suggest_int("layer", *space.layers),
        position=trial.suggest_categorical("position", space.positions),
        attn=kernels["attn"],
        mlp=kernels["mlp"],
        embed=trial.suggest_float("embed", 0.0, 1.0),
    )


def seed_trials(space: Space, layer: int, position: int, lam: float) -> list[tuple[str, dict[str, Any]]]:
    """Trials to run first, at one place (``refusalkit calibrate``'s pick when it ran): its own edit
    (weight 1 on every write and the embedding: exactly the command's), the vector at lambda 0.5, and
    two lighter shapes (no embedding edit; the MLP writes at half weight)."""
    n, top = space.n_layers, space.n_layers - 1
    full: dict[str, Any] = {"lam": lam, "layer": layer, "position": position, "embed": 1.0}
    for comp in ("attn", "mlp"):  # weight peak on every layer: min = peak, width covers the depth
        full |= {f"{comp}_peak": 1.0, f"{comp}_position": top / 2, f"{comp}_min_frac": 1.0}
        full |= {f"{comp}_width": float(n)}
    other = 0.5 if lam != 0.5 else 1.0
    return [
        ("calibrate", full),
        (f"calibrate-lam{other:g}", full | {"lam": other}),
        ("calibrate-no-embed", full | {"embed": 0.0}),
        ("calibrate-mlp-half", full | {"mlp_peak": 0.5}),
    ]


def completed(study: Any) -> list[Any]:
    optuna = require_optuna()
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def open_goal_study(path: Path, fingerprint: str, seed: int, startup_trials: int) -> Any:
    """Create or resume the calibration study in ``path`` (refused when made for other inputs). The
    sampler is the removal search's (multivariate TPE, its seed moved by the study's size), given the
    harmful-refusal constraint: a trial's harmful refusal >= the floor it ran under (its ``floor``
    attribute), feasible when floor - harmful <= 0."""
    optuna = require_optuna()
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{path}"
    existing = 0
    if path.is_file():
        try:
            existing = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
        except KeyError:
            existing = 0

    def constraint(t: Any) -> list[float]:
        proxy, floor = t.user_attrs.get("proxy"), t.user_attrs.get("floor")
        return [float(floor) - float(proxy["harmful"])] if proxy and floor is not None else [1.0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed + existing, n_startup_trials=startup_trials, multivariate=True,
            constraints_func=constraint,
        )  # fmt: skip
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage, directions=["minimize", "minimize"], sampler=sampler,
        load_if_exists=True,
    )  # fmt: skip
    claim(
        study,
        fingerprint,
        OBJECTIVES,
        f"{path} holds a calibration search made with another model, means, direction, prompt sets or --proxy-new-tokens",
    )
    return study


def run_goal(
    study: Any, lm: LoadedModel, scorer: GoalScorer, vectors: Vectors, space: Space, budget: Budget,
    seeds: list[tuple[str, dict[str, Any]]], floor: float, say: Callable[[str], None],
) -> int:  # fmt: skip
    """Run trials (seeds first, each until a trial bearing its name completes or is pruned) until the
    study holds ``budget.trials`` completed ones or the time is spent; ``floor``: the harmful refusal
    (absolute) a trial must keep, recorded on it for the sampler's constraint. Returns the trials run."""
    optuna = require_optuna()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # left by a killed process
    todo = budget.trials - len(completed(study))
    estimate = 3.0 * scorer.baseline_seconds  # two more forward passes than the harmless one (at least)
    if todo > 0 and budget.seconds is not None and budget.seconds < estimate:
        raise RefusalkitError(
            f"one trial takes about {estimate:.0f} s here, more than the time budget of {budget.seconds:.0f} s; "
            "raise --minutes (the study is unchanged)"
        )
    start, ran, tries = time.perf_counter(), 0, 0
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    while ran < todo and tries < 4 * todo:
        if budget.seconds is not None and time.perf_counter() - start + estimate > budget.seconds:
            log.info("time budget reached after %d trials", ran)
            break
        tries += 1
        tried = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False, states=done_states)}
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        pending = [(n, p) for n, p in seeds if n not in tried]
        if pending and not waiting:
            study.enqueue_trial(pending[0][1], user_attrs={"seed": pending[0][0]})
        trial = study.ask()
        trial.set_user_attr("floor", floor)
        try:
            e = suggest(trial, space)
            trial.set_user_attr("edit", e.model_dump(mode="json"))
            v = vectors.at(e)
            if not bool(torch.isfinite(v).all()) or float(v.norm()) < MIN_NORM:
                trial.set_user_attr("reason", "zero vector (lambda removed all of it)")
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            with edited(lm, targets(lm.arch, v, e.weights(space.n_layers))):
                result = scorer()
            trial.set_user_attr("proxy", result.as_dict())
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        study.tell(trial, [result.over, result.kl.mean])
        estimate = max(result.seconds, 0.5 * estimate + 0.5 * result.seconds)
        ran += 1
        if ran % 5 == 0:
            say(f"trial {ran}/{todo}")
    return ran


def fingerprint_of(parts: dict[str, Any]) -> str:
    from refusalkit.utils import sha256_text

    return sha256_text(json.dumps(parts, sort_keys=True))[:16]


def calibration_place(calibrated: Path) -> tuple[int, int, float] | None:
    """(layer, position, lambda) of `refusalkit calibrate`'s pick (calibrated.json), unless the last
    calibration was this search's own choice or there is none."""
    if not calibrated.is_file():
        return None
    rec = dict(read_json(calibrated))
    if rec.get("source") == "search" or "layer" not in rec:
        return None
    return int(rec["layer"]), int(rec["position"]), float(rec.get("lam", 1.0))


__all__ = [
    "OBJECTIVES",
    "SPACE_VERSION",
    "GoalResult",
    "GoalScorer",
    "Space",
    "Vectors",
    "calibration_place",
    "completed",
    "open_goal_study",
    "run_goal",
    "seed_trials",
    "space_for",
    "suggest",
]
