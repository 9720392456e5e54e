"""The run: the stages wired together over one run folder, with resume.

Every stage is a function with explicit inputs and outputs in ``refusalkit.stages``; ``Manifest.stage``
fingerprints its inputs, skips it when the manifest records the same fingerprint and its artifacts
exist, and records it otherwise. Paths come from ``RunLayout``. The model is loaded only when a stage
has work to do: a finished run reruns without loading it.

``check_inputs`` validates what every stage to run will read before the first one starts (the model is
there and readable, the data sets exist and hold enough prompts, the measurements' data files), and
reports every problem in one error, in seconds: a fresh clone never fails at the measure stage after
15 minutes of extraction and evaluation. Measurements that are only in the defaults and whose data is
absent are skipped with a warning saying how to add it; measurements asked for by name are required.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

from refusalkit.data import carve
from refusalkit.directions import Candidates, Direction
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.suite_inputs import Suite
from refusalkit.layout import RunLayout
from refusalkit.manifest import Manifest, fingerprint
from refusalkit.memory import release
from refusalkit.models.loading import LoadedModel, load_model, resolved_settings
from refusalkit.models.registry import model_problem
from refusalkit.settings import Settings
from refusalkit.stages import STAGES, evaluate, export, extract, measure, select
from refusalkit.stages.common import model_fingerprint
from refusalkit.stages.data import Splits, load_splits, split_specs
from refusalkit.stages.results import format_table, summarize

log = logging.getLogger(__name__)
__all__ = ["STAGES", "ModelRef", "Run", "check_inputs", "format_table", "requested_measurements"]


def requested_measurements(settings: Settings, explicit: Collection[str] | None = None) -> set[str]:
    """The measurements the user asked for by name: those listed when ``measurements`` was set (by a flag,
    TOML, the environment or a preset), and corpus_ce when ``corpus`` was. ``explicit``: the names of the
    settings given explicitly (default: the ones ``settings`` was built with)."""
    given = settings.model_fields_set if explicit is None else set(explicit)
    wanted = set(settings.measurements) if "measurements" in given else set()
    if "corpus" in given and settings.corpus and "corpus_ce" in settings.measurements:
        wanted.add("corpus_ce")
    return wanted


def _data_problems(settings: Settings) -> list[str]:
    """Each local data set loads and holds the prompts its splits need (hub sets load at extraction)."""
    specs = split_specs(settings)
    problems = []
    for source in dict.fromkeys(spec for spec, _ in specs.values()):
        if source.startswith("hf:"):
            continue
        try:
            carve({k: v for k, v in specs.items() if v[0] == source}, settings.seed)
        except RefusalkitError as exc:
            problems.append(f"data: {exc}")
    return problems


def check_inputs(
    layout: RunLayout,
    settings: Settings,
    *,
    stages: Iterable[str] = STAGES,
    requested: Collection[str] = (),
    model_loaded: bool = False,
) -> measure.Plan | None:
    """Check what ``stages`` will read before any of them runs; raise one error listing every problem.

    Returns the measure stage's plan (what it computes, what it skips; None when ``stages`` has no
    measure stage) and logs a warning per skipped measurement. ``requested``: measurements asked for by
    name (missing data is then an error)."""
    stages = list(stages)
    problems = []
    if not model_loaded and (problem := model_problem(settings.model)):
        problems.append(f"model: {problem}")
    problems += _data_problems(settings)
    the_plan = None
    if "measure" in stages:
        the_plan = measure.plan(settings, measure.suite_files(layout, settings), requested=requested)
        problems += the_plan.problems
    if problems:
        raise RefusalkitError("the run cannot start (nothing was computed):\n  " + "\n  ".join(problems))
    for name, why in the_plan.skipped.items() if the_plan else ():
        log.warning("measure: %s will be skipped (%s)", name, why)
    for note in the_plan.notes if the_plan else ():
        log.warning("measure: %s", note)
    return the_plan


class ModelRef:
    """The run's model: its content fingerprint without loading it, the model itself on first use."""

    def __init__(self, settings: Settings, lm: LoadedModel | None = None) -> None:
        self.settings = settings
        self._lm = lm
        self.load_seconds: float | None = None

    @cached_property
    def fingerprint(self) -> str:
        return self._lm.fingerprint if self._lm is not None else model_fingerprint(self.settings.model)

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            t0 = time.perf_counter()
            self._lm = load_model(self.settings.model, **self.settings.model_kwargs())
            self.load_seconds = round(time.perf_counter() - t0, 2)
        return self._lm

    def describe(self) -> dict[str, Any] | None:
        """The manifest's ``model`` section (None until the model is loaded)."""
        lm = self._lm
        if lm is None:
            return None
        return {
            "name": lm.name,
            "source": lm.source,
            "fingerprint": lm.fingerprint,
            "model_type": lm.arch.model_type,
            "n_layers": lm.arch.n_layers,
            "dtype": str(lm.arch.embed.weight.dtype),
            "weights_orthogonalizable": lm.arch.spec.weights_orthogonalizable,
            "load_seconds": self.load_seconds,
        }


