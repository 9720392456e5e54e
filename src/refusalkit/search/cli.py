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
    p.add_argument(
        "--system-prompt",
        action="append",
        dest="system_prompt_each",
        metavar="TEXT",
        help="A chat setup with this system prompt, besides --setups (repeatable; commas kept).",
    )


def options_from(args: argparse.Namespace) -> Any:
    from refusalkit.options import build_options, flag_values
    from refusalkit.search.options import OptimizeOptions

    flags = flag_values(args, OptimizeOptions)
    each = getattr(args, "system_prompt_each", None) or []
    if each:  # --system-prompt TEXT, repeated: one setup each, after any --system-prompts list
        flags["system_prompts"] = [*flags.get("system_prompts", []), *each]
    return build_options(OptimizeOptions, flags=flags, config=getattr(args, "config", None))


def run_optimize(args: argparse.Namespace) -> int:
    from refusalkit.search.front import format_front, points_of, read_front
    from refusalkit.search.optimize import optimize
    from refusalkit.search.proxy_judge import proxy_label

    layout = RunLayout(args.run_dir)
    opts = options_from(args)
    if opts.goal == "calibrate":  # its own front (calibrate/search/), printed its own way
        from refusalkit.search.calibrate_optimize import print_calibration

        return print_calibration(layout, opts, listing=args.list)
    if args.list:
        front = read_front(layout)
        print(format_front(points_of(front), front.get("chosen")))
        if proxy_label(front):  # a model judge made the proxy's counts
            print(proxy_label(front))
        return 0
    front = optimize(layout, opts)
    print(format_front(points_of(front), front.get("chosen")))
    if proxy_label(front):
        print(proxy_label(front))
    if front["trials_run"] == 0 and opts.choosing_only():
        print(
            f"\nchosen from the saved search (no trial run): trial {front['chosen']} (* above); {layout.chosen}"
        )
        return 0
    secs = front["seconds"]
    print(
        f"\n{front['trials_run']} trials this call, {len(front['trials'])} in the study; search {secs['search']:.0f} s, "
        f"verification {secs['verify']:.0f} s, total {secs['total']:.0f} s"
    )
    print(f"chosen: trial {front['chosen']} (* above); {layout.chosen}; study: {layout.study}")
    return 0
