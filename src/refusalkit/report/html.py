"""Rendering the report: one self-contained HTML page (inline CSS, figures as base64 PNG).

Every piece of text that comes from a run (completions, instructions, settings, file contents) goes
through ``esc``; nothing from a model is ever inserted raw.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from typing import Any

from refusalkit.layout import RunLayout
from refusalkit.report import RunData, headline, refusal_rate
from refusalkit.report import plots as P
from refusalkit.report.active_edit import EditNumbers
from refusalkit.report.tables import (
    SETTINGS,
    edited_section,
    esc,
    f,
    gap,
    gaps_section,
    img,
    manifest_section,
    results_section,
    section,
)

log = logging.getLogger(__name__)

HARMFUL_CHARS, HARMLESS_CHARS = 160, 700  # completion text shown per cell (harmful: unless --show-harmful)

CSS = """
:root{--ink:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--accent:#0f766e;--warn:#b45309}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 24px 64px}
header{background:linear-gradient(120deg,#0f172a,#134e4a);color:#f8fafc;padding:28px 0 22px}
header .in{max-width:1180px;margin:0 auto;padding:0 24px}header h1{margin:0 0 4px;font-size:26px;font-weight:650}
header p{margin:2px 0;color:#cbd5e1;font-size:14px}header code{color:#e2e8f0}
nav{display:flex;flex-wrap:wrap;gap:6px 14px;margin-top:14px;font-size:13px}nav a{color:#99f6e4;text-decoration:none}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:20px 22px;margin:18px 0;
box-shadow:0 1px 2px rgba(0,0,0,.04)}
h2{font-size:19px;margin:0 0 4px}h3{font-size:15px;margin:18px 0 6px}.lede{color:var(--muted);margin:0 0 12px;font-size:14px}
table{border-collapse:collapse;width:100%;font-size:14px;margin:6px 0 4px}
th,td{padding:6px 9px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}thead th{font-size:12px;text-transform:uppercase;letter-spacing:.03em;
color:var(--muted);font-weight:600;border-bottom:2px solid var(--line)}
td.num{font-variant-numeric:tabular-nums}.ci{color:var(--muted);font-size:12px;white-space:nowrap}
.big td{font-size:15px}.big td.num b{font-size:17px}
.na{color:#9ca3af;font-style:italic;font-size:13px}.gaps{border-left:4px solid var(--warn);background:#fffbeb}
.gaps li{margin:2px 0}.gap{border:1px dashed #d1d5db;border-radius:8px;padding:10px 12px;color:var(--muted);
background:#f9fafb;font-size:14px;margin:8px 0}.gap b{color:var(--warn)}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(210px,1fr));gap:10px;margin:10px 0}
.stat{border:1px solid var(--line);border-radius:10px;padding:10px 12px}.stat .v{font-size:22px;font-weight:650}
.stat .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.03em}
.comp td{text-align:left;font-size:13px;width:24%}.comp td:first-child{width:10%;color:var(--muted)}
.comp pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,monospace;
max-height:220px;overflow:auto}
.badge{display:inline-block;font-size:11px;padding:1px 7px;border-radius:99px;margin:0 4px 4px 0;background:#f1f5f9;color:#334155}
.badge.r{background:#fee2e2;color:#991b1b}.badge.c{background:#dcfce7;color:#166534}.badge.i{background:#fef3c7;color:#92400e}
details{margin:8px 0}summary{cursor:pointer;color:var(--accent);font-size:14px}
.kv td{text-align:left;font-size:13px;word-break:break-word}.kv td:first-child{color:var(--muted);width:38%}
.two{display:grid;grid-template-columns:1fr 1fr;gap:0 22px}.comp th{text-align:left}
.note{font-size:13px;color:var(--muted)}footer{color:var(--muted);font-size:12px;text-align:center}
"""


def _figure(fn: Any, *args: Any, alt: str, **kwargs: Any) -> str:
    """The figure ``fn`` draws, or a marked gap naming it when it cannot be drawn.

    A figure that fails (odd numbers in an artifact, a matplotlib quirk) is logged as a warning that
    names it; the rest of the report is still written.
    """
    if not P.available():
        return gap(alt, "matplotlib is not installed (pip install 'refusalkit[report]')")
    try:
        return img(fn(*args, **kwargs), alt)
    except Exception as exc:  # a figure is never worth losing the report over
        log.warning("report figure %r was not drawn: %s: %s", alt, type(exc).__name__, exc)
        P.close_all()
        return gap(alt, f"the figure could not be drawn ({type(exc).__name__}: {exc})")


# ---- sections ----------------------------------------------------------------------------------------


def selection_section(d: RunData) -> str:
    lede = (
        "Every candidate (position × layer) scored on the validation prompts. Hatched cells were discarded by the "
        "selection rules (grey: not scored), the dashed line is the layer rule's cutoff, the red box is the selected "
        "direction."
    )
    if not d.scores:
        return section(
            "selection",
            "Direction selection",
            lede,
            gap("candidate scores", d.gaps.get("candidate scores", "")),
        )
    meta = (d.direction or {}).get("meta", {})
    scores = d.scores.get("scores", [])
    n_layers = meta.get("n_layers") or (max(s["layer"] for s in scores) + 1 if scores else 0)
    n_pos = meta.get("n_positions") or (-min(s["position"] for s in scores) if scores else 0)
    sel = (int(d.direction["position"]), int(d.direction["layer"])) if d.direction else None
    tokens = meta.get("post_instruction_tokens") or (d.candidates or {}).get("tokens")
    rules = d.scores.get("rules", {})
    frac = rules.get("max_layer_frac")
    cutoff = int(frac * n_layers) if isinstance(frac, int | float) else None
    body = _figure(
        P.score_heatmaps, scores, n_layers, n_pos, sel, tokens, cutoff, alt="candidate score heat maps"
    )
    kept = sum(bool(s.get("kept")) for s in scores)
    pruned = sum(str(s.get("reason", "")).startswith("pruned") for s in scores)
    body += f'<p class="note">Rules: {esc(json.dumps(rules))}. Kept {kept} of {len(scores)} candidates.'
    if pruned:
        body += (
            f" {pruned} were pruned: their bypass score was not below the pick's, so induce and KL were not"
            " computed (same pick as scoring all; --exhaustive-selection scores everything)."
        )
    if d.direction:
        sc = d.direction.get("scores", {})
        body += (
            f" Selected: layer {esc(d.direction['layer'])}, position {esc(d.direction['position'])}; bypass "
            f"{f(sc.get('bypass'))}, induce {f(sc.get('induce'))}, KL {f(sc.get('kl'), 3)}, |r| {f(d.direction.get('norm'))}."
        )
    return section("selection", "Direction selection", lede, body + "</p>")


def candidates_section(d: RunData) -> str:
    lede = "From extract/candidates.safetensors: how large each difference-in-means is, and how aligned layers are."
    c = d.candidates
    if not c:
        return section(
            "candidates",
            "Candidate directions",
            lede,
            gap("candidate directions", d.gaps.get("candidate directions", "")),
        )
    sel = (int(d.direction["position"]), int(d.direction["layer"])) if d.direction else None
    body = _figure(
        P.norms_and_cosine, c["norms"], c["cosine"], c["cosine_position"], sel, alt="norms and cosine"
    )
    return section("candidates", "Candidate directions", lede, body)


def rates_section(d: RunData) -> str:
    lede = "Share of completions judged refusals (or safe), per setting, with 95% Wilson intervals."
    groups: list[tuple[str, list[tuple[str, float | None, list[float | None]]]]] = []
    for judge in ("paper", "broad"):
        bars = []
        for ps, sts in (("harmful", SETTINGS), ("harmless", ("baseline", "actadd"))):
            for st in sts:
                r = refusal_rate(d, ps, st, judge)
                if r is not None:
                    bars.append((f"{st} · {ps}", r["rate"], list(r["ci95"])))
        if bars:
            groups.append((f"refusal rate ({judge} list)", bars))
    safety = d.measure.get("safety")
    if safety:
        groups.append(
            (
                "safety rate (judge)",
                [
                    (f"{st} · harmful", v["safety_rate"], list(v["ci95"]))
                    for st, v in safety["settings"].items()
                ],
            )
        )
    body = (
        _figure(P.rate_bars, groups, alt="refusal and safety rates")
        if groups
        else gap("refusal rates", d.gaps.get("refusal rates", ""))
    )
    if safety:
        ids = ", ".join(safety.get("judge", {}).get("ids", []))
        body += f'<p class="note">Safety judge: <code>{esc(ids)}</code>; {esc(safety["judge"].get("short_reply_rule"))}. Invalid judge answers are excluded from the rate and counted apart.</p>'
    else:
        body += gap("safety", d.gaps.get("safety", "no safety judge run"))
    return section("rates", "Refusal and safety rates", lede, body)


def projections_section(d: RunData) -> str:
    lede = "Projection x · r̂ of resid_pre at the direction's position, on the selected unit direction, across layers."
    c = d.candidates
    if not c:
        return section(
            "projections", "Projections on the direction", lede, gap("projections", "candidate means missing")
        )
    per = d.measure.get("projections")
    per_prompt = {k: per[k] for k in ("harmful", "harmless")} if per else None
    layer = int(d.direction["layer"]) if d.direction else None
    body = _figure(P.projections, c["proj_harmful"], c["proj_harmless"], layer, per_prompt, alt="projections")
    if not per:
        body += gap("per-prompt projections", d.gaps.get("projections", "measure/projections.json missing"))
    return section("projections", "Projections on the direction", lede, body)


def _verdicts(d: RunData, key: str, i: int) -> str:
    out = []
    v = d.measure.get("refusal_judges", {}).get("rows", {}).get(key) or [None] * (i + 1)
    v = v[i] if i < len(v) else None
    if v:
        for judge in ("paper", "broad"):
            out.append(
                f'<span class="badge {"r" if v[judge] else "c"}">{judge}: {"refusal" if v[judge] else "no refusal"}</span>'
            )
    st = key.split("__", 1)[1]
    s = _get_row(d.measure.get("safety"), st, i) if key.startswith("harmful") else None
    if s:
        cls = {"safe": "c", "unsafe": "r"}.get(s["verdict"], "i")
        out.append(f'<span class="badge {cls}">judge: {esc(s["verdict"])}</span>')
    return "".join(out)


def _get_row(safety: dict[str, Any] | None, setting: str, i: int) -> dict[str, Any] | None:
    rows = (safety or {}).get("settings", {}).get(setting, {}).get("rows", [])
    return rows[i] if i < len(rows) else None


def completions_section(d: RunData, show_harmful: bool, examples: int) -> str:
    note = (
        "Harmful instructions are shown"
        if show_harmful
        else f"Harmful instructions are hidden (index and category only) and harmful completions cut to {HARMFUL_CHARS} "
        "characters; rebuild with <code>refusalkit report RUN_DIR --show-harmful</code> to see them"
    )
    body = ""
    for ps in ("harmful", "harmless"):
        keys = [f"{ps}__{st}" for st in SETTINGS if f"{ps}__{st}" in d.completions]
        if not keys:
            body += gap(f"{ps} completions", "evaluate/completions missing")
            continue
        n = min(examples, min(len(d.completions[k]) for k in keys))
        head = "".join(f"<th>{esc(k.split('__')[1])}</th>" for k in keys)
        rows = []
        for i in range(n):
            instr = d.completions[keys[0]][i]["instruction"]
            if ps == "harmful" and not show_harmful:
                label = f"#{i}<br>{esc(d.categories.get(instr, 'category unknown'))}"
            else:
                label = f"#{i}<br>{esc(instr)}"
            limit = None if show_harmful or ps == "harmless" else HARMFUL_CHARS
            cells = []
            for k in keys:
                text = d.completions[k][i]["completion"]
                cut = text if limit is None or len(text) <= limit else text[:limit] + " […]"
                if ps == "harmless" and len(cut) > HARMLESS_CHARS:
                    cut = cut[:HARMLESS_CHARS] + " […]"
                cells.append(f"<td>{_verdicts(d, k, i)}<pre>{esc(cut)}</pre></td>")
            rows.append(f"<tr><td>{label}</td>{''.join(cells)}</tr>")
        body += (
            f"<h3>{ps} prompts (first {n})</h3><table class='comp'><thead><tr><th>prompt</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    return section(
        "completions", "Completions side by side", note + ". Every model output is HTML-escaped.", body
    )


def suffix_section(d: RunData) -> str:
    lede = "From suffix/analysis.json and suffix/*.png (the adversarial-suffix analysis, PAPER.md section 7)."
    if d.suffix is None and not d.suffix_pngs:
        return section(
            "suffix",
            "Adversarial suffix analysis",
            lede,
            gap("adversarial-suffix analysis", d.gaps.get("adversarial-suffix analysis", "")),
        )
    body = ""
    if isinstance(d.suffix, dict):
        scalars = {k: v for k, v in d.suffix.items() if isinstance(v, str | int | float | bool) or v is None}
        body += (
            "<table class='kv'>"
            + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in scalars.items())
            + "</table>"
        )
        rest = {k: v for k, v in d.suffix.items() if k not in scalars}
        if rest:
            body += f"<details><summary>full analysis.json</summary><pre>{esc(json.dumps(rest, indent=1)[:20000])}</pre></details>"
    for png in d.suffix_pngs:
        body += f"<h3>{esc(png.name)}</h3>" + img(
            base64.b64encode(png.read_bytes()).decode("ascii"), png.name
        )
    return section("suffix", "Adversarial suffix analysis", lede, body)


def search_section(d: RunData) -> str:
    """The edit search (`refusalkit optimize`): Pareto plot, verified front, chosen kernels; "" if none."""
    try:
        from refusalkit.search.report import search_section as fragment
    except ImportError as exc:  # optuna (the `search` extra) is only needed to run a search
        log.warning("edit search section skipped (%s)", exc)
        return ""
    frag = fragment(RunLayout(d.run_dir))
    return f'<section id="search">{frag}</section>' if frag else ""


def calibrate_section(d: RunData) -> str:
    """Calibration (`refusalkit calibrate`) and over-refusal; "" if the run has neither."""
    from refusalkit.calibrate.report import calibrate_section as fragment

    frag = fragment(RunLayout(d.run_dir))
    return f'<section id="calibrate">{frag}</section>' if frag else ""


def render(
    d: RunData, *, show_harmful: bool = False, examples: int = 6, edited: EditNumbers | None = None
) -> tuple[str, dict[str, Any]]:
    """The page and the numbers it shows (for report.json); ``edited``: the numbers of the edit the
    report calls the edited model (``report.active_edit``)."""
    h = headline(d)
    calibration = calibrate_section(d)
    sections = [
        edited_section(d, edited),
        results_section(d, h),
        gaps_section(d),
        selection_section(d),
        candidates_section(d),
        rates_section(d),
        projections_section(d),
        completions_section(d, show_harmful, examples),
        suffix_section(d),
        search_section(d),
        calibration,
        manifest_section(d),
    ]
    nav = "".join(
        f'<a href="#{sid}">{t}</a>'
        for sid, t in (
            ("edited", "Edited model"),
            ("results", "Results"),
            ("gaps", "Not measured"),
            ("selection", "Selection"),
            ("candidates", "Candidates"),
            ("rates", "Rates"),
            ("projections", "Projections"),
            ("completions", "Completions"),
            ("suffix", "Suffix"),
            ("search", "Edit search"),
            ("calibrate", "Calibration"),
            ("manifest", "Manifest"),
        )
        if (sid != "gaps" or d.gaps)
        and (sid != "search" or RunLayout(d.run_dir).front.is_file())
        and (sid != "calibrate" or calibration)
    )
    title = f"refusalkit report — {h['model'] or d.run_dir.name}"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><header><div class='in'><h1>{esc(title)}</h1>"
        f"<p>Edited model: {esc(edited.label if edited else 'none yet')} · refusal direction at layer "
        f"{esc(h['layer'])}, position {esc(h['position'])} · run <code>{esc(d.run_dir)}</code>"
        f" · built {when} from artifacts only</p><nav>{nav}</nav></div></header><main>{''.join(sections)}"
        "<footer>refusalkit · Arditi et al. 2024, “Refusal in language models is mediated by a single direction”</footer>"
        "</main></body></html>"
    )
    numbers = {
        "edited": {k: v for k, v in vars(edited).items() if k != "rows"}
        | {"rows": [vars(r) for r in edited.rows]}
        if edited
        else None,
        "headline": h,
        "gaps": d.gaps,
        "direction": d.direction,
        "refusal_rates": d.measure.get("refusal_judges", {}).get("rates") or d.rates,
        "safety": {
            k: {x: y for x, y in v.items() if x != "rows"}
            for k, v in (d.measure.get("safety") or {}).get("settings", {}).items()
        },
        "coherence": {k: d.measure[k] for k in ("coherence", "corpus_ce") if k in d.measure},
        "capability": {
            k: _strip_rows(d.measure[k]) for k in ("gsm8k", "truthfulqa", "lm_eval") if k in d.measure
        },
        "candidates": d.candidates,
        "projections": d.measure.get("projections"),
        "suffix": d.suffix,
        "settings": d.manifest.get("settings"),
        "stages": d.manifest.get("stages"),
    }
    return page, numbers


def _strip_rows(m: dict[str, Any]) -> dict[str, Any]:
    out = dict(m)
    for side in ("original", "edited"):
        if isinstance(out.get(side), dict):
            out[side] = {k: v for k, v in out[side].items() if k != "rows"}
    return out
