"""`refusalkit chat RUN_DIR`: talk to the original and the edited model in the terminal, streamed.

Each setting (original, edited, ablation, add C) keeps its own conversation, rendered by the chat
template every turn. ``/both`` answers every prompt twice, labelled: the original model, then the
current setting. Model output is printed with control characters replaced, so a reply cannot move the
cursor or recolour the terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from typing import TextIO

from refusalkit.chat.engine import ChatModel, Message
from refusalkit.chat.options import ChatOptions, Setting, standalone
from refusalkit.errors import RefusalkitError
from refusalkit.options import options_from_args

HELP = """commands:
  /original     answer with the original model
  /edited       answer with the edited model ({edited})
  /ablation     answer with the directional-ablation hooks
  /add C        add C x the direction at its layer (+1 strengthens refusal, -1 weakens it)
  /both         side by side on/off: the original model and the current setting answer each prompt
  /reset        forget every conversation
  /help         this list
  /quit         leave (also Ctrl-D); Ctrl-C stops an answer
Each setting keeps its own conversation."""


def printable(text: str) -> str:
    """``text`` with control characters other than newline and tab shown as U+FFFD."""
    return "".join(c if c in "\n\t" or not (ord(c) < 32 or 127 <= ord(c) < 160) else "\ufffd" for c in text)


@dataclass
class Terminal:
    """The chat loop over one ``ChatModel``; reads lines with ``read`` and writes to ``out``."""

    model: ChatModel
    out: TextIO
    max_new_tokens: int = 256
    setting: Setting = field(default_factory=lambda: Setting("edited"))
    both: bool = False
    histories: dict[str, list[Message]] = field(default_factory=dict)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def loop(self, read: Callable[[str], str] = input) -> int:
        """Read and answer until /quit or end of input; returns the exit status."""
        self.say(f"setting: {self.describe()}. /help lists the commands.")
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                self.say("")
                return 0
            except KeyboardInterrupt:
                self.say("")
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.ask(line)

    def describe(self) -> str:
        return f"side by side: original | {self.right().label}" if self.both else self.setting.label

    def right(self) -> Setting:
        """The setting compared with the original in side-by-side mode."""
        return Setting("edited") if self.setting.kind == "original" else self.setting

    def command(self, line: str) -> bool:
        """Run one /command; False means quit."""
        name, _, arg = line[1:].partition(" ")
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.say(HELP.format(edited=self.model.edited_label))
        elif name == "reset":
            self.histories.clear()
            self.say("conversations cleared")
        elif name == "both":
            self.both = not self.both
            self.say(f"setting: {self.describe()}")
        elif name in ("original", "edited", "ablation", "add"):
            try:
                self.setting = Setting.parse(f"{name} {arg}".strip())
            except RefusalkitError as exc:
                self.say(str(exc))
                return True
            self.say(f"setting: {self.describe()}")
        else:
            self.say(f"unknown command /{name}; /help lists the commands")
        return True

    def ask(self, text: str) -> None:
        settings = [Setting("original"), self.right()] if self.both else [self.setting]
        for setting in settings:
            if not self.answer(setting, text):
                break

    def answer(self, setting: Setting, text: str) -> bool:
        """Stream one labelled answer; keep the turn in that setting's conversation. False if stopped."""
        history = self.histories.setdefault(setting.label, [])
        messages = [*history, {"role": "user", "content": text}]
        self.out.write(f"{setting.label}> ")
        self.out.flush()
        pieces: list[str] = []
        try:
            with closing(self.model.stream(messages, setting, self.max_new_tokens)) as stream:
                for piece in stream:
                    pieces.append(piece)
                    self.out.write(printable(piece))
                    self.out.flush()
        except KeyboardInterrupt:
            self.say("\n[stopped; this turn is not kept]")
            return False
        self.say("")
        history[:] = [*messages, {"role": "assistant", "content": "".join(pieces)}]
        return True


def run_chat(args: argparse.Namespace) -> int:
    from refusalkit.chat.engine import load_chat_model

    opts = options_from_args(args, ChatOptions)
    start = Setting.parse(opts.setting)
    print(f"loading the model of {args.run_dir} ...", file=sys.stderr)
    model = load_chat_model(args.run_dir, opts.edit)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    terminal = Terminal(model, sys.stdout, opts.max_new_tokens, start, opts.both)
    terminal.say(f"refusalkit chat: {model.lm.name}; edited = {model.edited_label}")
    numbers = model.numbers()
    if numbers is not None:
        terminal.say(f"edited, measured: {numbers.summary()} (from {numbers.source})")
    try:
        return terminal.loop()
    finally:
        model.close()


def main(argv: list[str] | None = None) -> int:
    return standalone("refusalkit chat", ChatOptions, run_chat, argv)
