"""`refusalkit calibrate RUN_DIR`: argparse wiring over ``CalibrateOptions`` (one flag per field)."""

from __future__ import annotations

import argparse
from pathlib import Path


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="Run folder with select done (the refusal direction).")
    p.add_argument(
        "--config", type=Path, help="TOML file of options (keys as the flags, a [calibrate] table)."
    )


def run_calibrate(args: argparse.Namespace) -> int:
    from refusalkit.calibrate.options import CalibrateOptions
    from refusalkit.calibrate.run import calibrate
    from refusalkit.layout import RunLayout
    from refusalkit.options import options_from_args

    opts = options_from_args(args, CalibrateOptions, table="calibrate")
    layout = RunLayout(args.run_dir)
    out = calibrate(layout, opts)
    print(
        f"calibrated: the false-refusal vector at layer {out['layer']}, position {out['position']}, "
        f"lambda {out['lam']:g} ({layout.calibrate_dir / out['stem']}.safetensors); {out['seconds']:.0f} s. "
        "Use it with --edit calibrate (export, chat, serve); the report has its section."
    )
    return 0
