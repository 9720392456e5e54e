"""What the edit tests share: a few chat prompts and the logits of their real (non-pad) positions."""

from __future__ import annotations

from typing import Any

import torch

from refusalkit.prompts import Batch, encode, format_prompts

INSTRUCTIONS = ["hi", "Name a colour of the sky at dusk.", "Why?"]


def prompt_batch(lm: Any) -> Batch:
    return encode(lm.tokenizer, format_prompts(lm.tokenizer, INSTRUCTIONS), "left")


@torch.no_grad()
def real_logits(model: Any, batch: Batch) -> torch.Tensor:
    """[real positions, vocab]: the logits of every non-pad position of ``batch``."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.logits[batch.attention_mask.bool()]


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding of the forward pass: 1e-4 of the largest logit."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))
