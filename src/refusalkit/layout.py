"""The run folder: the one place that names every artifact a run writes or reads.

Every module that touches a run folder takes a ``RunLayout`` and asks it for paths; no other module
spells an artifact's path. Reading a finished run's artifacts (settings, direction, the search's choice,
the active edit) goes through ``run.RunFolder``. Layout:

  manifest.json                      settings, versions, hardware, model and data hashes, stage records
  data/splits.json                   the exact instructions of every split (after sampling)
  extract/candidates.safetensors     harmful and harmless means [n_positions, n_layers, d_model]
  extract/summary.json               filter counts and refusal metrics of the training prompts
  select/candidate_scores.json       bypass / induce / KL of every candidate, kept or why discarded
  select/partial_scores.json         selection checkpoint (resume), removed when selection finishes
  select/direction.{safetensors,json}
  evaluate/completions/SET__SETTING.json   per-prompt completions and verdicts
  evaluate/refusal_rates.json        refusal rate per prompt set and setting, with 95% intervals
  measure/NAME.json                  judges, coherence, capability (evaluation/suite.py)
  measure/summary.json               what the measure stage computed and what it could not
  search/study.db                    the edit search's Optuna study (resumable)
  search/front.json                  the Pareto front, proxy and verified objectives
  search/chosen.json                 the edit chosen from the front (parameters and kernels)
  search/completions/trial_N.json    each verified completion's sha256 and every judge's verdict, no text
  calibrate/                         `refusalkit calibrate`: the false-refusal means, scores per lambda,
                                     the chosen vectors (lam*.safetensors/json), calibrated.json
  calibrate/search/                  `refusalkit optimize --goal calibrate`: study.db, front.json and
                                     chosen.{safetensors,json} (the chosen weighted calibration)
  suffix/                            GCG search and suffix analysis (analysis/)
  model/                             the edited checkpoint and its card (export.cli.write_model, its one writer)
  gguf/                              GGUF exports and control vectors
  results.json                       the headline numbers of the run
  report.html, report.json           the report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ---- top level ------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    # ---- data / extract / select --------------------------------------------------------------------
    @property
    def splits(self) -> Path:
        return self.root / "data" / "splits.json"

    @property
    def candidates(self) -> Path:
        return self.root / "extract" / "candidates.safetensors"

    @property
    def extract_summary(self) -> Path:
        return self.root / "extract" / "summary.json"

    @property
    def candidate_scores(self) -> Path:
        return self.root / "select" / "candidate_scores.json"

    @property
    def partial_scores(self) -> Path:
        return self.root / "select" / "partial_scores.json"

    @property
    def direction(self) -> Path:
        """The direction's stem: ``.safetensors`` holds the vector, ``.json`` its metadata."""
        return self.root / "select" / "direction"

    # ---- evaluate / measure ---------------------------------------------------------------------------
    @property
    def completions_dir(self) -> Path:
        return self.root / "evaluate" / "completions"

    def completions(self, prompt_set: str, setting: str) -> Path:
        return self.completions_dir / f"{prompt_set}__{setting}.json"

    @property
    def refusal_rates(self) -> Path:
        return self.root / "evaluate" / "refusal_rates.json"

    @property
    def measure_dir(self) -> Path:
        return self.root / "measure"

    def measurement(self, name: str) -> Path:
        return self.measure_dir / f"{name}.json"

    @property
    def measure_summary(self) -> Path:
        return self.measure_dir / "summary.json"

    # ---- search / exports / analysis ------------------------------------------------------------------
    @property
    def search_dir(self) -> Path:
        return self.root / "search"

    @property
    def study(self) -> Path:
        return self.search_dir / "study.db"

    @property
    def front(self) -> Path:
        return self.search_dir / "front.json"

    @property
    def chosen(self) -> Path:
        return self.search_dir / "chosen.json"

    @property
    def calibrate_dir(self) -> Path:
        return self.root / "calibrate"

    @property
    def calibrated(self) -> Path:
        """calibrate/calibrated.json: the calibration `refusalkit calibrate` chose last (its vector's stem)."""
        return self.calibrate_dir / "calibrated.json"

    @property
    def calibrate_search_dir(self) -> Path:
        """`refusalkit optimize --goal calibrate`: its study, front and chosen edit (never search/'s)."""
        return self.calibrate_dir / "search"

    @property
    def calibrate_study(self) -> Path:
        return self.calibrate_search_dir / "study.db"

    @property
    def calibrate_front(self) -> Path:
        return self.calibrate_search_dir / "front.json"

    @property
    def calibrate_chosen(self) -> Path:
        """The calibration search's chosen edit's stem (a ``Direction``: .safetensors and .json)."""
        return self.calibrate_search_dir / "chosen"

    @property
    def suffix_dir(self) -> Path:
        return self.root / "suffix"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"
