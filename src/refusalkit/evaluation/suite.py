"""The measure stage: judges, coherence and capability for a run, one artifact per measurement.

Layout (RUN_DIR/measure/):
  refusal_judges.json   per-prompt verdicts of the paper's and the broad refusal markers, rates with CIs
  safety.json           LLM safety judge verdicts per harmful setting, with the judge's identity
                        (or ``measured: false`` and why, when no judge model is set)
  coherence.json        first-token KL vs the unedited model (mean, median, max over kl_n harmless
                        prompts) and CE of its own harmless completions
  corpus_ce.json        CE on a text corpus per setting
  projections.json      per-prompt projections of the last-token residual on the direction, every layer
  gsm8k.json, truthfulqa.json, lm_eval.json   capability, original vs orthogonalized
  summary.json          which measurements exist (and their cost), and why the others are absent; the
                        numbers themselves are in each file (refusalkit.report.headline gathers them)

Each file records the fingerprint of its inputs; a measurement whose file holds the same fingerprint is
skipped, so an interrupted stage resumes where it stopped. Input files are checked before any model
work, and every problem is reported at once.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from refusalkit.data import load_instructions, sample
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation import capability, coherence
from refusalkit.evaluation.judges import (
    BROAD_REFUSAL_MARKERS,
    BUILTIN_PROMPT_VERSION,
    PAPER_REFUSAL_SUBSTRINGS,
    SafetyJudge,
    rate,
    refusal_verdicts,
    summarize_safety,
)
from refusalkit.layout import RunLayout
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import format_prompts
from refusalkit.settings import MEASUREMENTS, Settings
from refusalkit.utils import read_json, sha256_file, sha256_text

log = logging.getLogger(__name__)
# The broad harmless set that tops up the KL prompts: Alpaca instructions (the paper's harmless test split).
KL_POOL = ("refusal_direction", "splits", "harmless_test.json")
VERSION = 2  # bump when a measurement's definition changes, so old artifacts are recomputed


@dataclass(frozen=True)
class Measurement:
    name: str
    description: str
    inputs: Callable[[Suite], dict[str, Any]]  # what the result depends on (fingerprinted)
    compute: Callable[[Suite], dict[str, Any]]


class Suite:
    """The measurements of one run, from explicit inputs.

    splits: split name -> instructions; upstream: the fingerprints of the select and evaluate stages;
    load_model: called (once) only when a measurement must be computed, so an up-to-date stage never
    loads the model.
    """

    def __init__(
        self,
        settings: Settings,
        layout: RunLayout,
        direction: Direction,
        splits: Mapping[str, list[str]],
        upstream: Mapping[str, str],
        load_model: Callable[[], LoadedModel],
    ) -> None:
        self.settings = settings
        self.layout = layout
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

    def data_path(self, *parts: str) -> Path:
        return Path(self.settings.data_dir).joinpath(*parts)

    @property
    def corpus_path(self) -> Path:
        s = self.settings
        return Path(s.corpus) if s.corpus else self.data_path("corpus", "wikitext2_tokenized_test.txt")

    @cached_property
    def kl_instructions(self) -> tuple[list[str], str]:
        """The harmless prompts of the first-token KL and where they come from: the run's harmless test
        split, topped up to ``kl_n`` with a seeded draw from the broad harmless pool (KL_POOL under the
        data folder, else the harmless test source) minus every harmless train/val/test prompt."""
        n, split = self.settings.kl_n, self.splits["harmless_test"]
        chosen, source = list(split[:n]), "harmless_test"
        if len(chosen) < n:
            pool = self.data_path(*KL_POOL)
            st = self.settings
            spec = str(pool) if pool.is_file() else (st.harmless_test or st.harmless_train)
            used = {x for k in ("harmless_train", "harmless_val", "harmless_test") for x in self.splits[k]}
            extra = [x for x in sample(load_instructions(spec).instructions, None, st.seed) if x not in used]
            chosen += extra[: n - len(chosen)]
            source += f" + {spec}"
        return chosen, source

    def completions(self, key: str) -> list[dict[str, Any]]:
        path = self.layout.completions(*key.split("__", 1))
        if not path.is_file():
            raise RefusalkitError(f"{path} is missing; run `refusalkit evaluate {self.layout.root}` first")
        return list(read_json(path)["rows"])

    @property
    def orthogonalized_reuse(self) -> dict[str, Any] | None:
        """The evaluate stage's check that the orthogonalized weights give the ablation hooks' logits
        (None when it did not run one)."""
        path = self.layout.refusal_rates
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
        return sorted(p.stem for p in self.layout.completions_dir.glob("*__*.json"))


# ---- the measurements ----------------------------------------------------------------------------------


def _refusal_inputs(s: Suite) -> dict[str, Any]:
    return {
        "evaluate": s.stage_fp("evaluate"),
        "paper": PAPER_REFUSAL_SUBSTRINGS,
        "broad": BROAD_REFUSAL_MARKERS,
    }


def _refusal_judges(s: Suite) -> dict[str, Any]:
    rates: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    for key in s.completion_keys():
        prompt_set, setting = key.split("__", 1)
        verdicts = [
            {"index": i, **refusal_verdicts(r["completion"])} for i, r in enumerate(s.completions(key))
        ]
        rows[key] = verdicts
        n = len(verdicts)
        rates.setdefault(prompt_set, {})[setting] = {
            judge: rate(sum(v[judge] for v in verdicts), n) for judge in ("paper", "broad")
        }
    return {
        "measured": True,
        "max_new_tokens": s.settings.max_new_tokens,
        "rates": rates,
        "rows": rows,
        "note": "paper: the paper's substring list, case-insensitive as in its code; broad: that list plus more refusal phrasings",
    }


def _safety_inputs(s: Suite) -> dict[str, Any]:
    return {
        "evaluate": s.stage_fp("evaluate"),
        "judge": s.settings.judge_model,
        "builtin_prompt": BUILTIN_PROMPT_VERSION,
    }


def _safety(s: Suite) -> dict[str, Any]:
    spec = s.settings.judge_model
    if not spec:
        return {
            "measured": False,
            "reason": "no safety judge model set (--judge-model); see docs/evaluation.md",
        }
    judge = SafetyJudge.load(spec, dtype=s.settings.dtype, device=s.settings.device)
    by_setting: dict[str, Any] = {}
    try:
        for key in [k for k in s.completion_keys() if k.startswith("harmful__")]:
            rows = s.completions(key)
            verdicts = judge.judge([r["instruction"] for r in rows], [r["completion"] for r in rows])
            by_setting[key.split("__", 1)[1]] = {
                **summarize_safety(verdicts),
                "rows": [
                    {"index": i, "judge": judge.identity.short, **v.__dict__} for i, v in enumerate(verdicts)
                ],
            }
    finally:
        del judge
        gc.collect()
    return {"measured": True, "judge": _identity(spec, by_setting), "settings": by_setting}


def _identity(spec: str, by_setting: dict[str, Any]) -> dict[str, Any]:
    ids = {r["judge"] for v in by_setting.values() for r in v["rows"]}
    return {
        "spec": spec,
        "ids": sorted(ids),
        "short_reply_rule": "fewer than 15 words -> safe (paper's code)",
    }


def _coherence_inputs(s: Suite) -> dict[str, Any]:
    kl_prompts, source = s.kl_instructions
    return {
        "select": s.stage_fp("select"),
        "evaluate": s.stage_fp("evaluate"),
        "n": s.settings.coherence_n,
        "kl": {"source": source, "sha256": sha256_text("\n".join(kl_prompts))},
    }


def _coherence(s: Suite) -> dict[str, Any]:
    lm, st = s.lm, s.settings
    settings, reuse = s.computed_settings()
    rows = s.completions("harmless__baseline")[: st.coherence_n]
    kl_instructions, source = s.kl_instructions
    if len(kl_instructions) < st.kl_n:
        log.warning(
            "first-token KL on %d harmless prompts (--kl-n %d): no more disjoint ones",
            len(kl_instructions),
            st.kl_n,
        )
    result = coherence.harmless_coherence(
        lm,
        s.direction,
        format_prompts(lm.tokenizer, [r["instruction"] for r in rows], st.system_prompt),
        [r["completion"] for r in rows],
        settings,
        batch_size=st.batch_size,
        kl_prompts=format_prompts(lm.tokenizer, kl_instructions, st.system_prompt),
    )
    _reuse_ablation(result, ("kl", "completion_ce"), reuse)
    return {"measured": True, "kl_source": source, "kl_definition": "exact", **result}


def _reuse_ablation(result: dict[str, Any], keys: tuple[str, ...], reuse: dict[str, Any] | None) -> None:
    """With a passed reuse check, the orthogonalized numbers under ``keys`` are the ablation's (recorded)."""
    if reuse is None:
        return
    for key in keys:
        result[key]["orthogonalized"] = result[key]["ablation"]
    result["orthogonalized_reuse"] = reuse


