"""The measure stage: judges, coherence and capability for a run, one artifact per measurement.

Layout (RUN_DIR/measure/):
  refusal_judges.json   per-prompt verdicts of the paper's and the broad refusal markers, rates with CIs
  safety.json           LLM safety judge verdicts per harmful setting, with the judge's identity
                        (or ``measured: false`` and why, when no judge model is set)
  llm_judge.json        four-class verdicts (refusal, compliance, partial, degenerate) of every saved
                        completion by the run's own unedited model, rates per setting (opt-in)
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusalkit.evaluation import capability, coherence, llm_judge
from refusalkit.evaluation.judges import (
    BROAD_REFUSAL_MARKERS,
    BUILTIN_PROMPT_VERSION,
    PAPER_REFUSAL_SUBSTRINGS,
    SafetyJudge,
    rate,
    refusal_verdicts,
    summarize_safety,
)
from refusalkit.evaluation.suite_inputs import Suite
from refusalkit.prompts import format_prompts
from refusalkit.settings import MEASUREMENTS
from refusalkit.utils import sha256_file, sha256_text

log = logging.getLogger(__name__)
VERSION = 2  # bump when a measurement's definition changes, so old artifacts are recomputed


@dataclass(frozen=True)
class Measurement:
    name: str
    description: str
    inputs: Callable[[Suite], dict[str, Any]]  # what the result depends on (fingerprinted)
    compute: Callable[[Suite], dict[str, Any]]


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
    p = s.files.corpus
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
        lm.tokenizer, s.files.corpus, st.corpus_windows, st.corpus_window_tokens
    )
    settings, reuse = s.computed_settings()
    result = coherence.corpus_ce(lm, s.direction, windows, settings, batch_size=st.batch_size)
    _reuse_ablation(result, ("ce", "ce_per_window"), reuse)
    return {"measured": True, "corpus": str(s.files.corpus), **result}


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


def _file_inputs(s: Suite, p: Path, **extra: Any) -> dict[str, Any]:
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
    problems = capability.load_gsm8k(s.files.gsm8k, st.gsm8k_n)
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
    items = capability.load_truthfulqa(s.files.truthfulqa, s.settings.truthfulqa_n)
    return _compare(s, lambda: capability.truthfulqa_mc(s.lm, items, system=s.settings.system_prompt)) | {
        "prompt_version": capability.TRUTHFULQA_PROMPT_VERSION
    }


def _lm_eval(s: Suite) -> dict[str, Any]:
    st = s.settings
    return _compare(s, lambda: capability.lm_eval_tasks(s.lm, st.lm_eval_tasks, limit=st.lm_eval_limit))


def _over_refusal_sets(s: Suite) -> dict[str, Path]:
    """The held-out over-refusal sets found in the data folder (OR-Bench-Hard test, OKTest val)."""
    from refusalkit.calibrate import data

    root = s.files.data_dir
    if root is None:  # no data folder given: none (never the current directory's)
        return {}
    return {n: data.path(root, n) for n in data.TEST_SETS if data.path(root, n).is_file()}


def _over_refusal_inputs(s: Suite) -> dict[str, Any]:
    return {
        "select": s.stage_fp("select"),
        "sets": {n: sha256_file(p) for n, p in _over_refusal_sets(s).items()},
        "n": s.settings.over_refusal_n,
        "max_new_tokens": s.settings.max_new_tokens,
        "system": s.settings.system_prompt,
        "paper": PAPER_REFUSAL_SUBSTRINGS,
        "broad": BROAD_REFUSAL_MARKERS,
    }


def _over_refusal(s: Suite) -> dict[str, Any]:
    """Refusal rates on prompts that look harmful but are not, unedited and edited (the run's judges)."""
    from refusalkit.calibrate.data import load
    from refusalkit.calibrate.rates import judged_rates

    st, edited = s.settings, _edited_setting(s)
    sets = {n: load(p.parent.parent, n, st.over_refusal_n) for n, p in _over_refusal_sets(s).items()}
    kw: dict[str, Any] = {
        "system": st.system_prompt,
        "max_new_tokens": st.max_new_tokens,
        "batch_size": st.gen_batch_size,
    }
    runs = {
        "baseline": judged_rates(s.lm, sets, desc="over-refusal baseline", **kw),
        edited: judged_rates(
            s.lm,
            sets,
            edit=lambda: coherence.intervention(s.lm, edited, s.direction),
            desc=f"over-refusal {edited}",
            **kw,
        ),
    }
    return {
        "measured": True,
        "edited_setting": edited,
        "max_new_tokens": st.max_new_tokens,
        # rates[prompt set][setting][judge], as refusal_judges.json
        "rates": {n: {k: r[n]["rates"] for k, r in runs.items()} for n in sets},
        "rows": {f"{n}__{k}": r[n]["rows"] for k, r in runs.items() for n in sets},
        "note": "prompts that look harmful but are not: every refusal is a false refusal",
    }


REGISTRY: dict[str, Measurement] = {
    m.name: m
    for m in (
        Measurement(
            "refusal_judges", "refusal markers on the saved completions", _refusal_inputs, _refusal_judges
        ),
        Measurement("safety", "LLM safety judge on harmful completions", _safety_inputs, _safety),
        Measurement(
            "llm_judge",
            "four-class verdicts by the run's own model",
            llm_judge.suite_inputs,
            llm_judge.suite_measure,
        ),
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
                s.files.gsm8k,
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
                s.files.truthfulqa,
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
        Measurement(
            "over_refusal",
            "false refusals on OR-Bench-Hard test and OKTest val, original vs edited",
            _over_refusal_inputs,
            _over_refusal,
        ),
    )
}
assert set(REGISTRY) == set(MEASUREMENTS), "settings.MEASUREMENTS and the registry must list the same names"
