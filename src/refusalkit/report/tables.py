"""The report's tables and text sections, and the small HTML helpers every section uses.

Every piece of text that comes from a run (completions, instructions, settings, file contents) goes
through ``esc``; nothing from a model is ever inserted raw.
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any

from refusalkit.evaluation.refusal import as_rate
from refusalkit.formatting import ci_ends, is_number, num, signed
from refusalkit.report import LLM_CLASSES, RunData, llm_judge_rates, refusal_rate

if TYPE_CHECKING:
    from refusalkit.report.active_edit import EditNumbers

SETTINGS = ("baseline", "ablation", "actadd", "orthogonalized")
LABEL = {
    "baseline": "baseline",
    "ablation": "directional ablation",
    "actadd": "activation addition",
    "orthogonalized": "weight orthogonalization",
}
# The paper's Pile CE change under ablation and actadd (PAPER.md, the table at its end), for context.
PAPER_CE_DELTA = {"ablation": (-0.003, 0.015), "actadd": (0.12, 0.37)}


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def na(what: str = "n/a") -> str:
    return f'<span class="na">{esc(what)}</span>'


def f(v: Any, digits: int = 2) -> str:
    return num(v, digits, missing=na())


def ci(r: dict[str, Any] | None) -> str:
    """A rate record as the bold rate, its interval and k/n."""
    if not r or not is_number(r.get("rate")):
        return na()
    lo, hi = ci_ends(r)
    return (
        f'<b>{num(r["rate"])}</b> <span class="ci">[{num(lo)}, {num(hi)}] · '
        f"{esc(r.get('k', '?'))}/{esc(r.get('n', '?'))}</span>"
    )


def gap(what: str, why: str) -> str:
    return f'<div class="gap"><b>not measured:</b> {esc(what)} — {esc(why)}</div>'


def img(b64: str, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{b64}">'


def section(sid: str, title: str, lede: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{esc(title)}</h2><p class="lede">{lede}</p>{body}</section>'


# ---- sections ----------------------------------------------------------------------------------------


def edited_section(d: RunData, n: EditNumbers | None) -> str:
    """Which edit "the edited model" is (the run's active edit, or ``--edit``), and its own numbers."""
    lede = (
        "The edit chat, serve and export use unless told otherwise (the search's choice when the run has one, "
        "else the paper's direction; <code>--edit</code> on each command picks another), with its own numbers."
    )
    if n is None:
        return section(
            "edited", "The edited model", lede, gap("edited model", d.gaps.get("edited model", ""))
        )
    rows = "".join(
        f'<tr><td>{esc(r.label)}</td><td class="num">{esc(r.original)}</td><td class="num">{esc(r.edited)}</td></tr>'
        for r in n.rows
    )
    body = (
        f"<p><b>{esc(n.label)}</b> (<code>--edit {esc(n.choice)}</code>)</p>"
        '<table class="big"><thead><tr><th>measurement</th><th>original model</th><th>edited model</th></tr>'
        f'</thead><tbody>{rows}</tbody></table><p class="note">From {esc(n.source)}.</p>'
    )
    return section("edited", "The edited model", lede, body)


LLM_HEAD = "LLM judge: refusal · compliance · partial · degenerate"


def _llm_cell(d: RunData, prompt_set: str, setting: str) -> str:
    """The LLM judge's four class rates of one setting, beside the keyword rates ('' when not measured)."""
    if "llm_judge" not in d.measure:
        return ""
    rates = llm_judge_rates(d, prompt_set, setting) or {}
    text = " · ".join(f((rates.get(c) or {}).get("rate"), 2) for c in LLM_CLASSES) if rates else na("—")
    return f'<td class="num">{text}</td>'


def results_section(d: RunData, h: dict[str, Any]) -> str:
    safety = d.measure.get("safety")
    llm_head = f"<th>{esc(LLM_HEAD)}</th>" if "llm_judge" in d.measure else ""
    rows = []
    for st in SETTINGS:
        if all(x is None for x in (refusal_rate(d, "harmful", st), h["corpus_ce"].get(st), h["kl"].get(st))):
            continue
        s = (safety or {}).get("settings", {}).get(st)
        srate = ci(as_rate(s))
        if s and s.get("invalid"):
            srate += f' <span class="badge i">{s["invalid"]} invalid</span>'
        kl = na("—") if st == "baseline" else f(h["kl"].get(st), 3) + _kl_spread(h, st)
        rows.append(
            f"<tr><td>{esc(LABEL[st])}{' (c = −1)' if st == 'actadd' else ''}</td>"
            f'<td class="num">{ci(refusal_rate(d, "harmful", st))}</td>'
            f'<td class="num">{ci(refusal_rate(d, "harmful", st, "broad"))}</td>{_llm_cell(d, "harmful", st)}'
            f'<td class="num">{srate}</td>'
            f'<td class="num">{kl}</td><td class="num">{f(h["corpus_ce"].get(st), 3)}</td>'
            f'<td class="num">{f(h["completion_ce"].get(st), 3)}</td></tr>'
        )
    table = (
        '<table class="big"><thead><tr><th>setting</th><th>refusal (paper list)</th><th>refusal (broad list)</th>'
        f"{llm_head}<th>safety (judge)</th><th>KL harmless</th><th>corpus CE</th><th>own-completion CE</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    induced = (
        '<h3>Induced refusal on harmless prompts</h3><table class="big"><thead><tr><th>setting</th>'
        f"<th>refusal (paper list)</th><th>refusal (broad list)</th>{llm_head}</tr></thead><tbody>"
        + "".join(
            f'<tr><td>{esc(label)}</td><td class="num">{ci(refusal_rate(d, "harmless", st))}</td>'
            f'<td class="num">{ci(refusal_rate(d, "harmless", st, "broad"))}</td>{_llm_cell(d, "harmless", st)}</tr>'
            for st, label in (("baseline", "baseline"), ("actadd", "activation addition (c = +1)"))
        )
        + "</tbody></table>"
    )
    body = paper_row(h) + table + _ce_reading(h) + induced + capability_table(h, d)
    return section("results", "Results", _results_lede(d, h), body)


def _kl_spread(h: dict[str, Any], setting: str) -> str:
    """' median 0.01 · max 0.20' under the mean KL, when the run recorded them."""
    med, top = (h.get(k, {}).get(setting) for k in ("kl_median", "kl_max"))
    if not (is_number(med) or is_number(top)):
        return ""
    return f'<br><span class="ci">median {num(med, 3)} · max {num(top, 3)}</span>'


def capability_table(h: dict[str, Any], d: RunData) -> str:
    """GSM8K and TruthfulQA, original against edited, with the difference."""
    cap_rows = []
    g, t = d.measure.get("gsm8k") or {}, d.measure.get("truthfulqa") or {}
    glabel = "GSM8K exact match"
    if g:
        hits = ", ".join(
            f"{esc((g.get(side) or {}).get('hit_max_new_tokens', '?'))} {side}"
            for side in ("original", "edited")
        )
        glabel += (
            f' <span class="ci">n={esc(_get_n(g))}; answers cut by the {g.get("max_new_tokens")}-token'
            f" limit: {hits}</span>"
        )
    tn = f' <span class="ci">n={esc(_get_n(t))}</span>' if t else ""
    for key, label in (
        ("gsm8k", glabel),
        ("truthfulqa_mc1", "TruthfulQA MC1" + tn),
        ("truthfulqa_mc2", "TruthfulQA MC2" + tn),
    ):
        o, e = h[key]["original"], h[key]["edited"]
        delta = signed(e - o) if is_number(o) and is_number(e) else na()
        cap_rows.append(
            f'<tr><td>{label}</td><td class="num">{f(o, 3)}</td><td class="num">{f(e, 3)}</td><td class="num">{delta}</td></tr>'
        )
    edited = h.get("capability_edited_setting") or "orthogonalized"
    return (
        f'<h3>Capability, original vs {esc(edited)}</h3><table class="big"><thead><tr><th>benchmark</th><th>original</th>'
        f"<th>edited</th><th>Δ</th></tr></thead><tbody>{''.join(cap_rows)}</tbody></table>"
    )


def _get_n(m: dict[str, Any]) -> Any:
    return (m.get("original") or {}).get("n", "?")


def _results_lede(d: RunData, h: dict[str, Any]) -> str:
    sizes = h.get("sizes") or {}
    mnt = h.get("max_new_tokens")
    warn = (
        f' <span class="badge i">completions of only {mnt} new tokens: refusals that start late are missed</span>'
        if isinstance(mnt, int) and mnt < 100
        else ""
    )
    return (
        f"Harmful test prompts: {esc(sizes.get('harmful_test', '?'))}, harmless: {esc(sizes.get('harmless_test', '?'))}; "
        f"greedy completions of {esc(mnt)} new tokens.{warn} Rates show the 95% Wilson interval and k/n. "
        "KL is the first-token KL(unedited ‖ edited) on harmless prompts; CE in nats per token."
    )


def paper_row(h: dict[str, Any]) -> str:
    """One row in the layout of the paper's table (PAPER.md, end)."""

    def trio(xs: list[Any], digits: int = 2) -> str:
        return " / ".join(f(x, digits) for x in xs)

    label = f"{esc(h['model'])} ({esc(h['position'])}, {esc(h['layer'])}/{esc(h['n_layers'])})"
    r, s = h["refusal"], h["safety"]
    hr = h["harmless_refusal"]
    ce = h["corpus_ce"]
    return (
        "<table><thead><tr><th>model (position, layer / L)</th><th>refusal base / ablate / actadd−1 / ortho</th>"
        "<th>safety base / ablate / actadd−1 / ortho</th><th>harmless refusal base → actadd+1</th>"
        f"<th>corpus CE base / ablate / actadd</th></tr></thead><tbody><tr><td>{label}</td>"
        f'<td class="num">{trio([r[k] for k in SETTINGS])}</td><td class="num">{trio([s[k] for k in SETTINGS])}</td>'
        f'<td class="num">{f(hr["baseline"])} → {f(hr["actadd"])}</td>'
        f'<td class="num">{trio([ce[k] for k in SETTINGS[:3]], 3)}</td></tr></tbody></table>'
    )


def _ce_reading(h: dict[str, Any]) -> str:
    base = h["corpus_ce"].get("baseline")
    parts = []
    for st, (lo, hi) in PAPER_CE_DELTA.items():
        v = h["corpus_ce"].get(st)
        if base is not None and v is not None:
            parts.append(
                f"{LABEL[st]} changes corpus CE by <b>{signed(v - base)}</b> nats (paper: {signed(lo)} to {signed(hi)})"
            )
    return f'<p class="note">{"; ".join(parts)}.</p>' if parts else ""


def gaps_section(d: RunData) -> str:
    if not d.gaps:
        return ""
    items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in d.gaps.items())
    return f'<section class="gaps" id="gaps"><h2>Not measured</h2><ul>{items}</ul></section>'


