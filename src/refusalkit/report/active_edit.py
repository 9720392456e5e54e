"""The measured numbers of ONE edit of a run (``run.ActiveEdit``), for every place that states them:
the model card, the chat banner, the serve page and the report.

A card or a page describes one model, so it shows that edit's own numbers and no other's:

- the paper's direction: its setting in evaluate/refusal_rates.json and measure/*.json
  (``orthogonalized``; ``ablation`` for families whose weights cannot be edited exactly), against the
  original model on the same prompts;
- a searched edit: the search's verification of that trial on held-out prompts (search/front.json, or
  search/chosen.json for a chosen trial off the front), against the unedited model verified on the same
  prompts; a trial never verified shows the search's proxy numbers, labelled as such;
- the calibration (``--edit calibrate``): its judged validation record (pseudo-harmful and harmful
  validation prompts, unedited and calibrated) and the KL its selection measured.

Read only: artifacts, no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from refusalkit.evaluation.refusal import as_rate, rate
from refusalkit.formatting import is_number
from refusalkit.report import RunData, collect, headline, refusal_rate
from refusalkit.run import ActiveEdit, RunFolder

NOT_MEASURED = "not measured"
JUDGES = {
    "paper": "the paper's refusal phrases",
    "broad": "the broad refusal list",
    "heretic": "heretic's markers",
}


@dataclass(frozen=True)
class Row:
    label: str
    original: str
    edited: str


@dataclass
class EditNumbers:
    """Which edit, where its numbers come from, and one row per measurement (text, ready to show)."""

    label: str
    choice: str  # the --edit value that selects this edit
    source: str
    rows: list[Row] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)  # the raw numbers, for report.json

    def measured(self) -> list[Row]:
        """The rows with a number on the edited side."""
        return [r for r in self.rows if r.edited != NOT_MEASURED]

    def summary(self) -> str:
        """One line: the first two measured rows (the chat banner)."""
        shown = [f"{r.label}: {r.original} -> {r.edited}" for r in self.measured()[:2]]
        return "; ".join(shown) if shown else f"no measured numbers ({self.source})"


def num(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if is_number(v) else NOT_MEASURED


def rate_text(record: Any) -> str:
    """'0.94 = 30/32 (95% CI 0.81-0.98)' from any rate layout an artifact holds."""
    r = as_rate(record)
    if not r or r.get("rate") is None:
        return NOT_MEASURED
    lo, hi = (r.get("ci95") or [None, None])[:2]
    ci = f" (95% CI {lo:.2f}-{hi:.2f})" if isinstance(lo, float) and isinstance(hi, float) else ""
    return f"{r['rate']:.2f} = {r['k']}/{r['n']}{ci}"


def edit_numbers(run: RunFolder, active: ActiveEdit, data: RunData | None = None) -> EditNumbers:
    """The numbers of ``active``, an edit of ``run`` (``data``: its artifacts, read when not given)."""
    if active.kind == "search":
        return _search_numbers(run, active)
    if active.kind == "calibrate":
        return calibration_numbers(active)
    return _direction_numbers(active, data or collect(run.root))


def direction_setting(data: RunData) -> str:
    """The evaluated setting that is the direction's edit: the orthogonalized weights, or the ablation
    hooks where the weights were not edited (post-norm families)."""
    return "orthogonalized" if refusal_rate(data, "harmful", "orthogonalized") else "ablation"


def _direction_numbers(active: ActiveEdit, data: RunData) -> EditNumbers:
    h = headline(data)
    st = direction_setting(data)
    rows = [
        Row(
            f"harmful prompts refused ({JUDGES['paper']})",
            rate_text(refusal_rate(data, "harmful", "baseline")),
            rate_text(refusal_rate(data, "harmful", st)),
        )
    ]
    if refusal_rate(data, "harmful", st, "broad"):
        rows.append(
            Row(
                f"harmful prompts refused ({JUDGES['broad']})",
                rate_text(refusal_rate(data, "harmful", "baseline", "broad")),
                rate_text(refusal_rate(data, "harmful", st, "broad")),
            )
        )
    safety = (data.measure.get("safety") or {}).get("settings", {})
    if st in safety:
        rows.append(
            Row("harmful answers judged safe", rate_text(safety.get("baseline")), rate_text(safety[st]))
        )
    rows += [
        Row("first-token KL on harmless prompts (vs. original)", "0", num(h["kl"].get(st))),
        Row(
            "corpus cross-entropy (nats/token)",
            num(h["corpus_ce"].get("baseline")),
            num(h["corpus_ce"].get(st)),
        ),
        Row(
            "CE of the original model's own completions",
            num(h["completion_ce"].get("baseline")),
            num(h["completion_ce"].get(st)),
        ),
    ]
    for label, key in (
        ("GSM8K accuracy", "gsm8k"),
        ("TruthfulQA MC1", "truthfulqa_mc1"),
        ("TruthfulQA MC2", "truthfulqa_mc2"),
    ):
        cap = h.get(key) or {}
        rows.append(Row(label, num(cap.get("original")), num(cap.get("edited"))))
    n = (refusal_rate(data, "harmful", st) or {}).get("n") or (h.get("sizes") or {}).get("harmful_test", "?")
    source = (
        f"evaluate/refusal_rates.json and measure/ (setting `{st}`): {n} held-out harmful test prompts, "
        f"greedy completions of {h.get('max_new_tokens', '?')} new tokens"
    )
    numbers = {
        "setting": st,
        "refusal": {k: refusal_rate(data, "harmful", k) for k in ("baseline", st)},
        "kl": {k: h[k].get(st) for k in ("kl", "kl_median", "kl_max")},
        "corpus_ce": h["corpus_ce"].get(st),
    }
    return EditNumbers(active.label, active.choice, source, rows, numbers)


def _search_numbers(run: RunFolder, active: ActiveEdit) -> EditNumbers:
    record = active.record or {}
    where = active.record_path.relative_to(run.root) if active.record_path else "search/"
    front = run.front() if run.layout.front.is_file() else {}
    v, base = record.get("verified"), front.get("baseline")
    if not v:
        proxy = record.get("proxy") or {}
        kl = (proxy.get("kl") or {}).get("mean")
        rows = [
            Row(
                "expected refusal on harmful validation prompts (search proxy)",
                NOT_MEASURED,
                num(proxy.get("refusal")),
            ),
            Row("first-token KL on harmless prompts (search proxy)", "0", num(kl, 4)),
        ]
        source = (
            f"{where}: trial {active.trial} was not verified on held-out prompts; these are the search's proxy "
            "numbers on validation prompts (verify it with `refusalkit optimize --verify-n`)"
        )
        return EditNumbers(active.label, active.choice, source, rows, {"trial": active.trial, "proxy": proxy})
    n = int(v["n"])
    rows = []
    for judge, k in v["refused"].items():
        orig = (
            rate(int(base["refused"][judge]), int(base["n"]))
            if base and judge in base.get("refused", {})
            else None
        )
        rows.append(
            Row(
                f"harmful prompts refused ({JUDGES.get(judge, judge)})",
                rate_text(orig),
                rate_text(rate(int(k), n)),
            )
        )
    kl = v["kl"]
    rows.append(
        Row(
            "first-token KL on harmless prompts (vs. original)",
            "0",
            f"{num(kl.get('mean'), 4)} (median {num(kl.get('median'), 4)}, max {num(kl.get('max'))})",
        )
    )
    harmless = (front.get("sets") or {}).get("harmless_test", "?")
    source = (
        f"{where}: trial {active.trial} verified on {n} held-out harmful prompts (greedy completions of "
        f"{v.get('max_new_tokens', '?')} new tokens, judged by every marker list) and first-token KL on "
        f"{harmless} held-out harmless prompts; the original model verified on the same prompts"
    )
    numbers = {"trial": active.trial, "verified": v, "baseline": base}
    return EditNumbers(active.label, active.choice, source, rows, numbers)


def calibration_numbers(active: ActiveEdit) -> EditNumbers:
    """The calibration's own numbers: its judged validation record, and its selection's scores."""
    record, d = active.record or {}, active.direction
    assert d is not None
    val = record.get("validation") or {}
    rows = []
    for name, what in (("pseudo_harmful_val", "pseudo-harmful"), ("harmful_val", "harmful")):
        for judge in ("paper", "broad"):
            r = val.get(name) or {}
            if judge in (r.get("calibrated") or {}):
                rows.append(
                    Row(
                        f"{what} validation prompts refused ({JUDGES[judge]})",
                        rate_text(r["baseline"].get(judge)),
                        rate_text(r["calibrated"].get(judge)),
                    )
                )
    held, held_base = record.get("verified") or {}, record.get("baseline_verified") or {}
    for name, rates in (held.get("rates") or {}).items():  # the calibration search's verification
        for judge, r in rates.items():
            b = ((held_base.get("rates") or {}).get(name) or {}).get(judge)
            rows.append(
                Row(f"{name} refused, held out ({JUDGES.get(judge, judge)})", rate_text(b), rate_text(r))
            )
    if held.get("kl"):
        rows.append(
            Row("first-token KL on held-out harmless prompts (vs. original)", "0", num(held["kl"]["mean"], 4))
        )
    base = record.get("base") or {}
    rows += [
        Row(
            "pseudo-harmful validation prompts with refusal metric > 0",
            num(base.get("over_rate"), 2),
            num(d.scores.get("over_rate"), 2),
        ),
        Row(
            "harmful validation prompts with refusal metric > 0",
            num(base.get("harmful_rate"), 2),
            num(d.scores.get("harmful_rate"), 2),
        ),
        Row("first-token KL on harmless validation prompts (vs. original)", "0", num(d.scores.get("kl"), 4)),
    ]
    source = (
        f"{active.record_path.name if active.record_path else 'calibrate/'}: the calibration's validation "
        "prompts (OR-Bench-Hard val, the run's harmful and harmless validation splits); held-out numbers: "
        "the over_refusal measurement and bench/calibrate.py"
    )
    return EditNumbers(active.label, active.choice, source, rows, {"calibration": record, "scores": d.scores})


__all__ = [
    "NOT_MEASURED",
    "EditNumbers",
    "Row",
    "calibration_numbers",
    "direction_setting",
    "edit_numbers",
    "rate_text",
]
