"""Chat setups: the system-prompt situations an edit must hold under.

A user brings their own system prompt, or none, or whatever the chat template puts there by default;
an edit chosen under one of these may still refuse under another (issue 17). So the search's proxy and
its verification run every prompt under each setup:

  none      an empty system turn: the template's default system prompt, if it has one, is kept out
            (Qwen2.5's template, given no system turn, writes "You are Qwen, created by Alibaba Cloud...")
  default   no system turn given: whatever the template writes by itself
  helpful   "You are a helpful assistant." (heretic's evaluation prompt)
  run       the run's own system prompt, when the run was made with one
  user1...  each --system-prompt TEXT

Setups whose renderings are identical (a template without a default system prompt may render "none"
and "default" alike) are kept once; a template that rejects a system turn (gemma's) drops the setups
that need one, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from refusalkit.errors import RefusalkitError

log = logging.getLogger(__name__)

HELPFUL = "You are a helpful assistant."
_PROBE = "Zq7xPROBExq7Z"  # an instruction no template changes, to compare renderings


@dataclass(frozen=True)
class ChatSetup:
    name: str
    system: str | None  # None: no system turn; "": an empty one

    def messages(self, instruction: str) -> list[dict[str, str]]:
        sys = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*sys, {"role": "user", "content": instruction}]

    def format(self, tokenizer: Any, instructions: Sequence[str]) -> list[str]:
        """Each instruction rendered with the chat template under this setup, ready for the reply."""
        return [
            str(tokenizer.apply_chat_template(self.messages(x), tokenize=False, add_generation_prompt=True))
            for x in instructions
        ]

    def as_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "system": self.system}


def named_setups(
    names: Sequence[str], user: Sequence[str] = (), run_system: str | None = None
) -> list[ChatSetup]:
    """The setups asked for, in order, then the run's own system prompt and the user's (unrendered)."""
    known = {"none": "", "default": None, "helpful": HELPFUL}
    out = [ChatSetup(n, known[n]) for n in names]
    if run_system and run_system not in [s.system for s in out]:
        out.append(ChatSetup("run", run_system))
    out += [ChatSetup(f"user{i}", text) for i, text in enumerate(user, 1)]
    return out


def usable_setups(tokenizer: Any, setups: Sequence[ChatSetup]) -> list[ChatSetup]:
    """The setups the template can render, each rendering once (see the module docstring)."""
    kept: list[ChatSetup] = []
    seen: dict[str, str] = {}
    for s in setups:
        try:
            text = s.format(tokenizer, [_PROBE])[0]
        except Exception as exc:  # jinja raises its own errors, e.g. for templates without a system role
            log.warning("chat setup %r skipped: the chat template rejects it (%s)", s.name, exc)
            continue
        if text in seen:
            log.info("chat setup %r renders as %r does; kept once", s.name, seen[text])
            continue
        seen[text] = s.name
        kept.append(s)
    if not kept:
        raise RefusalkitError(
            "the chat template renders none of the chat setups asked for; add --setups default"
        )
    return kept


__all__ = ["HELPFUL", "ChatSetup", "named_setups", "usable_setups"]
