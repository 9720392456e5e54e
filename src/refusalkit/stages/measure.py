"""The measure stage: every selected measurement of evaluation/suite.py into measure/NAME.json.

Each file records the fingerprint of its measurement's inputs; a measurement whose file holds the same
fingerprint is skipped, so an interrupted stage resumes where it stopped. Input files are checked before
any model work, and every problem is reported at once. measure/summary.json says which measurements
exist (and their cost) and why the others are absent.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.suite import REGISTRY, VERSION, Measurement, Suite
from refusalkit.layout import RunLayout
from refusalkit.manifest import fingerprint
from refusalkit.settings import MEASUREMENTS
from refusalkit.utils import read_json, write_json

log = logging.getLogger(__name__)


def fingerprint_of(suite: Suite, m: Measurement) -> str:
    return fingerprint({"v": VERSION, "name": m.name, **m.inputs(suite)})


def inputs(suite: Suite) -> dict[str, Any]:
    """The stage's inputs: the fingerprint of every selected measurement."""
    return {name: fingerprint_of(suite, REGISTRY[name]) for name in suite.settings.measurements}


def artifacts(suite: Suite) -> list[Path]:
    """The files the selected measurements write (the stage is done only if all exist)."""
    layout = suite.layout
    return [layout.measure_summary, *(layout.measurement(n) for n in suite.settings.measurements)]


def preflight(suite: Suite) -> None:
    """Check every input file and option before any model work; report all problems at once."""
    s, want, problems = suite.settings, set(suite.settings.measurements), []
    checks = {
        "corpus_ce": (suite.corpus_path, "--corpus PATH or --data-dir"),
        "gsm8k": (suite.data_path("gsm8k", "test.jsonl"), "--data-dir (it must hold gsm8k/test.jsonl)"),
        "truthfulqa": (
            suite.data_path("truthfulqa", "TruthfulQA.csv"),
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


def measure(suite: Suite) -> dict[str, Any]:
    """Compute every selected measurement whose file is missing or out of date; write the summary."""
    preflight(suite)
    for name in suite.settings.measurements:
        m = REGISTRY[name]
        fp = fingerprint_of(suite, m)
        path = suite.layout.measurement(name)
        if path.is_file() and read_json(path).get("fingerprint") == fp:
            log.info("measure %s: up to date", name)
            continue
        log.info("measure %s: %s", name, m.description)
        t0 = time.perf_counter()
        result = m.compute(suite)
        write_json(
            path,
            {
                "measurement": name,
                "description": m.description,
                "fingerprint": fp,
                "inputs": m.inputs(suite),
                "seconds": round(time.perf_counter() - t0, 2),
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                **result,
            },
        )
    summary = summarize(suite.layout.measure_dir, suite.settings.measurements)
    write_json(suite.layout.measure_summary, summary)
    return summary


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


def load(layout: RunLayout) -> dict[str, Any]:
    return dict(read_json(layout.measure_summary))
