"""`refusalkit compare RUN_A RUN_B ...`: one table of headline numbers across runs (text, markdown, HTML)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from refusalkit.calibrate.report import over_refusal_cell
from refusalkit.errors import RefusalkitError
from refusalkit.formatting import arrow, joined
from refusalkit.report import collect, headline

SETTINGS = ("baseline", "ablation", "actadd", "orthogonalized")


def _slash(d: dict[str, Any], keys: tuple[str, ...], digits: int = 2) -> str:
    return joined([d.get(k) for k in keys], digits)


def _change(d: dict[str, Any], before: str = "original", after: str = "edited") -> str:
    return arrow(d.get(before), d.get(after))


COLUMNS: list[tuple[str, Any]] = [
    ("run", lambda h, run: run),
    ("model", lambda h, run: h["model"] or "-"),
    (
        "pos, layer/L",
        lambda h, run: f"{h['position']}, {h['layer']}/{h['n_layers']}" if h["layer"] is not None else "-",
    ),
    ("refusal b/abl/add/orth", lambda h, run: _slash(h["refusal"], SETTINGS)),
    ("refusal broad b/abl/add/orth", lambda h, run: _slash(h["refusal_broad"], SETTINGS)),
    ("safety b/abl/add/orth", lambda h, run: _slash(h["safety"], SETTINGS)),
    (
        "harmless refusal b->add",
        lambda h, run: _change(h["harmless_refusal"], "baseline", "actadd"),
    ),
    ("KL abl/add", lambda h, run: _slash(h["kl"], ("ablation", "actadd"), 3)),
    ("corpus CE b/abl/add/orth", lambda h, run: _slash(h["corpus_ce"], SETTINGS, 3)),
    ("own CE b/abl/add/orth", lambda h, run: _slash(h["completion_ce"], SETTINGS, 3)),
    ("GSM8K orig->edit", lambda h, run: _change(h["gsm8k"])),
    ("TQA MC1 orig->edit", lambda h, run: _change(h["truthfulqa_mc1"])),
    ("TQA MC2 orig->edit", lambda h, run: _change(h["truthfulqa_mc2"])),
]


# Columns read from a run's own files rather than its headline numbers.
FILE_COLUMNS: list[tuple[str, Any]] = [
    ("over-refusal ORB test / OKT val b->edit", lambda run: over_refusal_cell(run)),
]


def table_rows(run_dirs: list[Path]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per run folder ('-' where a number was not measured)."""
    rows = []
    for run in run_dirs:
        h = headline(collect(run))
        rows.append(
            [str(fn(h, run.name or str(run))) for _, fn in COLUMNS] + [str(fn(run)) for _, fn in FILE_COLUMNS]
        )
    return [name for name, _ in COLUMNS + FILE_COLUMNS], rows


def as_text(header: list[str], rows: list[list[str]]) -> str:
    """Transposed (one column per run) so that many numbers per run stay readable in a terminal."""
    width = max(len(h) for h in header)
    runs = [r[0] for r in rows]
    widths = [max(len(c) for c in r) for r in rows]
    lines = [" " * width + "  " + "  ".join(run.ljust(w) for run, w in zip(runs, widths, strict=True))]
    for i, name in enumerate(header[1:], 1):
        lines.append(
            name.ljust(width) + "  " + "  ".join(r[i].ljust(w) for r, w in zip(rows, widths, strict=True))
        )
    return "\n".join(lines)


def as_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def as_html(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    style = (
        "body{font:14px/1.5 system-ui,sans-serif;margin:24px;color:#111827}table{border-collapse:collapse}"
        "th,td{padding:6px 10px;border-bottom:1px solid #e5e7eb;text-align:right;white-space:nowrap}"
        "th{font-size:12px;color:#6b7280;text-transform:uppercase}td:first-child,th:first-child{text-align:left}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>refusalkit compare</title><style>{style}</style>'
        f"</head><body><h1>refusalkit compare</h1><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        "</body></html>\n"
    )


def compare_runs(run_dirs: list[Path], out: Path | None = None) -> str:
    """The comparison as terminal text; with ``out`` (.html or .md) also written there."""
    if not run_dirs:
        raise RefusalkitError("give at least one run folder")
    header, rows = table_rows([Path(r) for r in run_dirs])
    if out is not None:
        suffix = out.suffix.lower()
        if suffix in (".html", ".htm"):
            out.write_text(as_html(header, rows), encoding="utf-8")
        elif suffix in (".md", ".markdown"):
            out.write_text(as_markdown(header, rows), encoding="utf-8")
        else:
            raise RefusalkitError(f"--out {out}: use a .html or .md file name")
    return as_text(header, rows)
