"""Restarting a recorded forward pass at a layer, with a vector added to the residual stream there.

Activation addition at layer l leaves every layer below l untouched, so its pass can start at block
l from the unedited pass's resid_pre[l]: ``Recorder`` keeps each block's input and call arguments
(mask, rotary embeddings; not the KV cache) during the unedited pass, ``run_blocks`` calls blocks l..
again on the recorded input plus the vector, with a fresh cache, and ``head_logits`` applies the
model's own head. Selection scores candidates this way (``selection.passes.ResidReplay``), and the
coherence measurement computes the actadd setting this way. Callers check once that a replay without
a vector reproduces the model's own logits, since an architecture whose blocks take other arguments
would not replay exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from refusalkit.interventions import hooks, register_pre
from refusalkit.models.loading import LoadedModel

Calls = dict[int, tuple[torch.Tensor, dict[str, Any]]]  # block -> (its input, its other arguments)


class Recorder:
    """Pre-hooks that keep each block's input and call arguments during one forward pass (the KV
    cache argument left out: a replay passes its own). Inputs are kept for ``layers`` only."""

    def __init__(self, lm: LoadedModel, layers: list[int]) -> None:
        self.lm, self.layers = lm, layers
        self.cache_key: str | None = None  # the blocks' name for their KV-cache argument

    @contextmanager
    def recording(self) -> Iterator[Calls]:
        from transformers import Cache

        calls: Calls = {}

        def make(layer: int) -> Any:
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if args[1:]:
                    raise TypeError("decoder block called with extra positional arguments")
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {}
                for k, v in kwargs.items():
                    if isinstance(v, Cache):
                        self.cache_key = k
                    elif k != "hidden_states":
                        rest[k] = v
                # other layers keep no input (an empty slice would hold the whole tensor alive)
                calls[layer] = (hidden if layer in self.layers else hidden.new_empty(0), rest)

            return hook

        blocks = self.lm.arch.blocks
        regs = [register_pre(blocks[i], make(i)) for i in range(min(self.layers), len(blocks))]
        with hooks(regs):
            yield calls


def run_blocks(
    lm: LoadedModel, calls: Calls, layer: int, vectors: torch.Tensor, mask: torch.Tensor | None,
    cache: Any, cache_key: str | None,
) -> torch.Tensor:  # fmt: skip
    """Blocks ``layer``.. on the recorded resid_pre[layer] plus each of the k ``vectors`` ([k, d]):
    [k * b, seq, d] out, candidate-major rows (every recorded per-row argument repeated k times).
    ``mask``: the recorded pass's attention mask over its own tokens ([b, >= seq]; None: all real);
    pad positions get no vector, as in ``interventions.add_direction``."""
    k, h = vectors.shape[0], calls[layer][0]
    b = h.shape[0]
    work = torch.promote_types(h.dtype, torch.float32)
    delta = vectors.double().to(device=h.device, dtype=work).repeat_interleave(b, 0)[:, None, :]
    m = torch.ones(h.shape[:2]) if mask is None else mask[:, -h.shape[1] :]
    m = m.to(device=h.device, dtype=work).repeat(k, 1)[..., None]
    # As add_direction: float32 at least, pad positions never steered, one rounding.
    h = (h.to(work).repeat(k, 1, 1) + m * delta).to(h.dtype)
    for i in range(layer, len(lm.arch.blocks)):
        kwargs = {name: repeat_rows(v, b, k) for name, v in calls[i][1].items()}
        if cache_key is not None:
            kwargs[cache_key] = cache
        out = lm.arch.blocks[i](h, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    return h


def head_logits(lm: LoadedModel, h: torch.Tensor) -> torch.Tensor:
    """[b, s, d] last-block output -> [b, s, vocab] float32 logits, as the model's own head computes them."""
    arch = lm.arch
    logits = arch.unembed(arch.final_norm(h)).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def repeat_rows(value: Any, b: int, k: int) -> Any:
    """A recorded block argument for k candidates: tensors with b rows (the batch) repeated k times,
    candidate-major; one-row tensors broadcast as they are; anything else unchanged."""
    if k == 1:
        return value
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b and b > 1:
        return value.repeat(k, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(repeat_rows(v, b, k) for v in value)
    return value
