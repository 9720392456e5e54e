"""Settings: one class, five sources with a fixed precedence, all errors reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from refusalkit.errors import RefusalkitError
from refusalkit.settings import Settings, build_settings, env_values, toml_values


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REFUSALKIT_DATA", "REFUSALKIT_N_TRAIN", "REFUSALKIT_PRESET", "REFUSALKIT_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = build_settings(environ={})
    assert s == Settings()
    assert s.n_train == 64 and s.seed == 42 and s.refusal_tokens == ["I", "As"] and s.preset is None


def test_precedence(tmp_path: Path) -> None:
    """defaults < preset < TOML < environment < flags, one key at a time."""
    config = _toml(tmp_path, 'preset = "paper"\nn_val = 5\nn_test = 6\nseed = 1\nmodel = "from-toml"\n')
    env = {"REFUSALKIT_N_TEST": "7", "REFUSALKIT_SEED": "2", "REFUSALKIT_MODEL": "from-env"}
    s = build_settings({"model": "from-flag", "batch_size": None}, config=config, environ=env)
    assert s.batch_size == 32  # default (a None flag is "not given")
    assert s.n_train == 128  # preset over default
    assert s.max_new_tokens == 256  # preset
    assert s.n_val == 5  # TOML over preset
    assert s.n_test == 7  # env over TOML and preset
    assert s.seed == 2  # env over TOML
    assert s.model == "from-flag"  # flag over env and TOML


def test_preset_from_env_or_flag(tmp_path: Path) -> None:
    assert build_settings(environ={"REFUSALKIT_PRESET": "quick"}).n_train == 16
    s = build_settings({"preset": "quick", "n_test": 3}, environ={})
    assert (s.n_train, s.n_val, s.n_test, s.max_new_tokens) == (16, 4, 3, 24)


def test_paper_preset_paths(tmp_path: Path) -> None:
    s = build_settings({"preset": "paper", "data_dir": str(tmp_path)}, environ={})
    assert (s.n_train, s.n_val, s.n_test) == (128, 32, 100)
    for spec in (
        s.harmful_train,
        s.harmless_train,
        s.harmful_val,
        s.harmless_val,
        s.harmful_test,
        s.harmless_test,
    ):
        assert spec is not None and Path(spec).is_relative_to(tmp_path / "refusal_direction")
    assert s.harmful_test is not None and s.harmful_test.endswith("jailbreakbench.json")
    # REFUSALKIT_DATA moves the default data folder, and the preset follows it.
    env_dir = tmp_path / "elsewhere"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSALKIT_DATA", str(env_dir))
        s = build_settings({"preset": "paper"}, environ={})
    assert s.data_dir == str(env_dir) and Path(s.harmful_train).is_relative_to(env_dir)


def test_env_parsing() -> None:
    env = {
        "REFUSALKIT_FILTER_TRAIN": "false",
        "REFUSALKIT_REFUSAL_TOKENS": "I,Sorry",
        "REFUSALKIT_KL_THRESHOLD": "0.25",
        "UNRELATED": "1",
    }
    assert set(env_values(env)) == {"filter_train", "refusal_tokens", "kl_threshold"}
    s = build_settings(environ=env)
    assert s.filter_train is False and s.refusal_tokens == ["I", "Sorry"] and s.kl_threshold == 0.25


def test_toml_table_and_dashes(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[refusalkit]\nn-train = 9\nkl-threshold = 0.5\n")
    assert toml_values(path) == {"n_train": 9, "kl_threshold": 0.5}
    assert build_settings(config=path, environ={}).n_train == 9


def test_all_errors_at_once(tmp_path: Path) -> None:
    with pytest.raises(RefusalkitError) as err:
        build_settings({"n_train": 0, "dtype": "float8", "kl_threshold": -1.0, "preset": "huge"}, environ={})
    msg = str(err.value)
    assert msg.startswith("invalid settings:")
    for flag in ("--n-train", "--dtype", "--kl-threshold", "--preset"):
        assert flag in msg
    assert "float8" in msg and "known: paper, quick" in msg


def test_unknown_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(RefusalkitError, match="--n-trian"):
        build_settings(config=_toml(tmp_path, "n_trian = 3\n"), environ={})


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(RefusalkitError, match="not found"):
        build_settings(config=tmp_path / "missing.toml", environ={})
    with pytest.raises(RefusalkitError, match="invalid TOML"):
        build_settings(config=_toml(tmp_path, "n_train = = 3"), environ={})


def test_bad_env_value_is_reported() -> None:
    with pytest.raises(RefusalkitError, match="--batch-size"):
        build_settings(environ={"REFUSALKIT_BATCH_SIZE": "many"})


def test_paper_preset_scores_kl_as_the_paper_code() -> None:
    assert build_settings({"preset": "paper"}, environ={}).kl_definition == "paper"
    assert build_settings(environ={}).kl_definition == "exact"
    assert build_settings(environ={}).kl_n >= 100  # issue 7: KL on at least 100 prompts by default
    with pytest.raises(RefusalkitError, match="--kl-definition"):
        build_settings({"kl_definition": "approx"}, environ={})


def test_settings_are_the_union_of_the_stage_options() -> None:
    from refusalkit.settings import STAGE_OPTIONS

    union = {n for cls in STAGE_OPTIONS["run"] for n in cls.model_fields}
    assert union == set(Settings.model_fields)
    assert "gsm8k_n" not in {n for cls in STAGE_OPTIONS["select"] for n in cls.model_fields}


def test_any_options_class_gets_flags_toml_and_env(tmp_path: Path) -> None:
    """The same mechanism serves other commands' options classes, with their own TOML table."""
    import argparse
    from typing import ClassVar

    from pydantic import BaseModel, Field

    from refusalkit import options

    class Knobs(BaseModel):
        env_prefix: ClassVar[str] = "REFUSALKIT_KNOBS_"
        steps: int = Field(5, ge=1, description="Steps.", json_schema_extra={"flags": ["--n-steps"]})
        names: list[str] = Field([], description="Names.")
        quick: bool = Field(False, description="Quick.")

    parser = argparse.ArgumentParser()
    options.add_flags(parser, Knobs)
    args = parser.parse_args(["--n-steps", "7", "--names", "a,b"])
    assert options.flag_values(args, Knobs) == {"steps": 7, "names": ["a", "b"]}
    config = _toml(tmp_path, 'steps = 1\n[knobs]\nquick = true\nnames = ["x"]\n')
    env = {"REFUSALKIT_KNOBS_STEPS": "9", "REFUSALKIT_STEPS": "100"}  # the plain prefix is not theirs
    k = options.build_options(Knobs, config=config, environ=env, table="knobs")
    assert (k.steps, k.names, k.quick) == (9, ["x"], True)
    k = options.build_options(Knobs, flags={"steps": 2}, config=config, environ=env, table="knobs")
    assert k.steps == 2
    with pytest.raises(RefusalkitError, match="--steps"):
        options.build_options(Knobs, flags={"steps": 0}, environ={})