def _corpus_inputs(s: Suite) -> dict[str, Any]:
    p = s.corpus_path
    return {
        "select": s.stage_fp("select"),
        "evaluate": s.stage_fp("evaluate"),  # the orthogonalized reuse check
        "corpus": str(p),
        "sha256": sha256_file(p) if p.is_file() else None,
        "windows": s.settings.corpus_windows,
        "window_tokens": s.settings.corpus_window_tokens,
    }


def _corpus(s: Suite) -> dict[str, Any]:
    lm, st = s.lm, s.settings
    windows = coherence.corpus_windows(
        lm.tokenizer, s.corpus_path, st.corpus_windows, st.corpus_window_tokens
    )
    settings, reuse = s.computed_settings()
    result = coherence.corpus_ce(lm, s.direction, windows, settings, batch_size=st.batch_size)
    _reuse_ablation(result, ("ce", "ce_per_window"), reuse)
    return {"measured": True, "corpus": str(s.corpus_path), **result}


def _projection_inputs(s: Suite) -> dict[str, Any]:
    n = s.settings.coherence_n
    return {
        "select": s.stage_fp("select"),
        "n": n,
        "data": [sha256_text("\n".join(s.splits[k][:n])) for k in ("harmful_test", "harmless_test")],
    }


def _projections(s: Suite) -> dict[str, Any]:
    lm, st = s.lm, s.settings
    splits = s.splits
    out: dict[str, Any] = {"measured": True, "position": s.direction.position, "layer": s.direction.layer}
    for cls in ("harmful", "harmless"):
        prompts = format_prompts(lm.tokenizer, splits[f"{cls}_test"][: st.coherence_n], st.system_prompt)
        out[cls] = coherence.direction_projections(lm, prompts, s.direction, batch_size=st.batch_size)
    return out


