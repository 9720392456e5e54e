"""Batched greedy generation (with whatever interventions are active around the call)."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from refusalkit.interventions import token_mask
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import batches, encode


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "generating",
) -> list[str]:
    """Greedy completions of formatted prompts, in input order.

    Prompts are batched by length (less padding); left padding, as generation needs. Stops at EOS.
    """
    tok = lm.tokenizer
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, str] = {}
    eos: Any = lm.model.generation_config.eos_token_id or tok.eos_token_id
    for chunk in tqdm(batches(order, batch_size), desc=desc, leave=False, disable=None):
        batch = encode(tok, [prompts[i] for i in chunk], padding_side="left").to(lm.device)
        with token_mask(batch.attention_mask):
            ids = lm.model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos,
            )
        texts = tok.batch_decode(ids[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        out.update(zip(chunk, texts, strict=True))
    return [out[i] for i in range(len(prompts))]