def manifest_section(d: RunData) -> str:
    m = d.manifest
    if not m:
        return section(
            "manifest", "Settings and manifest", "", gap("manifest", d.gaps.get("manifest and settings", ""))
        )

    def kv(obj: dict[str, Any]) -> str:
        cells = [
            f"<tr><td>{esc(k)}</td><td>{na('—') if v is None else esc(json.dumps(v) if isinstance(v, dict | list) else v)}"
            "</td></tr>"
            for k, v in obj.items()
        ]
        half = (len(cells) + 1) // 2
        return (
            "<div class='two'>"
            + "".join(f"<table class='kv'>{''.join(c)}</table>" for c in (cells[:half], cells[half:]))
            + "</div>"
        )

    body = "<h3>Settings</h3>" + kv(m.get("settings", {}))
    for key in ("model", "versions", "hardware"):
        if m.get(key):
            body += f"<h3>{key.title()}</h3>" + kv(m[key])
    stages = {
        k: f"{v.get('seconds')} s, finished {v.get('finished_at')}" for k, v in m.get("stages", {}).items()
    }
    body += "<h3>Stages</h3>" + kv(stages)
    body += (
        "<details><summary>data splits (sizes and hashes)</summary>" + kv(m.get("data", {})) + "</details>"
    )
    return section("manifest", "Settings and manifest", "The run's manifest.json: what reproduces it.", body)
