"""`refusalkit optimize RUN_DIR`: argparse wiring over ``OptimizeOptions`` (one flag per field)."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout

HELP = (
    "Search edits (per-layer kernels, directions, projection, norm preservation) for the fewest refusals "
    "at the least first-token KL; verify the Pareto front on held-out prompts; choose and export."
)


def _base_type(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_optimize_parser(subparsers: Any) -> argparse.ArgumentParser:
    from refusalkit.search.optimize import OptimizeOptions

    p = subparsers.add_parser("optimize", help=HELP, description=HELP)
    p.add_argument("run_dir", type=Path, help="Run folder with extract done (select adds the paper's pick).")
    p.add_argument("--list", action="store_true", help="Print the saved front and exit (no model loaded).")
    group = p.add_argument_group("search options")
    for name, field in OptimizeOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        typ = _base_type(field.annotation)
        help_text = f"{field.description} [default: {field.default}]"
        if typ is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif typing.get_origin(typ) is list:
            group.add_argument(flag, dest=name, default=None, help=help_text + " (comma-separated)")
        else:
            group.add_argument(
                flag, dest=name, type=typ if typ in (int, float) else str, default=None, help=help_text
            )
    return p


def options_from(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from refusalkit.search.optimize import OptimizeOptions

    values = {n: getattr(args, n) for n in OptimizeOptions.model_fields if getattr(args, n, None) is not None}
    if isinstance(values.get("sources"), str):
        values["sources"] = [x.strip() for x in values["sources"].split(",") if x.strip()]
    try:
        return OptimizeOptions(**values)
    except ValidationError as exc:
        lines = [f"  --{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        raise RefusalkitError("invalid optimize options:\n" + "\n".join(lines)) from None


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
