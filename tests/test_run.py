"""The run reader (run.RunFolder): one precedence of settings, one error per missing piece, and which
edit is active."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.run import RunFolder, parse_edit_choice
from refusalkit.settings import Settings
from refusalkit.utils import write_json
from test_model_card import CHOSEN, add_search


def make_run(root: Path) -> RunFolder:
    layout = RunLayout(root)
    write_json(layout.manifest, {"settings": {"model": "saved-model", "n_train": 8, "seed": 3}, "stages": {}})
    return RunFolder(root)


def test_settings_precedence_saved_toml_environment_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """defaults < saved settings < TOML < environment < flags, the environment read by every command."""
    run = make_run(tmp_path / "run")
    monkeypatch.delenv("REFUSALKIT_N_TRAIN", raising=False)
    monkeypatch.delenv("REFUSALKIT_SEED", raising=False)
    s = run.settings()
    assert (s.model, s.n_train, s.seed, s.n_val) == (
        "saved-model",
        8,
        3,
        Settings.model_fields["n_val"].default,
    )
    toml = tmp_path / "c.toml"
    toml.write_text("n_train = 16\nseed = 4\n")
    assert (run.settings(config=toml).n_train, run.settings(config=toml).seed) == (16, 4)
    monkeypatch.setenv("REFUSALKIT_N_TRAIN", "24")
    s = run.settings(config=toml)
    assert (s.n_train, s.seed, s.model) == (24, 4, "saved-model")
    assert run.settings({"n_train": 32}, toml).n_train == 32


def test_each_missing_piece_is_one_error_naming_the_command_that_makes_it(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "nothing")
    for read in (run.settings, lambda: run.manifest, run.active_edit):
        with pytest.raises(
            RefusalkitError, match=r"is not a run folder \(no manifest.json\).*refusalkit run --out"
        ):
            read()
    run = make_run(tmp_path / "run")
    root = run.root
    cases = [
        (
            run.direction,
            rf"{root} has no selected direction \(select/direction.json is missing\); run `refusalkit select {root}` first",
        ),
        (
            run.candidates,
            rf"has no candidates \(extract/candidates.safetensors is missing\); run `refusalkit extract {root}`",
        ),
        (run.splits, r"has no splits \(data/splits.json is missing\); run `refusalkit extract"),
        (run.front, r"has no search front \(search/front.json is missing\); run `refusalkit optimize"),
        (run.chosen, r"has no chosen edit \(search/chosen.json is missing\); run `refusalkit optimize"),
        (lambda: run.active_edit(), r"has no selected direction"),
        (lambda: run.active_edit("search"), r"has no chosen edit"),
        (lambda: run.active_edit("trial:3"), r"has no search front"),
    ]
    for read, message in cases:
        with pytest.raises(RefusalkitError, match=message):
            read()
    with pytest.raises(RefusalkitError, match=r"--edit 'trial 3': use direction, search or trial:N"):
        run.active_edit("trial 3")


def test_the_active_edit_is_the_searchs_choice_else_the_direction(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    Direction(torch.ones(64), layer=2, position=-1).save(run.layout.direction)
    assert run.active_edit().kind == "direction" and run.active_edit().choice == "direction"
    params = add_search(run.layout)
    active = run.active_edit()
    assert (active.kind, active.trial, active.chosen, active.choice) == ("search", CHOSEN, True, "search")
    assert active.params == params and active.record_path == run.layout.front
    assert active.label == f"the search's chosen edit (trial {CHOSEN})"
    assert run.active_edit(f"trial:{CHOSEN}").choice == "search"  # the chosen trial by number: the same edit
    other = run.active_edit("trial:3")
    assert (other.label, other.choice, other.chosen) == ("the search's trial 3", "trial:3", False)
    assert run.active_edit("direction").kind == "direction"
    with pytest.raises(RefusalkitError, match=r"trial 99 is not on the search front .*\[3, 7\].*--trial 99"):
        run.active_edit("trial:99")
    write_json(run.layout.chosen, {"trial": CHOSEN})
    with pytest.raises(RefusalkitError, match=r"chosen.json holds no readable edit.*--edit direction"):
        run.active_edit()
    assert run.active_edit("direction").kind == "direction"


def test_parse_edit_choice() -> None:
    assert parse_edit_choice(None).kind is None
    assert parse_edit_choice(" search ").kind == "search"
    assert (parse_edit_choice("trial:12").kind, parse_edit_choice("trial:12").trial) == ("search", 12)
    for bad in ("trial:", "trial:-1", "searched", "trial 3", ""):
        with pytest.raises(RefusalkitError, match="use direction, search or trial:N"):
            parse_edit_choice(bad)
