"""The measure stage: judges, coherence and capability for a run, one artifact per measurement.

Layout (RUN_DIR/measure/):
  refusal_judges.json   per-prompt verdicts of the paper's and the broad refusal markers, rates with CIs
  safety.json           LLM safety judge verdicts per harmful setting, with the judge's identity
                        (or ``measured: false`` and why, when no judge model is set)
  coherence.json        first-token KL vs the unedited model and CE of its own harmless completions
  corpus_ce.json        CE on a text corpus per setting
  projections.json      per-prompt projections of the last-token residual on the direction, every layer
  gsm8k.json, truthfulqa.json, lm_eval.json   capability, original vs orthogonalized
  summary.json          the headline numbers of all of them

Each file records the fingerprint of its inputs; a measurement whose file holds the same fingerprint is
skipped, so an interrupted stage resumes where it stopped. Input files are checked before any model
work, and every problem is reported at once.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from refusalkit.prompts import format_prompts
from refusalkit.settings import MEASUREMENTS, Settings
from refusalkit.utils import read_json, sha256_file, sha256_text, write_json

if TYPE_CHECKING:
    from refusalkit.pipeline import Run

log = logging.getLogger(__name__)
VERSION = 1  # bump when a measurement's definition changes, so old artifacts are recomputed


@dataclass(frozen=True)
class Measurement:
    name: str
    description: str
    inputs: Callable[[Suite], dict[str, Any]]  # what the result depends on (fingerprinted)
    compute: Callable[[Suite], dict[str, Any]]


class Suite:
    """The measurements of one run. ``run`` supplies settings, splits, the model (loaded lazily) and
    the evaluate stage's completions."""

    def __init__(self, run: Run, direction: Direction) -> None:
        self.run = run
        self.direction = direction
        self.settings: Settings = run.settings
        self.dir = run.out / "measure"

    # ---- inputs ---------------------------------------------------------------------------------------
    def stage_fp(self, stage: str) -> str:
        return str(self.run.manifest.get("stages", {}).get(stage, {}).get("fingerprint", ""))

    def data_path(self, *parts: str) -> Path:
        return Path(self.settings.data_dir).joinpath(*parts)

    @property
    def corpus_path(self) -> Path:
        return (
            Path(self.settings.corpus)
            if self.settings.corpus
            else self.data_path("corpus", "wikitext2_tokenized_test.txt")
        )

    def completions(self, key: str) -> list[dict[str, Any]]:
        path = self.run.out / "evaluate" / "completions" / f"{key}.json"
        if not path.is_file():
            raise RefusalkitError(f"{path} is missing; run `refusalkit evaluate {self.run.out}` first")
        return list(read_json(path)["rows"])

    def completion_keys(self) -> list[str]:
        folder = self.run.out / "evaluate" / "completions"
        return sorted(p.stem for p in folder.glob("*__*.json"))

    def fingerprint_of(self, m: Measurement) -> str:
        return sha256_text(
            json.dumps({"v": VERSION, "name": m.name, **m.inputs(self)}, sort_keys=True, default=str)
        )[:16]

    @property
    def fingerprint(self) -> str:
        by_name = {m: self.fingerprint_of(REGISTRY[m]) for m in self.settings.measurements}
        return sha256_text(json.dumps(by_name, sort_keys=True))[:16]

    @property
    def artifacts(self) -> list[Path]:
        """The files the selected measurements write (the stage is done only if all exist)."""
        return [self.dir / f"{name}.json" for name in self.settings.measurements]

    def preflight(self) -> None:
        """Check every input file and option before any model work; report all problems at once."""
        s, want, problems = self.settings, set(self.settings.measurements), []
        checks = {
            "corpus_ce": (self.corpus_path, "--corpus PATH or --data-dir"),
            "gsm8k": (self.data_path("gsm8k", "test.jsonl"), "--data-dir (it must hold gsm8k/test.jsonl)"),
            "truthfulqa": (
                self.data_path("truthfulqa", "TruthfulQA.csv"),
                "--data-dir (it must hold truthfulqa/TruthfulQA.csv)",
            ),
        }
        for name, (path, fix) in checks.items():
            if name in want and not path.is_file():
                problems.append(f"{name}: {path} not found; set {fix}, or drop {name} from --measurements")
        if "lm_eval" in want and not s.lm_eval_tasks:
            problems.append("lm_eval: no tasks; set --lm-eval-tasks (e.g. arc_easy,winogrande)")
        if problems:
            raise RefusalkitError("the measure stage cannot start:\n  " + "\n  ".join(problems))

    # ---- running ----------------------------------------------------------------------------------------
    def run_all(self) -> dict[str, Any]:
        self.preflight()
        for name in self.settings.measurements:
            m = REGISTRY[name]
            fp = self.fingerprint_of(m)
            path = self.dir / f"{name}.json"
            if path.is_file() and read_json(path).get("fingerprint") == fp:
                log.info("measure %s: up to date", name)
                continue
            log.info("measure %s: %s", name, m.description)
            t0 = time.perf_counter()
            result = m.compute(self)
            write_json(
                path,
                {
                    "measurement": name,
                    "description": m.description,
                    "fingerprint": fp,
                    "inputs": m.inputs(self),
                    "seconds": round(time.perf_counter() - t0, 2),
                    "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    **result,
                },
            )
        summary = summarize(self.dir, self.settings.measurements)
        write_json(self.dir / "summary.json", summary)
        return summary


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
    return {"select": s.stage_fp("select"), "evaluate": s.stage_fp("evaluate"), "n": s.settings.coherence_n}


