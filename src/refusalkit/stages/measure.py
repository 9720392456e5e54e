"""The measure stage: every selected measurement of evaluation/suite.py into measure/NAME.json.

Each file records the fingerprint of its measurement's inputs; a measurement whose file holds the same
fingerprint is skipped, so an interrupted stage resumes where it stopped. measure/summary.json says
which measurements exist (and their cost) and why the others are absent.

The data files are checked before the run's first stage (``check``, called by the pipeline): a
measurement the user asked for (--measurements, a TOML file, the environment or a preset) whose data is
missing stops the run then, in seconds; one that is only in the defaults is skipped instead, with a
warning that says how to add its data, and recorded as not measured (its file says why; it is computed
once the data is there, since the file's sha256 is part of its fingerprint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from refusalkit.calibrate import data as over_refusal_data
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.suite import REGISTRY, VERSION, Measurement
from refusalkit.evaluation.suite_inputs import Suite, SuiteFiles
from refusalkit.layout import RunLayout
from refusalkit.manifest import fingerprint
from refusalkit.memory import release
from refusalkit.settings import MEASUREMENTS, Settings
from refusalkit.utils import read_json, write_json

log = logging.getLogger(__name__)
# The broad harmless set that tops up the KL prompts: Alpaca instructions (the paper's harmless test split).
KL_POOL = ("refusal_direction", "splits", "harmless_test.json")


@dataclass(frozen=True)
class Plan:
    """What the measure stage will do: the measurements to compute, those skipped for missing data (and
    why), and the problems that stop the run."""

    compute: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings that change no measurement's presence


def suite_files(layout: RunLayout, s: Settings) -> SuiteFiles:
    """Where the measurements read: the run's evaluate outputs and the data folder's files."""
    data = Path(s.data_dir)
    pool = data.joinpath(*KL_POOL)
    return SuiteFiles(
        completions_dir=layout.completions_dir,
        refusal_rates=layout.refusal_rates,
        corpus=Path(s.corpus) if s.corpus else data / "corpus" / "wikitext2_tokenized_test.txt",
        gsm8k=data / "gsm8k" / "test.jsonl",
        truthfulqa=data / "truthfulqa" / "TruthfulQA.csv",
        kl_pool=str(pool) if pool.is_file() else (s.harmless_test or s.harmless_train),
        data_dir=data,
    )


def plan(s: Settings, files: SuiteFiles, *, requested: Collection[str]) -> Plan:
    """Check the selected measurements' inputs. ``requested``: the measurements the user asked for by
    name (missing data is then an error); the others come from the defaults (missing data skips them)."""
    data = Path(s.data_dir)
    needs = {
        "corpus_ce": (
            files.corpus,
            "--corpus PATH, or --data-dir DIR holding corpus/wikitext2_tokenized_test.txt",
        ),
        "gsm8k": (files.gsm8k, "--data-dir DIR holding gsm8k/test.jsonl"),
        "truthfulqa": (files.truthfulqa, "--data-dir DIR holding truthfulqa/TruthfulQA.csv"),
        "over_refusal": (
            over_refusal_data.path(data, over_refusal_data.TEST_SETS[0]),
            "--data-dir DIR holding over_refusal/or_bench_hard_test.json and oktest_val.json",
        ),
    }
    out = Plan(compute=[])
    for name in s.measurements:
        path, fix = needs.get(name, (None, ""))
        if path is not None and not path.is_file():
            why = f"{path} not found; set {fix} (or REFUSALKIT_DATA)"
            if name in requested:
                out.problems.append(f"{name}: {why}, or drop {name} from --measurements")
            else:
                out.skipped[name] = f"data missing: {why}"
            continue
        if name == "lm_eval" and not s.lm_eval_tasks:
            out.problems.append("lm_eval: no tasks; set --lm-eval-tasks (e.g. arc_easy,winogrande)")
            continue
        out.compute.append(name)
    if "coherence" in out.compute and not data.joinpath(*KL_POOL).is_file() and s.kl_n > s.n_test:
        out.notes.append(
            f"coherence: the first-token KL prompts are topped up from {files.kl_pool}, not the paper's "
            f"Alpaca pool {data.joinpath(*KL_POOL)} (not found; set --data-dir DIR holding it)"
        )
    return out


def fingerprint_of(suite: Suite, m: Measurement) -> str:
    return fingerprint({"v": VERSION, "name": m.name, **m.inputs(suite)})


def inputs(suite: Suite, the_plan: Plan) -> dict[str, Any]:
    """The stage's inputs: the fingerprint of every selected measurement, and which are skipped."""
    fps = {name: fingerprint_of(suite, REGISTRY[name]) for name in suite.settings.measurements}
    return {**fps, "skipped": sorted(the_plan.skipped)} if the_plan.skipped else fps


def artifacts(layout: RunLayout, s: Settings) -> list[Path]:
    """The files the selected measurements write (the stage is done only if all exist)."""
    return [layout.measure_summary, *(layout.measurement(n) for n in s.measurements)]


def measure(suite: Suite, layout: RunLayout, the_plan: Plan) -> dict[str, Any]:
    """Compute every planned measurement whose file is missing or out of date, record the skipped ones
    as not measured (with how to add their data); write the summary."""
    if the_plan.problems:
        raise RefusalkitError("the measure stage cannot start:\n  " + "\n  ".join(the_plan.problems))
    for name in suite.settings.measurements:
        m = REGISTRY[name]
        fp = fingerprint_of(suite, m)
        path = layout.measurement(name)
        if path.is_file() and read_json(path).get("fingerprint") == fp:
            log.info("measure %s: up to date", name)
            continue
        if name in the_plan.skipped:
            if path.is_file() and read_json(path).get("measured", True):
                # measured earlier, with data that is absent now (another machine): keep it, say so
                log.warning("measure %s: kept the earlier result (%s)", name, the_plan.skipped[name])
                continue
            reason = the_plan.skipped[name]
            write_json(path, {"measurement": name, "measured": False, "reason": reason, "fingerprint": fp})
            continue
        log.info("measure %s: %s", name, m.description)
        t0 = time.perf_counter()
        result = m.compute(suite)
        release()  # each measurement starts without the last one's free heap resident (memory.py)
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
    summary = summarize(layout.measure_dir, suite.settings.measurements)
    write_json(layout.measure_summary, summary)
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