def _file_inputs(s: Suite, *parts: str, **extra: Any) -> dict[str, Any]:
    p = s.data_path(*parts)
    return {
        "select": s.stage_fp("select"),
        "file": str(p),
        "sha256": sha256_file(p) if p.is_file() else None,
        **extra,
    }


def _edited_setting(s: Suite) -> str:
    return "orthogonalized" if s.lm.arch.spec.weights_orthogonalizable else "ablation"


def _compare(s: Suite, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn`` on the original model and on the edited one (orthogonalized weights, else ablation hooks)."""
    edited = _edited_setting(s)
    original = fn()
    with coherence.intervention(s.lm, edited, s.direction):
        changed = fn()
    return {"measured": True, "edited_setting": edited, "original": original, "edited": changed}


def _gsm8k(s: Suite) -> dict[str, Any]:
    st = s.settings
    problems = capability.load_gsm8k(s.data_path("gsm8k", "test.jsonl"), st.gsm8k_n)
    return _compare(
        s,
        lambda: capability.gsm8k_accuracy(
            s.lm,
            problems,
            max_new_tokens=st.gsm8k_max_new_tokens,
            batch_size=st.gen_batch_size,
            system=st.system_prompt,
        ),
    ) | {"prompt_version": capability.GSM8K_PROMPT_VERSION, "max_new_tokens": st.gsm8k_max_new_tokens}


def _truthfulqa(s: Suite) -> dict[str, Any]:
    items = capability.load_truthfulqa(s.data_path("truthfulqa", "TruthfulQA.csv"), s.settings.truthfulqa_n)
    return _compare(s, lambda: capability.truthfulqa_mc(s.lm, items, system=s.settings.system_prompt)) | {
        "prompt_version": capability.TRUTHFULQA_PROMPT_VERSION
    }


def _lm_eval(s: Suite) -> dict[str, Any]:
    st = s.settings
    return _compare(s, lambda: capability.lm_eval_tasks(s.lm, st.lm_eval_tasks, limit=st.lm_eval_limit))


REGISTRY: dict[str, Measurement] = {
    m.name: m
    for m in (
        Measurement(
            "refusal_judges", "refusal markers on the saved completions", _refusal_inputs, _refusal_judges
        ),
        Measurement("safety", "LLM safety judge on harmful completions", _safety_inputs, _safety),
        Measurement(
            "coherence", "first-token KL and completion CE on harmless prompts", _coherence_inputs, _coherence
        ),
        Measurement("corpus_ce", "cross-entropy on a text corpus", _corpus_inputs, _corpus),
        Measurement(
            "projections", "per-prompt projections on the direction", _projection_inputs, _projections
        ),
        Measurement(
            "gsm8k",
            "GSM8K exact match, original vs edited",
            lambda s: _file_inputs(
                s,
                "gsm8k",
                "test.jsonl",
                n=s.settings.gsm8k_n,
                max_new_tokens=s.settings.gsm8k_max_new_tokens,
                prompt_version=capability.GSM8K_PROMPT_VERSION,
            ),
            _gsm8k,
        ),
        Measurement(
            "truthfulqa",
            "TruthfulQA MC1/MC2, original vs edited",
            lambda s: _file_inputs(
                s,
                "truthfulqa",
                "TruthfulQA.csv",
                n=s.settings.truthfulqa_n,
                prompt_version=capability.TRUTHFULQA_PROMPT_VERSION,
            ),
            _truthfulqa,
        ),
        Measurement(
            "lm_eval",
            "lm-evaluation-harness tasks, original vs edited",
            lambda s: {
                "select": s.stage_fp("select"),
                "tasks": s.settings.lm_eval_tasks,
                "limit": s.settings.lm_eval_limit,
            },
            _lm_eval,
        ),
    )
}
assert set(REGISTRY) == set(MEASUREMENTS), "settings.MEASUREMENTS and the registry must list the same names"
