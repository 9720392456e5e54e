"""Chat-template formatting and post-instruction positions, derived from the template itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.errors import RefusalkitError

_SENTINEL = "Zq7xSENTINELxq7Z"


def _messages(instruction: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": instruction}]


def format_prompt(tokenizer: Any, instruction: str, system: str | None = None) -> str:
    """Render one user turn with the tokenizer's chat template, ready for the assistant's reply."""
    try:
        return str(
            tokenizer.apply_chat_template(
                _messages(instruction, system), tokenize=False, add_generation_prompt=True
            )
        )
    except Exception as exc:  # jinja raises its own errors, e.g. for templates without system roles
        if system:
            raise RefusalkitError(
                f"the chat template rejected a system prompt ({exc}); rerun without --system-prompt"
            ) from None
        raise


def format_prompts(tokenizer: Any, instructions: list[str], system: str | None = None) -> list[str]:
    return [format_prompt(tokenizer, x, system) for x in instructions]


def post_instruction_ids(tokenizer: Any, system: str | None = None) -> list[int]:
    """Token ids the template puts after the user's instruction (e.g. ChatML's
    ``<|im_end|> \\n <|im_start|> assistant \\n``), found by rendering a sentinel instruction."""
    text = format_prompt(tokenizer, _SENTINEL, system)
    end = text.find(_SENTINEL)
    if end < 0:
        raise RefusalkitError(
            "the chat template does not include the user's message verbatim; cannot locate it"
        )
    end += len(_SENTINEL)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [i for i, (start, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if start >= end]
    if not ids:
        raise RefusalkitError("the chat template puts no tokens after the instruction; nothing to read there")
    return ids


@dataclass
class Batch:
    """A tokenized batch. ``attention_mask`` marks real tokens; pad may sit on either side."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted over real tokens only, so padding (either side) does not shift them."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def last_index(self) -> torch.Tensor:
        """[batch] index of each row's last real token."""
        seq = self.attention_mask.shape[1]
        ar = torch.arange(seq, device=self.attention_mask.device)
        return (ar * self.attention_mask.long()).argmax(-1)

    def trailing_positions(self, n: int) -> torch.Tensor:
        """[batch, n] indices of each row's last ``n`` real tokens, in order."""
        offsets = torch.arange(-n + 1, 1, device=self.attention_mask.device)
        return self.last_index[:, None] + offsets[None, :]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))


def encode(tokenizer: Any, prompts: list[str], padding_side: str = "left") -> Batch:
    """Tokenize already-formatted prompts (the template holds any BOS) and pad them."""
    if not prompts:
        raise RefusalkitError("no prompts to encode")
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old
    return Batch(enc["input_ids"], enc["attention_mask"])


def _pad(rows: list[list[int]], pad_id: int, *, left: bool) -> Batch:
    if not rows or any(not r for r in rows):
        raise ValueError("every row needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return Batch(ids, mask)


def pad_left(rows: list[list[int]], pad_id: int) -> Batch:
    """Token id rows as one batch padded on the left: every row ends at the last column.

    The package's padding side for prompts (generation appends at the right); positions still come
    from the mask (``Batch.position_ids``), so the pads shift nothing.
    """
    return _pad(rows, pad_id, left=True)


def pad_right(rows: list[list[int]], pad_id: int) -> Batch:
    """Token id rows padded on the right: every row starts at column 0 (continuations after a
    shared prefix cache, whose positions run on from the prefix)."""
    return _pad(rows, pad_id, left=False)


def batches(items: list[Any], size: int) -> list[list[Any]]:
    if size < 1:
        raise RefusalkitError(f"batch size must be at least 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
