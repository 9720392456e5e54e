"""The run: the stages wired together over one run folder, with resume.

Every stage is a function with explicit inputs and outputs in ``refusalkit.stages``; ``Manifest.stage``
fingerprints its inputs, skips it when the manifest records the same fingerprint and its artifacts
exist, and records it otherwise. Paths come from ``RunLayout``. The model is loaded only when a stage
has work to do: a finished run reruns without loading it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from refusalkit.directions import Candidates, Direction
from refusalkit.evaluation.suite import Suite
from refusalkit.layout import RunLayout
from refusalkit.manifest import Manifest, fingerprint
from refusalkit.models.loading import LoadedModel, load_model, resolved_settings
from refusalkit.settings import Settings
from refusalkit.stages import STAGES, evaluate, export, extract, measure, select
from refusalkit.stages.common import model_fingerprint
from refusalkit.stages.data import Splits, load_splits
from refusalkit.stages.results import format_table, summarize

log = logging.getLogger(__name__)
__all__ = ["STAGES", "ModelRef", "Run", "format_table"]


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

    def __init__(self, out: str | Path, settings: Settings, *, lm: LoadedModel | None = None) -> None:
        self.layout = RunLayout(out)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        # "auto" resolved before any fingerprint: the stages fingerprint the dtype they compute in
        self.settings, self.dtype_choice = resolved_settings(settings, lm)
        self.model = ModelRef(self.settings, lm)
        self.manifest = Manifest(self.layout)
        self._results: dict[str, Any] = {}
        self._fp: dict[str, str] = {}  # the fingerprint of each stage's inputs, as computed here

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
            self.manifest.update(
                settings=self.settings.model_dump(),
                model=self.model.describe(),
                compute_dtype=self.dtype_choice.describe(),
            )
            return result

        self._fp[name] = fingerprint(inputs)
        return self.manifest.stage(name, inputs, artifacts, computed, load)

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
            direction, splits = self.select(), self.splits()
            self.evaluate()
            upstream = {k: self._fp[k] for k in ("select", "evaluate")}
            suite = Suite(self.settings, self.layout, direction, splits, upstream, lambda: self.model.lm)
            return self._stage(
                "measure",
                measure.inputs(suite),
                measure.artifacts(suite),
                lambda: measure.measure(suite),
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
