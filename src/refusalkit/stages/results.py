"""The run's headline numbers (results.json) and the results table the CLI prints.

results.json: the selected direction, the refusal rate per setting and prompt set, the split sizes,
stage times and, when the measure stage ran, first-token KL, CE and capability (from the report's
``headline``). Read only: no model.
"""

from __future__ import annotations

from typing import Any

from refusalkit.directions import Direction
from refusalkit.formatting import num
from refusalkit.layout import RunLayout
from refusalkit.utils import read_json, write_json


def summarize(layout: RunLayout, manifest: dict[str, Any]) -> dict[str, Any]:
    """Gather results.json from the run's artifacts and write it."""
    direction = Direction.load(layout.direction)
    rates = read_json(layout.refusal_rates)
    summary: dict[str, Any] = {
        "model": manifest.get("model", {}),
        "direction": {
            "layer": direction.layer,
            "position": direction.position,
            **direction.scores,
            "norm": float(direction.vector.norm()),
        },
        "refusal_rates": {
            ps: {name: v["refusal_rate"] for name, v in rates[ps].items()} for ps in ("harmful", "harmless")
        },
        "sizes": {k: v.get("n") for k, v in manifest.get("data", {}).items()},
        "max_new_tokens": rates.get("max_new_tokens"),
        "stage_seconds": {k: v.get("seconds") for k, v in manifest.get("stages", {}).items()},
    }
    if layout.measure_dir.is_dir():
        from refusalkit.report import collect, headline

        h = headline(collect(layout.root))
        summary["measure"] = {k: h.get(k) for k in ("kl", "corpus_ce", "completion_ce", "refusal_broad")}
        summary["capability"] = {k: h.get(k) for k in ("gsm8k", "truthfulqa_mc1", "truthfulqa_mc2")}
    write_json(layout.results, summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The results as a plain-text table: refusal rate per setting and prompt set."""
    rates = summary["refusal_rates"]
    d = summary["direction"]
    measured = summary.get("measure") or {}
    lines = [
        f"direction: layer {d['layer']}, position {d['position']}, bypass {d['bypass']:.2f}, "
        f"induce {d['induce']:.2f}, KL {d['kl']:.3f}",
        f"{'setting':<16}{'harmful refusal':>17}{'harmless refusal':>18}",
    ]
    for name in ("baseline", "ablation", "actadd", "orthogonalized"):
        h = rates.get("harmful", {}).get(name)
        hl = rates.get("harmless", {}).get(name)
        if h is None and hl is None:
            continue
        label = {"actadd": "actadd (-1/+1)"}.get(name, name)
        kl = (measured.get("kl") or {}).get(name)
        ce = (measured.get("corpus_ce") or {}).get(name)
        lines.append(f"{label:<16}{num(h):>17}{num(hl):>18}{num(kl, 3):>10}{num(ce, 3):>11}")
    lines[1] += f"{'KL':>10}{'corpus CE':>11}" if "measure" in summary else ""
    for name, v in (summary.get("capability") or {}).items():
        if v and v.get("original") is not None:
            lines.append(f"{name:<16} original {num(v['original'], 3)}  edited {num(v.get('edited'), 3)}")
    return "\n".join(lines)