def _coherence(s: Suite) -> dict[str, Any]:
    lm, st = s.run.lm, s.settings
    rows = s.completions("harmless__baseline")[: st.coherence_n]
    prompts = format_prompts(lm.tokenizer, [r["instruction"] for r in rows], st.system_prompt)
    result = coherence.harmless_coherence(
        lm,
        s.direction,
        prompts,
        [r["completion"] for r in rows],
        coherence.available_settings(lm),
        batch_size=st.batch_size,
    )
    return {"measured": True, **result}


def _corpus_inputs(s: Suite) -> dict[str, Any]:
    p = s.corpus_path
    return {
        "select": s.stage_fp("select"),
        "corpus": str(p),
        "sha256": sha256_file(p) if p.is_file() else None,
        "windows": s.settings.corpus_windows,
        "window_tokens": s.settings.corpus_window_tokens,
    }


def _corpus(s: Suite) -> dict[str, Any]:
    lm, st = s.run.lm, s.settings
    windows = coherence.corpus_windows(
        lm.tokenizer, s.corpus_path, st.corpus_windows, st.corpus_window_tokens
    )
    result = coherence.corpus_ce(
        lm, s.direction, windows, coherence.available_settings(lm), batch_size=st.batch_size
    )
    return {"measured": True, "corpus": str(s.corpus_path), **result}


def _projection_inputs(s: Suite) -> dict[str, Any]:
    data = s.run.manifest.get("data", {})
    return {
        "select": s.stage_fp("select"),
        "n": s.settings.coherence_n,
        "data": [data.get(k, {}).get("sha256") for k in ("harmful_test", "harmless_test")],
    }


def _projections(s: Suite) -> dict[str, Any]:
    lm, st = s.run.lm, s.settings
    splits = s.run.splits()
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
    return "orthogonalized" if s.run.lm.arch.spec.weights_orthogonalizable else "ablation"


def _compare(s: Suite, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn`` on the original model and on the edited one (orthogonalized weights, else ablation hooks)."""
    edited = _edited_setting(s)
    original = fn()
    with coherence.intervention(s.run.lm, edited, s.direction):
        changed = fn()
    return {"measured": True, "edited_setting": edited, "original": original, "edited": changed}


def _gsm8k(s: Suite) -> dict[str, Any]:
    st = s.settings
    problems = capability.load_gsm8k(s.data_path("gsm8k", "test.jsonl"), st.gsm8k_n)
    return _compare(
        s,
        lambda: capability.gsm8k_accuracy(
            s.run.lm,
            problems,
            max_new_tokens=st.gsm8k_max_new_tokens,
            batch_size=st.gen_batch_size,
            system=st.system_prompt,
        ),
    ) | {"prompt_version": capability.GSM8K_PROMPT_VERSION, "max_new_tokens": st.gsm8k_max_new_tokens}


def _truthfulqa(s: Suite) -> dict[str, Any]:
    items = capability.load_truthfulqa(s.data_path("truthfulqa", "TruthfulQA.csv"), s.settings.truthfulqa_n)
    return _compare(s, lambda: capability.truthfulqa_mc(s.run.lm, items, system=s.settings.system_prompt)) | {
        "prompt_version": capability.TRUTHFULQA_PROMPT_VERSION
    }


def _lm_eval(s: Suite) -> dict[str, Any]:
    st = s.settings
    return _compare(s, lambda: capability.lm_eval_tasks(s.run.lm, st.lm_eval_tasks, limit=st.lm_eval_limit))


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
                s, "gsm8k", "test.jsonl", n=s.settings.gsm8k_n, max_new_tokens=s.settings.gsm8k_max_new_tokens
            ),
            _gsm8k,
        ),
        Measurement(
            "truthfulqa",
            "TruthfulQA MC1/MC2, original vs edited",
            lambda s: _file_inputs(s, "truthfulqa", "TruthfulQA.csv", n=s.settings.truthfulqa_n),
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


def summarize(folder: Path, names: list[str] | tuple[str, ...] = MEASUREMENTS) -> dict[str, Any]:
    """Which measurements exist in ``folder`` (and their cost); why the others are absent.

    The numbers themselves are in each file; ``refusalkit.report.headline`` gathers them."""
    out: dict[str, Any] = {"measured": [], "not_measured": {}, "seconds": {}}
    for name in names:
        path = folder / f"{name}.json"
        d = read_json(path) if path.is_file() else {"measured": False, "reason": "no artifact"}
        if d.get("measured", True):
            out["measured"].append(name)
            out["seconds"][name] = d.get("seconds")
        else:
            out["not_measured"][name] = d.get("reason", "not measured")
    return out
