"""bench/user_path.py's argument handling (the bench itself runs the real model; the coordinator runs it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from refusalkit.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("user_path", ROOT / "bench" / "user_path.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path) -> RunLayout:
    layout = RunLayout(tmp_path / "run")
    layout.candidates.parent.mkdir(parents=True)
    layout.candidates.write_bytes(b"")  # only its presence is checked before the model loads
    return layout


def _error(bench: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        bench.parse(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_flags_after_the_separator_are_optimizes_own(tmp_path: Path) -> None:
    bench = _bench()
    layout = _run(tmp_path)
    args = bench.parse(
        [str(layout.root), "--trial", "3", "--trial", "5", "--", "--minutes", "3", "--system-prompt", "a, b"]
    )
    assert args.trial == [3, 5] and args.optimize_flags == ["--minutes", "3", "--system-prompt", "a, b"]
    assert args.options.minutes == 3 and args.options.system_prompts == ["a, b"]
    default = bench.parse([str(layout.root)]).options  # no flags: `refusalkit optimize RUN_DIR` as it is
    assert default.model_fields_set == set() and not default.choosing_only()


def test_bad_arguments_fail_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    assert "refusalkit run" in _error(bench, [str(tmp_path / "nothing")], capsys)
    layout = _run(tmp_path)
    assert "--trials" in _error(bench, [str(layout.root), "--", "--trials", "0"], capsys)
    assert "not allowed with" in _error(bench, [str(layout.root), "--fresh", "--skip-optimize"], capsys)
    assert "chosen.json is missing" in _error(bench, [str(layout.root), "--skip-optimize"], capsys)
    layout.chosen.parent.mkdir(parents=True)
    layout.chosen.write_text("{}")
    assert "--fresh" in _error(bench, [str(layout.root)], capsys)  # a search exists: say what to do
    assert bench.parse([str(layout.root), "--fresh"]).fresh
    assert bench.parse([str(layout.root), "--skip-optimize"]).skip_optimize
    assert "no optimize flags" in _error(
        bench, [str(layout.root), "--skip-optimize", "--", "--minutes", "2"], capsys
    )
