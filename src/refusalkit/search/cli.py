"""`refusalkit optimize RUN_DIR`: argparse wiring over ``OptimizeOptions`` (one flag per field)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from refusalkit.layout import RunLayout

HELP = (
    "Search edits (per-layer kernels, directions, projection, norm preservation) for the fewest refusals "
    "at the least first-token KL; verify the Pareto front on held-out prompts; choose and export."
)


def optimize_arguments(p: argparse.ArgumentParser) -> None:
    """RUN_DIR and --list; the search options come from ``OptimizeOptions`` (refusalkit.options)."""
    p.add_argument("run_dir", type=Path, help="Run folder with extract done (select adds the paper's pick).")
    p.add_argument("--list", action="store_true", help="Print the saved front and exit (no model loaded).")
    p.add_argument("--config", type=Path, help="TOML file of options (keys as the flags).")


def options_from(args: argparse.Namespace) -> Any:
    from refusalkit.options import options_from_args
    from refusalkit.search.optimize import OptimizeOptions

    return options_from_args(args, OptimizeOptions)


def run_optimize(args: argparse.Namespace) -> int:
    from refusalkit.search.front import format_front, points_of, read_front
    from refusalkit.search.optimize import optimize

    layout = RunLayout(args.run_dir)
    if args.list:
        front = read_front(layout)
        print(format_front(points_of(front), front.get("chosen")))
        return 0
    front = optimize(layout, options_from(args))
    print(format_front(points_of(front), front.get("chosen")))
    secs = front["seconds"]
    print(
        f"\n{front['trials_run']} trials this call, {len(front['trials'])} in the study; search {secs['search']:.0f} s, "
        f"verification {secs['verify']:.0f} s, total {secs['total']:.0f} s"
    )
    print(f"chosen: trial {front['chosen']} (* above); {layout.chosen}; study: {layout.study}")
    return 0
