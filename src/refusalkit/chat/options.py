"""The command-line pieces of `refusalkit chat` and `refusalkit serve`, torch-free: the settings a model
answers under, the options classes and RUN_DIR. The command table builds their flags from here, so
`refusalkit chat --help` and its argument errors import no model code (the engine imports torch)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refusalkit.errors import RefusalkitError
from refusalkit.options import add_flags
from refusalkit.run import EditOption

KINDS = ("original", "edited", "ablation", "add")


@dataclass(frozen=True)
class Setting:
    """How the model answers. ``coeff`` is used by ``add`` only."""

    kind: str = "original"
    coeff: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RefusalkitError(f"unknown setting {self.kind!r}; use one of {', '.join(KINDS)}")

    @property
    def label(self) -> str:
        return f"add {self.coeff:+g}" if self.kind == "add" else self.kind

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``original``, ``edited``, ``ablation`` or ``add C`` (also ``add:C``)."""
        kind, _, rest = text.strip().replace(":", " ").partition(" ")
        if kind != "add":
            return cls(kind)
        try:
            return cls("add", float(rest))
        except ValueError:
            raise RefusalkitError(f"`add` needs a number, e.g. `add 1` or `add -1`; got {rest!r}") from None


def run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", type=Path, help="Run folder with a selected direction; its manifest names the model."
    )


class ChatOptions(EditOption):
    """Options of `refusalkit chat`."""

    model_config = ConfigDict(extra="forbid")
    env_prefix: ClassVar[str] = "REFUSALKIT_CHAT_"  # REFUSALKIT_MAX_NEW_TOKENS is the run's setting

    setting: str = Field(
        "edited", description="Setting to start with: original, edited, ablation or 'add C'."
    )
    both: bool = Field(False, description="Start side by side (original and the setting answer each prompt).")
    max_new_tokens: int = Field(256, ge=1, description="Most new tokens per answer.")

    @field_validator("setting")
    @classmethod
    def _setting(cls, v: str) -> str:
        try:
            Setting.parse(v)
        except RefusalkitError as exc:
            raise ValueError(str(exc)) from None
        return v


class ServeOptions(EditOption):
    """Options of `refusalkit serve`."""

    model_config = ConfigDict(extra="forbid")
    env_prefix: ClassVar[str] = "REFUSALKIT_SERVE_"  # REFUSALKIT_MAX_NEW_TOKENS is the run's setting

    host: str = Field(
        "127.0.0.1", description="Address to listen on (the default is reachable from this machine only)."
    )
    port: int = Field(8765, ge=0, le=65535, description="Port to listen on; 0 picks a free one.")
    browser: bool = Field(
        True, description="Open the page in the default browser (--no-browser: only print its address)."
    )
    max_new_tokens: int = Field(256, ge=1, description="Most new tokens per answer.")


def standalone(
    prog: str, options: type[BaseModel], command: Callable[[argparse.Namespace], int], argv: list[str] | None
) -> int:
    """``python -m refusalkit.chat`` / ``.serve``: RUN_DIR and the command's flags, errors printed as the
    ``refusalkit`` command prints them."""
    parser = argparse.ArgumentParser(prog=prog)
    run_dir_argument(parser)
    add_flags(parser, options)
    try:
        return command(parser.parse_args(argv))
    except RefusalkitError as exc:
        print(f"refusalkit: error: {exc}", file=sys.stderr)
        return 2
