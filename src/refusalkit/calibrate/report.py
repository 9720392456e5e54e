"""The report's section on calibration (``refusalkit calibrate``) and over-refusal.

``calibrate_section(layout)`` reads calibrate/*.json, measure/over_refusal.json and, when
bench/calibrate.py wrote them, calibrate/bench.json and calibrate/lambda_sweep.png; no model. Returns an
HTML fragment, or None when the run has none of them.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from refusalkit.evaluation.refusal import as_rate
from refusalkit.layout import RunLayout
from refusalkit.utils import read_json


def _rate(r: Any) -> str:
    x = as_rate(r)
    if not x or x.get("rate") is None:
        return "-"
    lo, hi = x["ci95"]
    return f"{x['rate']:.2f} ({x['k']}/{x['n']}, {lo:.2f}-{hi:.2f})"


def _num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else "-"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _vectors(folder: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(folder.glob("lam*.json")):
        try:
            out.append(dict(read_json(p)))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda d: float(d.get("meta", {}).get("lam", 0.0)))


def _sweep(vectors: list[dict[str, Any]], active: str | None) -> str:
    rows = []
    for d in vectors:
        meta, sc = d.get("meta", {}), d.get("scores", {})
        base, val = meta.get("base") or {}, meta.get("validation") or {}
        stem = f"lam{float(meta.get('lam', 0)):g}"
        judged = val.get("pseudo_harmful_val", {}).get("calibrated", {}).get("paper")
        judged_h = val.get("harmful_val", {}).get("calibrated", {}).get("paper")
        rows.append([
            f"{meta.get('lam')}" + (" <b>(active)</b>" if stem == active else ""),
            f"{d.get('layer')} / {d.get('position')}",
            f"{_num(sc.get('over_rate'), 2)} (unedited {_num(base.get('over_rate'), 2)})",
            f"{_num(sc.get('harmful_rate'), 2)} (unedited {_num(base.get('harmful_rate'), 2)})",
            _num(sc.get("kl"), 4),
            _rate(judged),
            _rate(judged_h),
        ])  # fmt: skip
    return _table(
        [
            "lambda",
            "layer / position",
            "pseudo-harmful val: refusal metric > 0",
            "harmful val: refusal metric > 0",
            "KL (harmless val)",
            "pseudo-harmful val refused (paper phrases)",
            "harmful val refused (paper phrases)",
        ],
        rows,
    )


def _over_refusal(m: dict[str, Any]) -> str:
    rows = []
    for name, by_setting in (m.get("rates") or {}).items():
        for setting, judges in by_setting.items():
            rows.append(
                [
                    html.escape(name),
                    html.escape(setting),
                    _rate(judges.get("paper")),
                    _rate(judges.get("broad")),
                ]
            )
    return _table(["prompt set", "setting", "refused (paper phrases)", "refused (broad list)"], rows)


def _bench(b: dict[str, Any]) -> str:
    head = [
        "edit",
        "harmful refused (JailbreakBench)",
        "over-refusal OR-Bench-Hard test",
        "over-refusal OKTest val",
        "harmless refused",
        "KL mean / median / max",
    ]
    rows = []
    for r in b.get("rows", []):
        kl = r.get("kl") or {}
        rows.append([
            html.escape(str(r.get("edit"))), _rate(r.get("harmful")), _rate(r.get("or_bench_hard_test")),
            _rate(r.get("oktest_val")), _rate(r.get("harmless")),
            f"{_num(kl.get('mean'), 4)} / {_num(kl.get('median'), 4)} / {_num(kl.get('max'))}",
        ])  # fmt: skip
    return _table(head, rows)


def _goal(front: dict[str, Any], active_trial: int | None) -> str:
    """The calibration search's feasible front (calibrate/search/front.json): proxy numbers, and the
    held-out verification (paper phrases) where a point has one; the unedited model's first."""
    sets = list((front.get("baseline") or {}).get("rates") or {})
    for p in front.get("points", []):
        sets += [k for k in ((p.get("verified") or {}).get("rates") or {}) if k not in sets]

    def held(v: dict[str, Any] | None) -> list[str]:
        rates = (v or {}).get("rates") or {}
        return [_rate((rates.get(k) or {}).get("paper")) for k in sets]

    base, floor = front.get("base") or {}, front.get("floor") or {}
    rows = [
        [
            "unedited",
            "-",
            "-",
            _num(base.get("over")),
            _num(base.get("harmful")),
            "0",
            *held(front.get("baseline")),
            "-",
        ]
    ]
    for p in front.get("points", []):
        e, pr, v = p.get("edit") or {}, p.get("proxy") or {}, p.get("verified") or {}
        mark = " <b>(active)</b>" if p.get("trial") == active_trial else ""
        rows.append([
            f"{p.get('trial')}{' *' if p.get('trial') == front.get('chosen') else ''}{mark}", _num(e.get("lam"), 2),
            f"{e.get('layer')} / {e.get('position')}", _num(pr.get("over")), _num(pr.get("harmful")),
            _num((pr.get("kl") or {}).get("mean"), 4), *held(v), _num((v.get("kl") or {}).get("mean"), 4),
        ])  # fmt: skip
    head = [
        "trial (* chosen)",
        "lambda",
        "layer / position",
        "over-refusal (proxy)",
        "harmful (proxy)",
        "KL (proxy)",
    ]
    head += [f"{html.escape(k)} refused (paper phrases)" for k in sets] + ["KL (held out)"]
    note = (
        f"<p>Feasible trials only: harmful refusal (proxy) at least {_num(floor.get('fraction'), 2)} x the "
        f"unedited model's = {_num(floor.get('harmful'))}; {len(front.get('trials', []))} trials in the study "
        "(<code>refusalkit optimize RUN_DIR --goal calibrate</code>).</p>"
    )
    return note + _table(head, rows)


