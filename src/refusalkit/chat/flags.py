"""Command-line flags from a pydantic options model: required fields become positionals, the rest
``--flags``, and each field's description is its help text (the pattern of ``Settings``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from refusalkit.errors import RefusalkitError

T = TypeVar("T", bound=BaseModel)


def add_option_flags(parser: argparse.ArgumentParser, options: type[BaseModel]) -> None:
    for name, field in options.model_fields.items():
        typ = field.annotation
        kind: Any = typ if typ in (int, float, Path) else str
        if field.is_required():
            parser.add_argument(name, type=kind, help=field.description)
        elif typ is bool:
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=field.description,
            )
        else:
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                type=kind,
                default=field.default,
                help=f"{field.description} [default: {field.default}]",
            )


def options_from(args: argparse.Namespace, options: type[T]) -> T:
    """Validate the parsed flags, reporting every invalid one at once."""
    values = {name: getattr(args, name) for name in options.model_fields if hasattr(args, name)}
    try:
        return options.model_validate(values)
    except ValidationError as exc:
        lines = [
            f"  --{'.'.join(str(x) for x in e['loc']).replace('_', '-')}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        raise RefusalkitError("invalid options:\n" + "\n".join(lines)) from None
