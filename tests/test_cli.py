"""The command line: flags generated from Settings, help texts, and errors as exit code 2 without traces.

Every stage test here fails before a model would load, so no weights are needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from refusalkit.cli import STAGE_HELP, build_parser, main
from refusalkit.models.registry import BUILTIN_MODELS
from refusalkit.settings import Settings


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


@pytest.mark.parametrize("command", list(STAGE_HELP))
def test_help_has_every_field_description(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = _squash(capsys.readouterr().out)
    assert _squash(STAGE_HELP[command]) in out
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in out
        assert _squash(field.description or "") in out, name
        assert f"REFUSALKIT_{name.upper()}" in out


def test_flags_parse_to_settings_types() -> None:
    args = build_parser().parse_args(
        [
            "run",
            "--out",
            "x",
            "--no-filter-train",
            "--n-train",
            "7",
            "--kl-threshold",
            "0.5",
            "--refusal-tokens",
            "I,No",
        ]
    )
    assert args.filter_train is False and args.n_train == 7 and args.kl_threshold == 0.5
    assert args.refusal_tokens == "I,No" and args.seed is None  # unset flags stay None: lower sources win


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
    code = main(["run", "--out", str(tmp_path), "--n-train", "0", "--dtype", "int4"])
    err = capsys.readouterr().err
    assert code == 2 and "--n-train" in err and "--dtype" in err and "Traceback" not in err


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


def test_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text("n_train = [")
    assert main(["run", "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    assert "invalid TOML" in capsys.readouterr().err
