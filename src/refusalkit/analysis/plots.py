"""Plots of a suffix analysis (the dict ``suffix.analyze_suffixes`` returns), one PNG per analysis.

matplotlib is an optional dependency (``pip install 'refusalkit[report]'``); the Agg backend is used so
no display is needed. A plot that fails is logged as a warning naming it and skipped: the analysis it
draws is already on disk, and a figure must never hide finished work behind a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.refusal import as_rate

log = logging.getLogger(__name__)

COLORS = {"harmful": "tab:red", "adversarial": "tab:purple", "random": "tab:gray", "harmless": "tab:green"}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display); a clear error when matplotlib is
    missing, so a command can check for it before any model loads."""
    try:
        import matplotlib
    except ImportError:
        raise RefusalkitError(
            "plots need matplotlib: pip install 'refusalkit[report]' (or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cosine(res: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    sites = res["cosine"]["sites"]
    x = list(range(len(sites)))
    for n in res["conditions"]:
        mean, std = res["cosine"][n]["mean"], res["cosine"][n]["std"]
        ax.plot(x, mean, label=n, color=COLORS.get(n))
        ax.fill_between(
            x,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=COLORS.get(n),
            alpha=0.15,
        )
    ax.axvline(res["direction"]["layer"], color="k", ls=":", lw=1, label="direction layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(f"layer (resid_pre; last point: output of block {len(sites) - 2})")
    ax.set_ylabel("cos(last-token residual, r)")
    ax.set_title("Refusal direction at the last token")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_heads(res: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    ha = res["head_attribution"]
    top = ha["top_heads"]
    names = res["conditions"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    grid = ha["mean"]["harmful"]  # [L][H]
    vmax = max(abs(v) for row in grid for v in row) or 1.0
    im = a1.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower")
    a1.xaxis.get_major_locator().set_params(integer=True)
    a1.yaxis.get_major_locator().set_params(integer=True)
    a1.set_xlabel("head")
    a1.set_ylabel("layer")
    a1.set_title("head output . r at last token (harmful)")
    fig.colorbar(im, ax=a1)
    width = 0.8 / max(len(names), 1)
    for k, n in enumerate(names):
        a2.bar(
            [i + k * width for i in range(len(top))], [h[n] for h in top], width, label=n, color=COLORS.get(n)
        )
    a2.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(top))],
        [f"L{h['layer']}H{h['head']}" for h in top],
        rotation=45,
        fontsize=8,
    )
    a2.axhline(0, color="k", lw=0.5)
    a2.set_title(f"top heads by harmful attribution ({ha['attribution_site']})", fontsize=9)
    a2.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_attention(res: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    att = res["attention"]
    roles = res["roles"]
    names = res["conditions"]
    top = att["top_heads"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
    bottom = [0.0] * len(names)
    for role in roles:
        vals = [att["mean_over_top_heads"][n][role] for n in names]
        a1.bar(names, vals, bottom=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    a1.set_ylabel("attention share from last token")
    a1.set_title("top heads, mean")
    a1.legend(fontsize=8)
    shown = [n for n in ("harmful", "adversarial", "random") if n in names]
    width = 0.8 / (2 * max(len(shown), 1))
    for k, n in enumerate(shown):
        for r, role in enumerate(("instruction", "suffix")):
            off = (2 * k + r) * width
            a2.bar(
                [i + off for i in range(len(top))],
                [h[n][role] for h in top],
                width,
                label=f"{n}: {role}",
                color=COLORS.get(n),
                alpha=1.0 if role == "instruction" else 0.5,
                hatch="" if role == "instruction" else "//",
            )
    a2.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(top))],
        [f"L{h['layer']}H{h['head']}" for h in top],
        rotation=45,
        fontsize=8,
    )
    a2.set_title("instruction vs suffix share per top head")
    a2.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def error_bars(rates: list[float], cis: list[list[float | None]]) -> list[list[float]]:
    """[[below], [above]] whisker lengths for bars at ``rates`` with intervals ``cis``; never negative.

    An interval read back from JSON can sit a hair inside its rate at 0 or 1 (the Wilson bound's
    rounding), and matplotlib rejects negative error lengths; a missing end draws no whisker.
    """
    below = [max(0.0, r - lo) if lo is not None else 0.0 for r, (lo, _) in zip(rates, cis, strict=True)]
    above = [max(0.0, hi - r) if hi is not None else 0.0 for r, (_, hi) in zip(rates, cis, strict=True)]
    return [below, above]


def plot_refusal(res: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    names = res["conditions"]
    ref = res["refusal"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    records = [as_rate(ref[n]) for n in names]
    if all(r is not None and r["rate"] is not None for r in records):
        rates = [float(r["rate"]) for r in records if r]
        err = error_bars(rates, [list(r["ci95"]) for r in records if r])
        a1.bar(names, rates, yerr=err, capsize=4, color=[COLORS.get(n) for n in names])
        a1.set_ylim(0, 1.05)
    a1.set_ylabel("refusal rate (substring judge, 95% CI)")
    a2.bar(names, [ref[n]["metric_mean"] for n in names], color=[COLORS.get(n) for n in names])
    a2.axhline(0, color="k", lw=0.5)
    a2.set_ylabel("refusal metric (log-odds)")
    return _save(plt, fig, path)


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "cosine.png": plot_cosine,
    "heads.png": plot_heads,
    "attention.png": plot_attention,
    "refusal.png": plot_refusal,
}


def write_plots(res: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write cosine.png, heads.png, attention.png and refusal.png into ``folder``; return those written.

    A plot that fails is logged as a warning that names it, and the others are still drawn. A missing
    matplotlib is the user's to fix, so it stays an error.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pyplot()
    written = []
    for name, plot in PLOTS.items():
        try:
            written.append(plot(res, folder / name))
        except Exception as exc:  # a figure is never worth losing the finished analysis over
            log.warning("plot %s was not drawn: %s: %s", folder / name, type(exc).__name__, exc)
            _close_all()
    return written


def _close_all() -> None:
    """Free figures a failed plot left open (it raised before closing them)."""
    pyplot().close("all")
