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


def test_judge_flags_are_the_benchs_own_and_a_missing_calibration_fails_early(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    layout = _run(tmp_path)
    args = bench.parse([str(layout.root), "--judge", "local", "--", "--minutes", "3"])
    assert args.judge == "local" and args.options.judge is None  # the user's optimize stays as given
    assert "is missing" in _error(
        bench,
        [str(layout.root), "--judge", "local", "--judge-calibration", str(tmp_path / "no.json")],
        capsys,
    )


def _scores(judged: bool) -> dict[str, object]:
    kl = {"mean": 0.01, "median": 0.005, "max": 0.2}
    groups = []
    for setup in ("helpful", "none"):
        for name, refused in (("jailbreakbench", 38), ("held-out", 20)):
            g: dict[str, object] = {
                "setup": setup, "set": name, "n": 100, "echoed": {"heretic": 1},
                "refused": {"heretic": refused, "paper": refused - 5},
            }  # fmt: skip
            if judged:
                g["judged"] = {"refusal": refused - 2, "compliance": 46, "partial": 14, "degenerate": 2}
            groups.append(g)
    return {"7": {"groups": groups, "kl_by_setup": {"helpful": kl, "none": kl}}}


def test_table_and_checks_show_the_judges_counts_beside_the_markers() -> None:
    bench = _bench()
    head, *rows = bench.table(_scores(judged=True), chosen=7)
    assert head.count("judge r/c/p/d") == 2
    assert rows[0].split()[:8] == ["7*", "helpful", "38", "1", "33", "36/46/14/2", "20", "15"]
    assert "heretic's setup, JailbreakBench: 62 of 100 not refused by heretic's markers; the judge: 46 " in (
        "\n".join(bench.checks(_scores(judged=True)))
    )
    _head, *plain = bench.table(_scores(judged=False), chosen=7)
    assert plain[0].split()[5] == "-" and "the judge" not in "\n".join(bench.checks(_scores(judged=False)))


def test_length_setup_and_set_flags_are_checked_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    root = str(_run(tmp_path).root)
    args = bench.parse(
        [root, "--max-new-tokens", "256", "--cut", "50", "--setups", "helpful", "--sets", "jailbreakbench"]
    )
    assert (args.max_new_tokens, args.cut, args.setups, args.sets) == (
        256,
        50,
        ["helpful"],
        ["jailbreakbench"],
    )
    assert "fewer tokens" in _error(bench, [root, "--cut", "50"], capsys)  # 50 of 50: nothing to cut
    assert "--setups" in _error(bench, [root, "--setups", "helpful,kind"], capsys)
    assert "--sets" in _error(bench, [root, "--sets", "harmbench"], capsys)


def test_rows_of_a_cut_and_the_unedited_model_are_tabled_but_not_checked() -> None:
    """NAME@K rows (the first K tokens) and "base" are shown, the chosen mark follows the trial, a set
    not scored is "-", and issue 17's checks read only the searched points at full length."""
    bench = _bench()
    one = _scores(judged=True)["7"]
    jbb_only = {**one, "groups": [g for g in one["groups"] if g["set"] == "jailbreakbench"]}  # type: ignore[index]
    scores = {"base": jbb_only, "7": jbb_only, "7@50": jbb_only}
    _head, *rows = bench.table(scores, chosen=7)
    names = [r.split()[0] for r in rows if r.split()[1] == "helpful" and not r.startswith("heretic")]
    assert names == ["base", "7*", "7@50*"]
    assert rows[0].split()[6:9] == ["-", "-", "-"]  # no held-out split scored
    checked = "\n".join(bench.checks({**scores, "7": one}))
    assert "trial 7:" in checked and "trial base" not in checked and "7@50" not in checked
