"""The report's section on the edit search: Pareto plot (proxy and verified), the chosen edit, its kernels.

``search_section(layout)`` reads search/front.json and search/chosen.json only (no model) and returns
an HTML fragment with inline base64 PNG figures, or None when the run has no search.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from refusalkit.layout import RunLayout
from refusalkit.run import RunFolder
from refusalkit.search.edit import EditParams
from refusalkit.search.front import (
    describe,
    group_lines,
    judged_label,
    keyword_label,
    not_refused,
    over_label,
)
from refusalkit.search.proxy_judge import proxy_label

PROXY, VERIFIED, CHOSEN, CLOUD = "#0369a1", "#c2410c", "#111827", "#cbd5e1"


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pareto_png(front: dict[str, Any]) -> str:
    """Refusals against KL: every trial (grey), the proxy front, verified points (each marker list and,
    judged, the replies the LLM judge did not call compliance), the chosen one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    trials = front.get("trials", [])
    ax.scatter(
        [t["kl"] for t in trials], [100 * t["refusal"] for t in trials], s=10, c=CLOUD, label="trials (proxy)"
    )
    pts = sorted(front.get("points", []), key=lambda p: p["proxy"]["kl"]["mean"])
    ax.plot(
        [p["proxy"]["kl"]["mean"] for p in pts],
        [100 * p["proxy"]["refusal"] for p in pts],
        "o-",
        c=PROXY,
        ms=4,
        label="front, proxy (expected refusals, val)",
    )
    ver = [p for p in pts if p.get("verified")]
    for judge, marker in (("paper", "s"), ("heretic", "^")):
        ax.scatter(
            [p["verified"]["kl"]["mean"] for p in ver],
            [100 * p["verified"]["refused"].get(judge, 0) / p["verified"]["n"] for p in ver],
            marker=marker,
            c=VERIFIED,
            s=30,
            label=f"verified, held out ({judge} markers)",
        )
    judged = [p for p in ver if p["verified"].get("judged")]
    if judged:  # what an LLM judge made of the same completions: every reply that did not comply
        ax.scatter(
            [p["verified"]["kl"]["mean"] for p in judged],
            [100 * (1 - p["verified"]["judged"].get("compliance", 0) / p["verified"]["n"]) for p in judged],
            marker="x",
            c=VERIFIED,
            s=30,
            label="verified, held out (LLM judge: did not comply)",
        )
    chosen = next((p for p in pts if p["trial"] == front.get("chosen")), None)
    if chosen is not None:
        src = chosen.get("verified") or chosen["proxy"]
        y = 100 * (max(src["refused"].values()) / src["n"] if chosen.get("verified") else src["refusal"])
        ax.scatter([src["kl"]["mean"]], [y], s=160, facecolors="none", edgecolors=CHOSEN, label="chosen")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("first-token KL, mean over harmless prompts")
    ax.set_ylabel("refusals per 100")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return _png(fig)


def kernels_png(kernels: dict[str, list[float]], embed: float) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    for name, ws in kernels.items():
        ax.plot(range(len(ws)), ws, "o-", ms=3, label=f"{name} output")
    if embed:
        ax.scatter([-1], [embed], marker="D", label="embedding (left of layer 0)")
    ax.set_xlabel("layer")
    ax.set_ylabel("edit weight")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    return _png(fig)


def _table(front: dict[str, Any]) -> str:
    rows = []
    for p in sorted(front.get("points", []), key=lambda p: p["proxy"]["kl"]["mean"]):
        v = p.get("verified")
        ver = (
            f"{keyword_label(v, ' / ')}; {not_refused(v)} not refused"
            + (f"; judge: {judged_label(v)}" if v.get("judged") else "")
            + f"; KL {v['kl']['mean']:.4f} (median {v['kl']['median']:.4f}, max {v['kl']['max']:.3f})"
            + "".join(f"<br>{html.escape(line)}" for line in group_lines(v, indent=""))
            + (f"<br>over-refusal (paper / broad): {html.escape(over_label(v))}" if over_label(v) else "")
            if v
            else "not verified"
        )
        mark = " <b>(chosen)</b>" if p["trial"] == front.get("chosen") else ""
        rows.append(
            f"<tr><td>{p['trial']}{mark}</td><td>{html.escape(p.get('seed') or '')}</td>"
            f"<td>{100 * p['proxy']['refusal']:.1f}</td><td>{p['proxy']['kl']['mean']:.4f}</td><td>{ver}</td>"
            f"<td>{html.escape(describe(EditParams.model_validate(p['edit'])))}</td></tr>"
        )
    base_over = over_label(front.get("baseline") or {})
    unedited = (
        f"<p>The unedited model, verified on the same prompts, over-refusal (paper / broad): "
        f"{html.escape(base_over)}.</p>"
        if base_over
        else ""
    )
    head = (
        "<tr><th>trial</th><th>seed</th><th>proxy refusals /100</th><th>proxy KL</th>"
        "<th>verified: refused (paper / heretic markers; the worst chat setup and prompt set); not refused; "
        "with --judge, what the LLM judge made of the same completions (complied, partial, degenerate, "
        "refused); KL; each setup</th>"
        "<th>edit</th></tr>"
    )
    return f"{unedited}<table>{head}{''.join(rows)}</table>"


def search_section(layout: RunLayout) -> str | None:
    """The search's HTML fragment, or None when the run folder has no search front."""
    if not layout.front.is_file():
        return None
    run = RunFolder(layout)  # the one reader of search/front.json and search/chosen.json
    front = run.front()
    parts = [
        "<h2>Edit search</h2>",
        f"<p>{len(front.get('trials', []))} trials; objectives: {html.escape('; '.join(front.get('objectives', [])))}. "
        f"Verification: greedy completions of {front.get('verify_max_new_tokens')} new tokens on held-out harmful "
        f"prompts, first-token KL on held-out harmless prompts ({html.escape(str(front.get('sets', {})))}).</p>",
        f"<p>{html.escape(proxy_label(front))}</p>" if proxy_label(front) else "",
        f'<img alt="Pareto front: refusals against KL" src="data:image/png;base64,{pareto_png(front)}">',
        _table(front),
    ]
    if layout.chosen.is_file():
        chosen = run.chosen()
        params = html.escape(EditParams.model_validate(chosen["edit"]).model_dump_json(indent=1))
        parts += [
            f"<h3>Chosen edit: trial {chosen['trial']}</h3><pre>{params}</pre>",
            f'<img alt="edit weights over layers" src="data:image/png;base64,{kernels_png(chosen["kernels"], chosen.get("embed", 0.0))}">',
        ]
    return "\n".join(parts)
