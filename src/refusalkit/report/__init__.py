"""The run report: RUN_DIR/report.html (one self-contained file) and RUN_DIR/report.json (its numbers).

Built from the run's artifacts alone, never by loading a model. Every artifact is optional: a missing or
unreadable one becomes a marked gap ("not measured: ...") in the report, not an error.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.refusal import as_rate
from refusalkit.layout import RunLayout
from refusalkit.settings import MEASUREMENTS
from refusalkit.utils import atomic_path, read_json

MEASURE_FILES = MEASUREMENTS
# Opt-in measurements whose absence is no gap: a run that did not ask for them misses nothing.
OPT_IN = ("lm_eval", "llm_judge", "over_refusal")
LLM_CLASSES = ("refusal", "compliance", "partial", "degenerate")  # evaluation.verdicts.CLASSES, in order


@dataclass
class RunData:
    """Everything the report shows, read from one run folder. ``gaps`` names what could not be read."""

    run_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    direction: dict[str, Any] | None = None
    scores: dict[str, Any] | None = None
    candidates: dict[str, Any] | None = None  # norms [P][L], cosine [L][L], mean projections [L]
    rates: dict[str, Any] | None = None
    completions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    measure: dict[str, dict[str, Any]] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)
    suffix: dict[str, Any] | None = None
    suffix_pngs: list[Path] = field(default_factory=list)
    gaps: dict[str, str] = field(default_factory=dict)

    def gap(self, what: str, why: str) -> None:
        self.gaps[what] = why


def _read(data: RunData, path: Path, what: str, hint: str) -> Any:
    rel = path.relative_to(data.run_dir)
    if not path.is_file():
        data.gap(what, f"{rel} is missing ({hint})")
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        data.gap(what, f"{rel} could not be read ({exc})")
        return None


def _candidate_stats(path: Path, direction: dict[str, Any] | None, vector_path: Path) -> dict[str, Any]:
    """Norms, cosine between layers and mean projections from extract/candidates.safetensors."""
    from refusalkit.directions import Candidates

    cands = Candidates.load(path)
    dirs = cands.directions.double()  # [P, L, d]
    n_pos, n_layers = cands.n_positions, cands.n_layers
    pos = int(direction["position"]) if direction else -1
    layer = int(direction["layer"]) if direction else n_layers // 2
    p = pos + n_pos
    if not 0 <= p < n_pos:
        p = n_pos - 1
    unit_rows = dirs[p] / dirs[p].norm(dim=-1, keepdim=True).clamp(min=1e-12)  # [L, d]
    vec = dirs[p, layer]
    if vector_path.is_file():
        from safetensors.torch import load_file

        vec = load_file(str(vector_path))["direction"].double()
    u = vec / vec.norm().clamp(min=1e-12)
    return {
        "n_positions": n_pos,
        "n_layers": n_layers,
        "tokens": cands.post_instruction_tokens,
        "norms": dirs.norm(dim=-1).tolist(),  # [P][L]
        "cosine_position": p - n_pos,
        "cosine": (unit_rows @ unit_rows.T).tolist(),  # [L][L]
        "cosine_to_selected": (unit_rows @ u).tolist(),  # [L]
        "proj_harmful": (cands.harmful_mean[p].double() @ u).tolist(),  # [L]
        "proj_harmless": (cands.harmless_mean[p].double() @ u).tolist(),  # [L]
    }


def _categories(settings: dict[str, Any]) -> dict[str, str]:
    """instruction -> category for the harmful test set, when its source is a local file or built-in."""
    from refusalkit.data import load_instructions

    spec = settings.get("harmful_test") or settings.get("harmful_train")
    if not spec or str(spec).startswith("hf:"):
        return {}
    try:
        data = load_instructions(str(spec))
    except RefusalkitError:
        return {}
    return {t: c for t, c in zip(data.instructions, data.categories, strict=True) if c}


def collect(run_dir: str | Path) -> RunData:
    """Read every artifact of a run folder; what is missing is recorded in ``gaps``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RefusalkitError(
            f"run folder {run_dir} not found; give the folder a `refusalkit run --out` wrote"
        )
    data, layout = RunData(run_dir), RunLayout(run_dir)
    data.manifest = _read(data, layout.manifest, "manifest and settings", "the run never started") or {}
    direction_json = layout.direction.with_suffix(".json")
    data.direction = _read(data, direction_json, "selected direction", "run `refusalkit select`")
    data.scores = _read(data, layout.candidate_scores, "candidate scores", "run `refusalkit select`")
    if layout.candidates.is_file():
        try:
            data.candidates = _candidate_stats(
                layout.candidates, data.direction, layout.direction.with_suffix(".safetensors")
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            data.gap("candidate directions", f"extract/candidates.safetensors could not be read ({exc})")
    else:
        data.gap(
            "candidate directions", "extract/candidates.safetensors is missing (run `refusalkit extract`)"
        )
    data.rates = _read(data, layout.refusal_rates, "refusal rates", "run `refusalkit evaluate`")
    for path in sorted(layout.completions_dir.glob("*__*.json")):
        try:
            data.completions[path.stem] = list(read_json(path)["rows"])
        except (OSError, ValueError, KeyError) as exc:
            data.gap(f"completions {path.stem}", f"unreadable ({exc})")
    if not data.completions:
        data.gap("completions", "evaluate/completions/ is empty or missing (run `refusalkit evaluate`)")
    for name in MEASURE_FILES:
        path = layout.measurement(name)
        if not path.is_file():
            if name not in OPT_IN:
                data.gap(name, f"measure/{name}.json is missing (run `refusalkit measure`)")
            continue
        try:
            d = read_json(path)
        except (OSError, ValueError) as exc:
            data.gap(name, f"measure/{name}.json could not be read ({exc})")
            continue
        if d.get("measured", True):
            data.measure[name] = d
        else:
            data.gap(name, d.get("reason", "not measured"))
    data.categories = _categories(data.manifest.get("settings", {}))
    suffix_dir = layout.suffix_dir
    data.suffix_pngs = sorted(suffix_dir.glob("*.png")) if suffix_dir.is_dir() else []
    if (suffix_dir / "analysis.json").is_file():
        data.suffix = _read(data, suffix_dir / "analysis.json", "adversarial-suffix analysis", "")
    elif not data.suffix_pngs:
        data.gap("adversarial-suffix analysis", "suffix/analysis.json is missing (run `refusalkit suffix`)")
    return data


# ---- headline numbers --------------------------------------------------------------------------------


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def refusal_rate(data: RunData, prompt_set: str, setting: str, judge: str = "paper") -> dict[str, Any] | None:
    """The rate record ({rate, k, n, ci95}, see ``evaluation.refusal.rate``) from
    measure/refusal_judges.json, else (paper list only) from evaluate/refusal_rates.json, in whichever
    layout the run wrote it."""
    r = as_rate(_get(data.measure.get("refusal_judges"), "rates", prompt_set, setting, judge))
    if r is not None:
        return r
    return as_rate(_get(data.rates, prompt_set, setting)) if judge == "paper" else None


def llm_judge_rates(data: RunData, prompt_set: str, setting: str) -> dict[str, dict[str, Any]] | None:
    """The LLM judge's rate record per class (refusal, compliance, partial, degenerate) for one prompt
    set and setting, from measure/llm_judge.json; None where it was not measured."""
    found = _get(data.measure.get("llm_judge"), "rates", prompt_set, setting)
    if not isinstance(found, dict):
        return None
    rates = {c: as_rate(found.get(c)) for c in LLM_CLASSES}
    return {c: r for c, r in rates.items() if r is not None} or None


def headline(data: RunData) -> dict[str, Any]:
    """The results-table row of a run (None where not measured)."""
    m = data.measure
    settings = ("baseline", "ablation", "actadd", "orthogonalized")
    rate = lambda ps, st, j="paper": _get(refusal_rate(data, ps, st, j), "rate")  # noqa: E731
    cap = {}
    for name, keys in (("gsm8k", ("accuracy",)), ("truthfulqa", ("mc1", "mc2"))):
        for k in keys:
            label = name if k == "accuracy" else f"truthfulqa_{k}"
            cap[label] = {
                "original": _get(m.get(name), "original", k),
                "edited": _get(m.get(name), "edited", k),
            }
    return {
        "model": _get(data.manifest, "model", "name") or _get(data.manifest, "settings", "model"),
        "layer": _get(data.direction, "layer"),
        "position": _get(data.direction, "position"),
        "n_layers": _get(data.direction, "meta", "n_layers") or _get(data.manifest, "model", "n_layers"),
        "refusal": {st: rate("harmful", st) for st in settings},
        "refusal_broad": {st: rate("harmful", st, "broad") for st in settings},
        "safety": {st: _get(m.get("safety"), "settings", st, "safety_rate") for st in settings},
        # the run's own model as a four-class judge (opt-in): class -> rate, per harmful setting
        "llm_judge": {
            st: {c: r["rate"] for c, r in (llm_judge_rates(data, "harmful", st) or {}).items()} or None
            for st in settings
        },
        "harmless_refusal": {"baseline": rate("harmless", "baseline"), "actadd": rate("harmless", "actadd")},
        "kl": {st: _get(m.get("coherence"), "kl", st, "mean") for st in settings[1:]},
        # median and max over prompts: newer coherence.json files only (None otherwise)
        "kl_median": {st: _get(m.get("coherence"), "kl", st, "median") for st in settings[1:]},
        "kl_max": {st: _get(m.get("coherence"), "kl", st, "max") for st in settings[1:]},
        "selection_kl": _get(data.direction, "scores", "kl"),
        "corpus_ce": {st: _get(m.get("corpus_ce"), "ce", st) for st in settings},
        "completion_ce": {st: _get(m.get("coherence"), "completion_ce", st, "ce") for st in settings},
        "capability_edited_setting": _get(m.get("gsm8k"), "edited_setting")
        or _get(m.get("truthfulqa"), "edited_setting"),
        **cap,
        "sizes": {k: v.get("n") for k, v in data.manifest.get("data", {}).items()},
        "max_new_tokens": _get(data.rates, "max_new_tokens"),
    }


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (report.json is strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return clean(obj.tolist())
    return obj


@dataclass
class Built:
    html: Path
    json: Path
    gaps: dict[str, str]


def build_report(
    run_dir: str | Path, *, show_harmful: bool = False, examples: int = 6, edit: str | None = None
) -> Built:
    """Write RUN_DIR/report.html and RUN_DIR/report.json from the run's artifacts. ``edit`` (an
    ``--edit`` value; default the run's active edit) is the edit the report states as "the edited
    model", with its own numbers."""
    from refusalkit.report.html import render

    data = collect(run_dir)
    html_text, numbers = render(
        data, show_harmful=show_harmful, examples=examples, edited=_edited(data, edit)
    )
    out = Built(data.run_dir / "report.html", data.run_dir / "report.json", data.gaps)
    with atomic_path(out.html) as tmp:
        tmp.write_text(html_text, encoding="utf-8")
    numbers = {
        "run_dir": str(data.run_dir),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **numbers,
    }
    with atomic_path(out.json) as tmp:
        tmp.write_text(json.dumps(clean(numbers), indent=2, allow_nan=False) + "\n")
    return out


def _edited(data: RunData, edit: str | None) -> Any:
    """The numbers of the edit ``edit`` names (``report.active_edit.EditNumbers``). A run without the
    default active edit's artifacts (no direction yet) gets a gap; an edit named explicitly must exist."""
    from refusalkit.report.active_edit import edit_numbers
    from refusalkit.run import RunFolder

    run = RunFolder(data.run_dir)
    try:
        active = run.active_edit(edit)
    except RefusalkitError as exc:
        if edit is not None:
            raise
        data.gap("edited model", str(exc))
        return None
    return edit_numbers(run, active, data)


def cmd_report(args: argparse.Namespace) -> int:
    built = build_report(
        args.run_dir, show_harmful=args.show_harmful, examples=args.examples, edit=getattr(args, "edit", None)
    )
    print(f"report: {built.html}\nnumbers: {built.json}")
    if built.gaps:
        print(f"marked as not measured: {', '.join(built.gaps)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from refusalkit.report.compare import compare_runs

    text = compare_runs(args.run_dirs, out=args.out)
    print(text)
    if args.out:
        print(f"\nwritten: {args.out}")
    return 0


__all__ = ["Built", "RunData", "build_report", "clean", "collect", "headline"]