class Run:
    """One run folder: each method returns its stage's result, computing it (and the stages it reads)
    only when the saved one is missing or out of date."""

    def __init__(
        self,
        out: str | Path,
        settings: Settings,
        *,
        lm: LoadedModel | None = None,
        requested: Collection[str] | None = None,
        plan: measure.Plan | None = None,
    ) -> None:
        """requested: the measurements asked for by name (default: ``requested_measurements(settings)``);
        their missing data stops the run, the other measurements' missing data skips them. plan: the
        result of ``check_inputs`` when the caller ran it before building the run (the command line
        does, so a missing model is reported with every other problem)."""
        self.requested = requested_measurements(settings) if requested is None else set(requested)
        self.layout = RunLayout(out)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        # "auto" resolved before any fingerprint: the stages fingerprint the dtype they compute in
        self.settings, self.dtype_choice = resolved_settings(settings, lm)
        self.model = ModelRef(self.settings, lm)
        self.manifest = Manifest(self.layout)
        self._results: dict[str, Any] = {}
        self._fp: dict[str, str] = {}  # the fingerprint of each stage's inputs, as computed here
        self._plan = plan  # the measure stage's, from check_inputs

    @property
    def out(self) -> Path:
        return self.layout.root

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._results:
            self._results[key] = make()
        return self._results[key]

    def _stage(
        self,
        name: str,
        inputs: dict[str, Any],
        artifacts: list[Path],
        compute: Callable[[], Any],
        load: Callable[[], Any],
    ) -> Any:
        """``Manifest.stage``, recording the settings and the model with the stage."""

        def computed() -> Any:
            result = compute()
            release()  # what the stage freed is not resident under the next stage's peak (memory.py)
            self.manifest.update(
                settings=self.settings.model_dump(),
                model=self.model.describe(),
                compute_dtype=self.dtype_choice.describe(),
            )
            return result

        self._fp[name] = fingerprint(inputs)
        return self.manifest.stage(name, inputs, artifacts, computed, load)

    def check(self, stages: Iterable[str] = STAGES) -> measure.Plan | None:
        """``check_inputs`` for this run (``run_all`` and the measure stage call it unless given a plan)."""
        the_plan = check_inputs(
            self.layout,
            self.settings,
            stages=stages,
            requested=self.requested,
            model_loaded=self.model.loaded,
        )
        self._plan = the_plan or self._plan
        return the_plan

    # ---- the stages -----------------------------------------------------------------------------------
    def splits(self) -> Splits:
        splits: Splits = self._once("splits", lambda: load_splits(self.layout, self.settings))
        self.manifest.update(data=splits.describe())
        return splits

    def extract(self) -> Candidates:
        def run() -> Candidates:
            splits = self.splits()
            return self._stage(
                "extract",
                extract.inputs(self.model.fingerprint, splits, self.settings),
                extract.artifacts(self.layout),
                lambda: extract.extract(self.model.lm, splits, self.settings, self.layout),
                lambda: extract.load(self.layout),
            )

        return self._once("extract", run)

    def select(self) -> Direction:
        def run() -> Direction:
            cands, splits = self.extract(), self.splits()
            inputs = select.inputs(self._fp["extract"], splits, self.settings)
            fp = fingerprint(inputs)
            return self._stage(
                "select",
                inputs,
                select.artifacts(self.layout),
                lambda: select.select(self.model.lm, cands, splits, self.settings, self.layout, fp),
                lambda: select.load(self.layout),
            )

        return self._once("select", run)

    def evaluate(self) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            direction, splits = self.select(), self.splits()
            inputs = evaluate.inputs(self._fp["select"], splits, self.settings)
            fp = fingerprint(inputs)
            return self._stage(
                "evaluate",
                inputs,
                evaluate.artifacts(self.layout),
                lambda: evaluate.evaluate(self.model.lm, direction, splits, self.settings, self.layout, fp),
                lambda: evaluate.load(self.layout),
            )

        return self._once("evaluate", run)

    def measure(self) -> dict[str, Any]:
        """Judges, coherence and capability into measure/ (evaluation/suite.py; each file resumable)."""

        def run() -> dict[str, Any]:
            the_plan = self._plan or self.check(["measure"])
            assert the_plan is not None  # a check that includes the measure stage returns its plan
            direction, splits = self.select(), self.splits()
            self.evaluate()
            upstream = {k: self._fp[k] for k in ("select", "evaluate")}
            files = measure.suite_files(self.layout, self.settings)
            suite = Suite(self.settings, files, direction, splits, upstream, lambda: self.model.lm)
            return self._stage(
                "measure",
                measure.inputs(suite, the_plan),
                measure.artifacts(self.layout, self.settings),
                lambda: measure.measure(suite, self.layout, the_plan),
                lambda: measure.load(self.layout),
            )

        return self._once("measure", run)

    def export(self) -> Path | None:
        """The edited checkpoint (None when --no-export-checkpoint or the model cannot be orthogonalized)."""
        if not self.settings.export_checkpoint:
            return None

        def run() -> Path | None:
            direction, s = self.select(), self.settings
            return self._stage(
                "export",
                export.inputs(self._fp["select"], s),
                export.artifacts(self.layout, s),
                lambda: export.export(self.model.lm, direction, s, self.layout),
                lambda: export.load(self.layout, s),
            )

        return self._once("export", run)

    # ---- the whole run --------------------------------------------------------------------------------
    def save_manifest(self) -> None:
        self.manifest.update(
            settings=self.settings.model_dump(),
            model=self.model.describe(),
            compute_dtype=self.dtype_choice.describe(),
        )
        self.manifest.save()

    _save_manifest = save_manifest  # the name callers used before the stage split

    def results(self) -> dict[str, Any]:
        return summarize(self.layout, self.manifest.data)

    def run_all(self, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        if self._plan is None:
            self.check()
        for stage in STAGES:
            if progress:
                progress(stage)
            getattr(self, stage)()
        self.save_manifest()
        summary = self.results()
        try:
            from refusalkit.report import build_report

            build_report(self.out)
        except ImportError as exc:  # matplotlib is the `report` extra
            log.warning("report not built (%s); pip install 'refusalkit[report]'", exc)
        return summary
