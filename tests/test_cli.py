"""The command line: flags generated from Settings, help texts, and errors as exit code 2 without traces.

Every stage test here fails before a model would load, so no weights are needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refusalkit import cli
from refusalkit.cli import STAGE_HELP, Command, build_parser, main
from refusalkit.errors import RefusalkitError
from refusalkit.models.registry import BUILTIN_MODELS
from refusalkit.options import flag_values, options_from_args
from refusalkit.settings import STAGE_OPTIONS, Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the caller's environment must not leak into these tests (the cache may stay)."""
    for name in list(os.environ):
        if name.startswith("REFUSALKIT_") and name != "REFUSALKIT_CACHE":
            monkeypatch.delenv(name)


def _squash(text: str) -> str:
    """Drop all whitespace: argparse rewraps help text, also after hyphens."""
    return "".join(text.split())


def test_models_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in BUILTIN_MODELS:
        assert name in out
    assert "(default)" in out and "REFUSALKIT_CACHE" in out


@pytest.mark.parametrize("command", [c for c in STAGE_HELP if c != "export"])
def test_help_lists_the_options_of_the_stages_it_may_run(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each stage command shows its own options and those of the stages before it, nothing else."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = _squash(capsys.readouterr().out)
    assert _squash(STAGE_HELP[command]) in out
    shown = {name for cls in STAGE_OPTIONS[command] for name in cls.model_fields}
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name in shown:
            assert flag in out and f"REFUSALKIT_{name.upper()}" in out, name
            assert _squash(field.description or "") in out, name
        else:
            assert f"{flag}[" not in out and f"REFUSALKIT_{name.upper()}]" not in out, name


def test_select_help_has_no_measure_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["select", "--help"])
    out = capsys.readouterr().out
    assert "--kl-threshold" in out and "--gsm8k-n" not in out and "--max-new-tokens" not in out


def test_flags_parse_to_settings_types() -> None:
    argv = "run --out x --no-filter-train --n-train 7 --kl-threshold 0.5 --refusal-tokens I,No"
    args = build_parser().parse_args([*argv.split(), "--kl-definition", "paper"])
    given = flag_values(args, Settings)
    # Only the flags typed are present, so lower sources (TOML, environment, saved run) win for the rest.
    assert given == {
        "filter_train": False,
        "n_train": 7,
        "kl_threshold": 0.5,
        "refusal_tokens": ["I", "No"],
        "kl_definition": "paper",
    }


def test_export_format_flag_and_deprecated_alias(capsys: pytest.CaptureFixture[str]) -> None:
    from refusalkit.export.options import ExportOptions

    args = build_parser().parse_args(["export", "runs/x", "--format", "gguf", "--edit", "search"])
    assert flag_values(args, ExportOptions) == {"format": "gguf", "edit": "search"}
    assert flag_values(args, Settings) == {}  # the exporter's flags, not the run's settings
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "runs/x", "--format", "onnx"])
    capsys.readouterr()
    assert build_parser().parse_args(["orthogonalize", "runs/x"]).command == "orthogonalize"
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert "export" in listed and "orthogonalize" not in listed  # the old name is hidden