def calibrate_section(layout: RunLayout) -> str | None:
    """The calibration's HTML fragment, or None when the run has no calibration and no over-refusal."""
    folder = layout.calibrate_dir
    vectors = _vectors(folder) if folder.is_dir() else []
    over = layout.measurement("over_refusal")
    over_m = read_json(over) if over.is_file() else {}
    bench = folder / "bench.json"
    goal = read_json(layout.calibrate_front) if layout.calibrate_front.is_file() else {}
    if not vectors and not over_m.get("measured") and not bench.is_file() and not goal:
        return None
    parts = [
        "<h2>Calibration and over-refusal</h2>",
        "<p>Over-refusal: refusals of prompts that look harmful but are not (OR-Bench-Hard, OKTest). "
        "The calibration (<code>refusalkit calibrate</code>, Wang et al., ICLR 2025) ablates a "
        "false-refusal vector orthogonalized against the refusal direction by lambda, chosen on the "
        "validation prompts under a KL limit with harmful refusal kept at a floor (docs/calibrate.md).</p>",
    ]
    if over_m.get("measured"):
        parts += [
            f"<h3>Over-refusal, held out (measure/over_refusal.json, {over_m.get('max_new_tokens')} new tokens)</h3>",
            _over_refusal(over_m),
        ]
    if vectors:
        active = read_json(layout.calibrated).get("stem") if layout.calibrated.is_file() else None
        parts += ["<h3>Calibrations (validation prompts)</h3>", _sweep(vectors, active)]
    if goal:
        cal = read_json(layout.calibrated) if layout.calibrated.is_file() else {}
        active_trial = cal.get("trial") if cal.get("source") == "search" else None
        parts += ["<h3>The calibration search (--goal calibrate)</h3>", _goal(goal, active_trial)]
    if bench.is_file():
        parts += ["<h3>Held-out comparison (bench/calibrate.py)</h3>", _bench(read_json(bench))]
        png = folder / "lambda_sweep.png"
        if png.is_file():
            b64 = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(
                f'<img alt="over-refusal and harmful refusal against lambda" src="data:image/png;base64,{b64}">'
            )
    return "".join(parts)


def over_refusal_cell(run_dir: Path) -> str:
    """`refusalkit compare`'s cell: over-refusal (paper phrases) unedited -> edited on each held-out set,
    from measure/over_refusal.json; "-" when not measured."""
    path = RunLayout(run_dir).measurement("over_refusal")
    m = read_json(path) if path.is_file() else {}
    if not m.get("measured"):
        return "-"
    edited, cells = m.get("edited_setting", "orthogonalized"), []
    for by_setting in (m.get("rates") or {}).values():
        b = as_rate((by_setting.get("baseline") or {}).get("paper"))
        e = as_rate((by_setting.get(edited) or {}).get("paper"))
        cells.append(f"{_num((b or {}).get('rate'), 2)}->{_num((e or {}).get('rate'), 2)}")
    return " / ".join(cells) or "-"
