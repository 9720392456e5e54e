"""Command-line flags from a pydantic options class: one ``--flag`` per field, its description the help
text (the pattern of ``Settings``). Positional arguments (the run folder) are added by each command.

``options_from`` reads only the flags present in the parsed arguments, so it also accepts a parser
that omits flags the user did not type (``argparse.SUPPRESS`` defaults)."""

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
        if typ is bool:
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