@pytest.mark.parametrize("command", ["export", "chat", "serve", "report"])
def test_every_edit_flag_has_the_one_wording(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--edit means the same to every command that takes it: one help text (run.EDIT_HELP)."""
    from refusalkit.run import EDIT_HELP, EDIT_KINDS

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = _squash(capsys.readouterr().out)
    assert _squash(EDIT_HELP) in out
    assert all(kind in out for kind in EDIT_KINDS)


def test_stage_on_a_folder_without_settings_names_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`refusalkit select DIR` on a folder where nothing finished must not start a default run."""
    run_dir = tmp_path / "typo"
    assert main(["select", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "no finished stage" in err and "--model" in err and f"refusalkit run --out {run_dir}" in err
    assert not (run_dir / "data").exists()  # nothing was drawn or loaded
    # An explicit model starts the run stage by stage (here: a model folder that does not exist).
    missing = tmp_path / "no-such-model"
    assert main(["select", str(run_dir), "--model", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_command_table_registers_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """A command added to the table gets its options class's flags, TOML keys and env variables."""
    from pydantic import BaseModel, Field

    class DemoOptions(BaseModel):
        """Demo knobs"""

        n_trials: int = Field(3, ge=1, description="Trials to run.")
        fast: bool = Field(False, description="Go fast.")

    seen: list[DemoOptions] = []

    def handler(args: argparse.Namespace) -> int:
        seen.append(options_from_args(args, DemoOptions, table="demo"))
        return 0

    cli.register(Command("demo", "A demo command.", "test_cli:_demo_handler", options=(DemoOptions,)))
    try:
        globals()["_demo_handler"] = handler
        sys.modules.setdefault("test_cli", sys.modules[__name__])
        assert main(["demo", "--n-trials", "5", "--fast"]) == 0
        assert seen[-1].n_trials == 5 and seen[-1].fast is True
        assert main(["demo", "--n-trials", "0"]) == 2
        assert "--n-trials" in capsys.readouterr().err
    finally:
        cli.COMMANDS.pop("demo")


def test_missing_data_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.json"
    code = main(["run", "--out", str(tmp_path / "run"), "--harmful-train", str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert "refusalkit: error:" in err and "not found" in err and str(missing) in err
    assert "Traceback" not in err


def test_missing_model_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "no-such-model"
    code = main(
        ["run", "--out", str(tmp_path / "run"), "--model", str(model), "--n-train", "2", "--n-val", "2"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "not found" in err and str(model) in err and "built-in name" in err
    assert "Traceback" not in err


def test_model_folder_without_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty-model").mkdir()
    code = main(["run", "--out", str(tmp_path / "run"), "--model", str(tmp_path / "empty-model")])
    assert code == 2
    assert "has no config.json" in capsys.readouterr().err


def test_invalid_settings_exit_2_with_all_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--out", str(tmp_path), "--n-train", "0", "--kl-threshold", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--n-train" in err and "--kl-threshold" in err and "Traceback" not in err


def test_stage_needs_run_dir(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["select"]) == 2
    assert "needs a run folder" in capsys.readouterr().err


def test_stage_reuses_the_run_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`refusalkit extract RUN_DIR` reads the settings the run was made with from its manifest."""
    missing = tmp_path / "saved-harmful.txt"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"settings": {"harmful_train": str(missing)}}))
    assert main(["extract", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err
    # A flag overrides the saved value.
    assert main(["extract", str(run_dir), "--harmful-train", str(tmp_path / "flag.txt")]) == 2
    assert "flag.txt" in capsys.readouterr().err


def test_stage_settings_one_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage on a run folder: defaults < saved settings < --config < environment < flags, the run
    reader's order; a manifest without settings still needs the model named."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = {"model": "saved-model", "n_train": 5, "n_val": 6, "batch_size": 7, "seed": 8}
    (run_dir / "manifest.json").write_text(json.dumps({"settings": saved}))
    config = tmp_path / "c.toml"
    config.write_text("n_val = 16\nbatch_size = 17\nseed = 18\n")
    monkeypatch.setenv("REFUSALKIT_BATCH_SIZE", "27")
    monkeypatch.setenv("REFUSALKIT_SEED", "28")
    argv = ["select", str(run_dir), "--config", str(config), "--seed", "38"]
    s = cli.stage_settings(build_parser(["select"]).parse_args(argv), "select", run_dir)
    assert (s.model, s.n_train, s.n_val, s.batch_size, s.seed) == ("saved-model", 5, 16, 27, 38)
    assert s.n_test == Settings().n_test  # untouched: the default
    # `run` starts from the defaults, whatever the folder saved
    run = cli.stage_settings(build_parser(["run"]).parse_args(["run", "--out", str(run_dir)]), "run", run_dir)
    assert run.model == Settings().model and run.n_train == Settings().n_train
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {}}))
    with pytest.raises(RefusalkitError, match="no finished stage"):
        cli.stage_settings(build_parser(["select"]).parse_args(["select", str(run_dir)]), "select", run_dir)


def test_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text("n_train = [")
    assert main(["run", "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    assert "invalid TOML" in capsys.readouterr().err


def test_gcg_checkpoint_of_another_model_or_direction_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from refusalkit.analysis.cli import gcg_config, resumable
    from refusalkit.analysis.options import SearchOptions

    config = gcg_config(SearchOptions(n_steps=3))
    meta = {
        "prompt_indices": [0],
        "model": {"name": "m", "fingerprint": "files-sha256:aaa"},
        "direction": {"layer": 3, "position": -1, "sha256": "d1"},
    }
    partial = tmp_path / "search.partial.json"
    saved = {
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "meta": meta,
        "history": [{"step": 2}],
    }
    partial.write_text(json.dumps(saved))
    assert resumable(partial, config, meta) == saved
    assert "resuming from step 2" in capsys.readouterr().err
    other_model = {**meta, "model": {"name": "m", "fingerprint": "files-sha256:bbb"}}
    assert resumable(partial, config, other_model) is None
    assert "other model; starting over" in capsys.readouterr().err
    other_direction = {**meta, "direction": {"layer": 4, "position": -1, "sha256": "d1"}}
    assert resumable(partial, config, other_direction) is None
    assert "other direction" in capsys.readouterr().err
    assert config.max_seconds is None and gcg_config(SearchOptions(max_minutes=2)).max_seconds == 120


def _imports_after(argv: list[str]) -> set[str]:
    """The heavy modules imported by `refusalkit ARGV` (run in a fresh interpreter, which exits by
    argparse's SystemExit for --help and argument errors)."""
    code = (
        "import sys\nfrom refusalkit.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('IMPORTED:', *(m for m in ('torch', 'transformers', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.rsplit("IMPORTED:", 1)[1].split())


def test_help_imports_no_torch() -> None:
    """`refusalkit --help` (and a misspelt command) builds no command's flags: torch is not imported."""
    assert _imports_after(["--help"]) == set()
    assert _imports_after(["no-such-command"]) == set()


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_argument_errors_import_no_torch(command: str) -> None:
    """A command's argument error is reported before any model code is imported."""
    assert _imports_after([command, "--no-such-flag"]) == set()


def test_run_asking_for_measurements_without_their_data_exits_2_before_any_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem in one error, before any stage. (A model folder that does not exist, so that even
    with the check broken this test never loads a real model.)"""
    out, model = tmp_path / "run", tmp_path / "no-model"
    argv = ["run", "--out", str(out), "--model", str(model), "--data-dir", str(tmp_path / "empty")]
    assert main([*argv, "--measurements", "corpus_ce,truthfulqa"]) == 2
    err = capsys.readouterr().err
    assert "the run cannot start" in err and "corpus_ce:" in err and "truthfulqa:" in err
    assert f"model: model '{model}' not found" in err
    assert "Traceback" not in err and not (out / "extract").exists()


def test_only_measurements_named_on_this_command_are_required() -> None:
    """Measurements saved in a run's settings or left at the defaults may be skipped for missing data;
    those named by a flag (or a preset, or the environment) are required."""
    from refusalkit.settings import build_settings

    parser = build_parser()
    saved = Settings(measurements=["corpus_ce", "coherence"])
    assert cli.requested(parser.parse_args(["measure", "runs/x"]), saved) == set()
    args = parser.parse_args(["measure", "runs/x", "--measurements", "corpus_ce"])
    assert cli.requested(args, build_settings(flag_values(args, Settings), base=saved.model_dump())) == {
        "corpus_ce"
    }
    args = parser.parse_args(["run", "--out", "x", "--preset", "paper"])
    paper = build_settings(flag_values(args, Settings))
    assert {"corpus_ce", "truthfulqa", "gsm8k"} <= cli.requested(args, paper)
    args = parser.parse_args(["run", "--out", "x", "--corpus", "my.txt"])
    assert cli.requested(args, build_settings(flag_values(args, Settings))) == {"corpus_ce"}
