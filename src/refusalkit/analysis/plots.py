"""Plots of a suffix analysis (the dict ``suffix.analyze_suffixes`` returns), one PNG per analysis.

matplotlib is an optional dependency (``pip install 'refusalkit[report]'``); the Agg backend is used so
no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError

COLORS = {"harmful": "tab:red", "adversarial": "tab:purple", "random": "tab:gray", "harmless": "tab:green"}


def _pyplot() -> Any:
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
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
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


def plot_refusal(res: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    names = res["conditions"]
    ref = res["refusal"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    if all("rate" in ref[n] for n in names):
        rates = [ref[n]["rate"] for n in names]
        err = [
            [r - ref[n]["ci95"][0] for n, r in zip(names, rates, strict=True)],
            [ref[n]["ci95"][1] - r for n, r in zip(names, rates, strict=True)],
        ]
        a1.bar(names, rates, yerr=err, capsize=4, color=[COLORS.get(n) for n in names])
        a1.set_ylim(0, 1.05)
    a1.set_ylabel("refusal rate (substring judge, 95% CI)")
    a2.bar(names, [ref[n]["metric_mean"] for n in names], color=[COLORS.get(n) for n in names])
    a2.axhline(0, color="k", lw=0.5)
    a2.set_ylabel("refusal metric (log-odds)")
    return _save(plt, fig, path)


def write_plots(res: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write cosine.png, heads.png, attention.png and refusal.png into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_cosine(res, folder / "cosine.png"),
        plot_heads(res, folder / "heads.png"),
        plot_attention(res, folder / "attention.png"),
        plot_refusal(res, folder / "refusal.png"),
    ]
