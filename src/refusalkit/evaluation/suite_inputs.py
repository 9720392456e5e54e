"""What the measurements of the measure stage read, as explicit inputs (evaluation/suite.py holds them).

A measurement sees the settings it reads (``SuiteOptions``: the run's Settings has them all), the files
it reads (``SuiteFiles``: the evaluate stage's outputs and the data sets, resolved by the measure
stage), the direction, the splits, the fingerprints of the stages it depends on, and the model, loaded
on first use. It knows nothing of the run folder's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol

from refusalkit.data import load_instructions, sample
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation import coherence
from refusalkit.models.loading import LoadedModel
from refusalkit.utils import read_json


class SuiteOptions(Protocol):
    """The settings the measurements read (the run's Settings has them all)."""

    measurements: list[str]
    judge_model: str | None
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    device: str
    seed: int
    system_prompt: str | None
    batch_size: int
    gen_batch_size: int
    max_new_tokens: int
    coherence_n: int
    kl_n: int
    corpus_windows: int
    corpus_window_tokens: int
    gsm8k_n: int
    gsm8k_max_new_tokens: int
    truthfulqa_n: int
    lm_eval_tasks: list[str]
    lm_eval_limit: int | None
    over_refusal_n: int


@dataclass(frozen=True)
class SuiteFiles:
    """The files the measurements read: the evaluate stage's outputs and the data sets (resolved by the
    measure stage; a data file may be absent, the stage decides what that means)."""

    completions_dir: Path  # the evaluate stage's PROMPTSET__SETTING.json completions
    refusal_rates: Path  # the evaluate stage's refusal_rates.json (its orthogonalized-reuse check)
    corpus: Path  # corpus_ce's text
    gsm8k: Path  # gsm8k/test.jsonl
    truthfulqa: Path  # truthfulqa/TruthfulQA.csv
    kl_pool: str  # data spec of the broad harmless pool that tops up the first-token KL prompts
    data_dir: Path | None = None  # the data folder (over_refusal/ there: the over-refusal sets)

    def completions(self, key: str) -> Path:
        return self.completions_dir / f"{key}.json"


class Suite:
    """The measurements of one run, from explicit inputs.

    options: the settings they read; files: what they read from disk; splits: split name ->
    instructions; upstream: the fingerprints of the select and evaluate stages; load_model: called
    (once) only when a measurement must be computed, so an up-to-date stage never loads the model.
    """

    def __init__(
        self,
        options: SuiteOptions,
        files: SuiteFiles,
        direction: Direction,
        splits: Mapping[str, list[str]],
        upstream: Mapping[str, str],
        load_model: Callable[[], LoadedModel],
    ) -> None:
        self.settings = options
        self.files = files
        self.direction = direction
        self.splits = splits
        self.upstream = dict(upstream)
        self._load_model = load_model
        self._lm: LoadedModel | None = None

    # ---- inputs ---------------------------------------------------------------------------------------
    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            self._lm = self._load_model()
        return self._lm

    def stage_fp(self, stage: str) -> str:
        return self.upstream.get(stage, "")

    @cached_property
    def kl_instructions(self) -> tuple[list[str], str]:
        """The harmless prompts of the first-token KL and where they come from: the run's harmless test
        split, topped up to ``kl_n`` with a seeded draw from the broad harmless pool (``files.kl_pool``)
        minus every harmless train/val/test prompt."""
        n, split = self.settings.kl_n, self.splits["harmless_test"]
        chosen, source = list(split[:n]), "harmless_test"
        if len(chosen) < n:
            spec = self.files.kl_pool
            used = {x for k in ("harmless_train", "harmless_val", "harmless_test") for x in self.splits[k]}
            pool = sample(load_instructions(spec).instructions, None, self.settings.seed)
            chosen += [x for x in pool if x not in used][: n - len(chosen)]
            source += f" + {spec}"
        return chosen, source

    def completions(self, key: str) -> list[dict[str, Any]]:
        path = self.files.completions(key)
        if not path.is_file():
            raise RefusalkitError(f"{path} is missing; run the evaluate stage first (`refusalkit evaluate`)")
        return list(read_json(path)["rows"])

    @property
    def orthogonalized_reuse(self) -> dict[str, Any] | None:
        """The evaluate stage's check that the orthogonalized weights give the ablation hooks' logits
        (None when it did not run one)."""
        path = self.files.refusal_rates
        return read_json(path).get("orthogonalized_reuse") if path.is_file() else None

    def computed_settings(self) -> tuple[list[str], dict[str, Any] | None]:
        """The settings a per-setting measurement computes, and the reuse record when the orthogonalized
        weights passed the evaluate stage's logit check against the ablation hooks: their numbers are then
        the ablation's (the same function up to float rounding, 1e-5 of the logits on the default model),
        not computed twice."""
        settings = coherence.available_settings(self.lm)
        reuse = self.orthogonalized_reuse
        if "orthogonalized" in settings and "ablation" in settings and reuse and reuse.get("passed"):
            return [x for x in settings if x != "orthogonalized"], {"from": "ablation", **reuse}
        return settings, None

    def completion_keys(self) -> list[str]:
        return sorted(p.stem for p in self.files.completions_dir.glob("*__*.json"))
