"""Options classes as command-line flags, TOML keys and ``REFUSALKIT_*`` environment variables.

Any pydantic ``BaseModel`` is an options class: each field becomes a flag (``n_train`` ->
``--n-train``; booleans get ``--x/--no-x``; lists take comma-separated values; ``Literal`` types become
choices), a TOML key (``n_train`` or ``n-train``) and an environment variable (``REFUSALKIT_N_TRAIN``).
The field's description is its help text. Extra flag spellings go in
``Field(json_schema_extra={"flags": ["--steps"]})``; a class whose field names would clash with another
command's variables sets its own prefix, ``env_prefix: ClassVar[str] = "REFUSALKIT_SUFFIX_"``.

Sources, lowest first: field defaults < ``base`` (e.g. a run's saved settings) < TOML file <
environment < flags. Flags default to "not given", so only the flags a user typed override the other
sources. Validation errors of every source are reported at once, named by their flags.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from refusalkit.errors import RefusalkitError

ENV_PREFIX = "REFUSALKIT_"
M = TypeVar("M", bound=BaseModel)


def env_prefix(cls: type[BaseModel]) -> str:
    return str(getattr(cls, "env_prefix", ENV_PREFIX))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(_base_type(annotation)) is list


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that needs the other values
            return "computed"
    else:
        value = field.default
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def add_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type[BaseModel],
    *,
    title: str | None = None,
    only: Iterable[str] | None = None,
) -> None:
    """Add one flag per field of ``cls`` (or of the fields in ``only``) to ``parser``, as one group."""
    wanted = None if only is None else set(only)
    group = parser.add_argument_group(title or f"options (also TOML keys and {ENV_PREFIX}* variables)")
    for name, field in cls.model_fields.items():
        if wanted is not None and name not in wanted:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        spellings = [flag(name), *extra.get("flags", [])]  # type: ignore[misc]
        typ = _base_type(field.annotation)
        help_text = f"{field.description or ''} [default: {_default_text(field)}; env {env_prefix(cls)}{name.upper()}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if typ is bool:
            group.add_argument(*spellings, action=argparse.BooleanOptionalAction, **kwargs)
        elif _is_list(field.annotation):
            group.add_argument(*spellings, metavar="A,B", **kwargs)
        elif typing.get_origin(typ) is typing.Literal:
            group.add_argument(*spellings, choices=[str(c) for c in typing.get_args(typ)], **kwargs)
        else:
            group.add_argument(*spellings, type=typ if typ in (int, float) else str, **kwargs)


def flag_values(args: argparse.Namespace, cls: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``cls`` given as flags (flags not typed are absent from ``args``)."""
    return _split_lists(cls, {k: v for k, v in vars(args).items() if k in cls.model_fields})


def _split_lists(cls: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """Comma-separated strings (flags, environment) -> lists, for list fields."""
    out = dict(values)
    for name, v in values.items():
        if isinstance(v, str) and name in cls.model_fields and _is_list(cls.model_fields[name].annotation):
            out[name] = [s.strip() for s in v.split(",") if s.strip()]
    return out


def env_values(cls: type[BaseModel], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    prefix = env_prefix(cls)
    found = {n: environ[prefix + n.upper()] for n in cls.model_fields if prefix + n.upper() in environ}
    return _split_lists(cls, found)


def toml_values(path: str | Path, table: str | None = "refusalkit") -> dict[str, Any]:
    """The ``[table]`` of a TOML file if it has one, else its top-level keys (sub-tables skipped, so one
    file can hold a table per command). Dashes in keys become underscores."""
    path = Path(path)
    if not path.is_file():
        raise RefusalkitError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RefusalkitError(f"{path}: invalid TOML ({exc}); fix the file") from None
    if table and isinstance(data.get(table), dict):
        data = data[table]
    else:
        data = {k: v for k, v in data.items() if not isinstance(v, dict)}
    return {k.replace("-", "_"): v for k, v in data.items()}


def layered(
    cls: type[BaseModel],
    *,
    flags: Mapping[str, Any] | None = None,
    config: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    table: str | None = "refusalkit",
) -> dict[str, Any]:
    """The explicit values of every source merged by precedence (defaults not included)."""
    saved = {k: v for k, v in (base or {}).items() if v is not None and k in cls.model_fields}
    toml = toml_values(config, table) if config else {}
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    return {**saved, **toml, **env_values(cls, environ), **_split_lists(cls, given)}


def validate(cls: type[M], values: Mapping[str, Any]) -> M:
    """``cls(**values)``, with every validation error in one RefusalkitError named by its flag."""
    try:
        return cls(**values)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"][:1]) or "settings"
            lines.append(f"  {flag(loc)}: {err['msg']} (got {err.get('input')!r})")
        raise RefusalkitError("invalid settings:\n" + "\n".join(lines)) from None


def build_options(
    cls: type[M],
    *,
    flags: Mapping[str, Any] | None = None,
    config: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    table: str | None = "refusalkit",
) -> M:
    """Merge defaults, ``base``, the TOML file, the environment and the flags; validate."""
    return validate(cls, layered(cls, flags=flags, config=config, environ=environ, base=base, table=table))


def options_from_args(
    args: argparse.Namespace, cls: type[M], *, table: str | None = None, base: Mapping[str, Any] | None = None
) -> M:
    """``cls`` from a parsed command line: its flags, ``--config`` (if the command has one), environment."""
    return build_options(
        cls, flags=flag_values(args, cls), config=getattr(args, "config", None), base=base, table=table
    )
