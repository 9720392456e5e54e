"""The report's figures, drawn with matplotlib (the `report` extra) and returned as base64 PNG strings.

Each function takes plain numbers (lists from the artifacts), never a model, and returns the PNG's
base64 text for an ``<img src="data:image/png;base64,...">`` tag.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.formatting import is_number, num

INK = "#1f2937"
MUTED = "#6b7280"
HARMFUL = "#c2410c"
HARMLESS = "#0369a1"
SETTING_COLORS = {
    "baseline": "#475569",
    "ablation": "#c2410c",
    "actadd": "#7c3aed",
    "orthogonalized": "#0f766e",
}


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RefusalkitError(
            "the report's figures need matplotlib: pip install 'refusalkit[report]'"
        ) from None
    plt.rcParams.update(
        {
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.titleweight": "bold",
            "axes.edgecolor": "#9ca3af",
            "axes.labelcolor": INK,
            "xtick.color": MUTED,
            "ytick.color": MUTED,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "figure.dpi": 110,
        }
    )
    return plt


def available() -> bool:
    try:
        _plt()
    except RefusalkitError:
        return False
    return True


def close_all() -> None:
    """Free figures a failed plot left open (it raised before closing them)."""
    _plt().close("all")


def _png(fig: Any) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _int_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _score_grids(scores: list[dict[str, Any]], n_layers: int, n_positions: int) -> tuple[dict[str, Any], Any]:
    """({bypass, induce, kl}: [positions, layers] grids, NaN where unscored; [positions, layers] kept)."""
    import numpy as np

    grids = {k: np.full((n_positions, n_layers), np.nan) for k in ("bypass", "induce", "kl")}
    kept = np.zeros((n_positions, n_layers), dtype=bool)
    for s in scores:
        p, layer = int(s["position"]) + n_positions, int(s["layer"])
        if 0 <= p < n_positions and 0 <= layer < n_layers:
            for k in grids:
                grids[k][p, layer] = _nan(s.get(k))
            # Hatch what the rules discarded; candidates pruned by the search (bypass scored, induce and
            # KL not needed) were not discarded, they just could not beat the pick: they show grey.
            kept[p, layer] = bool(s.get("kept")) or str(s.get("reason", "")).startswith("pruned")
    return grids, kept


def _hatch(plt: Any, ax: Any, kept: Any) -> None:
    """Hatch every cell not kept."""
    for p, layer in zip(*(~kept).nonzero(), strict=True):
        ax.add_patch(
            plt.Rectangle(
                (layer - 0.5, p - 0.5),
                1,
                1,
                fill=False,
                hatch="///",
                edgecolor=(0.1, 0.1, 0.1, 0.45),
                linewidth=0,
            )
        )


def score_heatmaps(
    scores: list[dict[str, Any]],
    n_layers: int,
    n_positions: int,
    selected: tuple[int, int] | None,
    tokens: list[str] | None = None,
    cutoff: int | None = None,
) -> str:
    """Bypass, induce and KL over layers (x) and positions (y). Discarded candidates hatched, unscored
    ones grey (pruned ones: grey in induce/KL), the selected one boxed, the layer rule's cutoff dashed.
    selected: (position, layer)."""
    import numpy as np

    plt = _plt()
    grids, kept = _score_grids(scores, n_layers, n_positions)
    titles = {
        "bypass": "bypass: refusal metric on harmful prompts, candidate ablated (lower is better)",
        "induce": "induce: refusal metric on harmless prompts, candidate added (higher is better)",
        "kl": "KL on harmless prompts, candidate ablated (lower is better)",
    }
    cmaps = {"bypass": "viridis", "induce": "magma", "kl": "cividis"}
    fig, axes = plt.subplots(
        3, 1, figsize=(11.5, 1.2 + 3 * (0.8 + 0.24 * n_positions)), constrained_layout=True
    )
    ylabels = [
        f"{p - n_positions}" + (f"  {tokens[p]!r}" if tokens and p < len(tokens) else "")
        for p in range(n_positions)
    ]
    for ax, (key, grid) in zip(axes, grids.items(), strict=True):
        cmap = plt.get_cmap(cmaps[key]).with_extremes(bad="#e5e7eb")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
        _hatch(plt, ax, kept)
        if cutoff is not None and cutoff < n_layers:
            ax.axvline(cutoff - 0.5, color="#111827", linestyle="--", linewidth=1.2)
        if selected is not None:
            p, layer = selected[0] + n_positions, selected[1]
            ax.add_patch(
                plt.Rectangle((layer - 0.5, p - 0.5), 1, 1, fill=False, edgecolor="#ef4444", linewidth=2.2)
            )
        ax.set_title(titles[key], loc="left")
        ax.set_yticks(range(n_positions), ylabels)
        ax.set_xticks(range(0, n_layers, max(1, n_layers // 16)))
        ax.set_xlabel("layer")
    return _png(fig)


def norms_and_cosine(
    norms: list[list[float]], cosine: list[list[float]], cos_position: int, selected: tuple[int, int] | None
) -> str:
    """Left: |r| of every candidate per layer, one line per position. Right: cosine between layers."""
    import numpy as np

    plt = _plt()
    n_pos, n_layers = len(norms), len(norms[0]) if norms else 0
    fig, (a, b) = plt.subplots(1, 2, figsize=(11.5, 3.8), constrained_layout=True, width_ratios=[1.35, 1])
    cmap = plt.get_cmap("viridis")
    for p, row in enumerate(norms):
        pos = p - n_pos
        is_sel = selected is not None and pos == selected[0]
        a.plot(
            range(n_layers),
            row,
            color="#ef4444" if is_sel else cmap(p / max(1, n_pos - 1)),
            linewidth=2.2 if is_sel else 1.1,
            alpha=1 if is_sel else 0.75,
            label=f"pos {pos}",
        )
    if selected is not None:
        a.axvline(selected[1], color="#ef4444", linestyle=":", linewidth=1)
    a.set_title("norm of the candidate directions |μ − ν|", loc="left")
    for axis in (a.xaxis, b.xaxis, b.yaxis):
        axis.set_major_locator(_int_locator())
    a.set_xlabel("layer")
    a.legend(ncol=2, fontsize=7, frameon=False)
    im = b.imshow(np.array(cosine), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=b, fraction=0.046)
    b.set_title(f"cosine between layers' directions (pos {cos_position})", loc="left")
    b.set_xlabel("layer")
    b.set_ylabel("layer")
    return _png(fig)


def rate_bars(groups: list[tuple[str, list[tuple[str, float | None, list[float | None]]]]]) -> str:
    """Horizontal bars with 95% CI whiskers. groups: [(title, [(label, rate, [lo, hi])])].

    A missing rate draws an empty bar marked n/a; whiskers are clamped at zero length, since an interval
    read back from JSON can sit a hair inside a rate of exactly 0 or 1.
    """
    from refusalkit.analysis.plots import error_bars

    plt = _plt()
    fig, axes = plt.subplots(
        1,
        len(groups),
        figsize=(4.2 * len(groups), 0.6 + 0.36 * max(len(g[1]) for g in groups)),
        constrained_layout=True,
        squeeze=False,
    )
    for ax, (title, bars) in zip(axes[0], groups, strict=True):
        shown = bars[::-1]  # barh draws bottom-up; the first bar goes on top
        labels = [b[0] for b in shown]
        vals = [float(b[1]) if is_number(b[1]) else 0.0 for b in shown]
        cis: list[list[float | None]] = [list(b[2]) if is_number(b[1]) else [None, None] for b in shown]
        colors = [SETTING_COLORS.get(lab.split(" ")[0], "#64748b") for lab in labels]
        ax.barh(
            labels,
            vals,
            xerr=error_bars(vals, cis),
            color=colors,
            alpha=0.85,
            error_kw={"ecolor": INK, "capsize": 3, "lw": 1},
        )
        for y, (v, b) in enumerate(zip(vals, shown, strict=True)):
            ax.text(min(v + 0.02, 0.9), y, num(b[1], missing="n/a"), va="center", fontsize=8, color=INK)
        ax.set_xlim(0, 1)
        ax.set_title(title, loc="left")
    return _png(fig)


def projections(
    proj_harmful: list[float],
    proj_harmless: list[float],
    layer: int | None,
    per_prompt: dict[str, list[list[float]]] | None = None,
) -> str:
    """Projection on r^ of harmful / harmless activations across layers: means (lines) and, when
    available, each prompt (faint lines)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11.5, 3.6), constrained_layout=True)
    if per_prompt:
        for key, color in (("harmful", HARMFUL), ("harmless", HARMLESS)):
            for row in per_prompt.get(key, []):
                ax.plot(range(len(row)), row, color=color, alpha=0.13, linewidth=0.8)
    ax.plot(
        range(len(proj_harmful)), proj_harmful, color=HARMFUL, linewidth=2.4, label="harmful (train mean)"
    )
    ax.plot(
        range(len(proj_harmless)), proj_harmless, color=HARMLESS, linewidth=2.4, label="harmless (train mean)"
    )
    if layer is not None:
        ax.axvline(layer, color="#ef4444", linestyle=":", linewidth=1, label=f"direction's layer {layer}")
    ax.axhline(0, color="#9ca3af", linewidth=0.6)
    ax.xaxis.set_major_locator(_int_locator())
    ax.set_xlabel("layer")
    ax.set_ylabel("x · r̂")
    extra = " (faint: individual test prompts)" if per_prompt else ""
    ax.set_title("projection of activations on the refusal direction" + extra, loc="left")
    ax.legend(frameon=False, fontsize=8)
    return _png(fig)
