"""Forward passes that read the residual stream: streaming mean activations and last-token logits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refusalkit.errors import RefusalkitError
from refusalkit.interventions import capture_resid_pre, token_mask
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import Batch, batches, encode

log = logging.getLogger(__name__)


@torch.inference_mode()
def last_logits(lm: LoadedModel, batch: Batch) -> torch.Tensor:
    """[batch, vocab] float32 logits at each row's last real token, for either padding side."""
    batch = batch.to(lm.device)
    left_padded = bool(batch.attention_mask[:, -1].all())
    with token_mask(batch.attention_mask):
        out = lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            # Only the last position's logits are needed; skipping the rest saves the vocab matmul.
            logits_to_keep=1 if left_padded else 0,
        )
    logits = out.logits
    if left_padded:
        return logits[:, -1].float()
    idx = batch.last_index.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx].float()


def logits_for_prompts(lm: LoadedModel, prompts: list[str], batch_size: int) -> torch.Tensor:
    """[n, vocab] last-token logits for formatted prompts, in input order.

    Prompts are batched in order of length, so little compute goes to padding.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [last_logits(lm, encode(lm.tokenizer, [prompts[i] for i in chunk])).cpu() for chunk in batches(order, batch_size)]
    logits = torch.cat(out)
    result = torch.empty_like(logits)
    result[torch.tensor(order)] = logits
    return result


@dataclass
class MeanActivations:
    """Means of resid_pre over prompts at the post-instruction positions.

    mean: [n_positions, n_layers, d_model] float64; position p is token -(n_positions - p) from the end.
    kept: how many prompts went into the mean (those the ``keep`` filter accepted).
    metrics: the per-prompt value the filter saw (e.g. the refusal metric), in input order.
    """

    mean: torch.Tensor
    kept: int
    total: int
    metrics: list[float]


@torch.inference_mode()
def mean_activations(
    lm: LoadedModel,
    prompts: list[str],
    n_positions: int,
    *,
    batch_size: int = 16,
    metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep_sign: int | None = None,
    padding_side: str = "left",
    desc: str = "activations",
) -> MeanActivations:
    """Stream the mean resid_pre of every layer at the last ``n_positions`` tokens of each prompt.

    Sums accumulate in float64 on each layer's own device; only one batch's slice of activations
    ([batch, n_positions, d_model] per layer) is held at a time, so memory does not grow with the
    number of prompts. ``metric(logits) -> [batch]`` is computed from the last-token logits in the same
    pass; with ``keep_sign`` +1 (or -1) only prompts whose metric is > 0 (< 0) enter the mean: the
    paper's filter on the baseline refusal metric.
    """
    arch = lm.arch
    layers = list(range(arch.n_layers))
    sums: dict[int, torch.Tensor] = {}
    current: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    kept = 0
    metrics: list[float] = []

    def sink(layer: int, h: torch.Tensor) -> None:
        idx = state["positions"].to(h.device)  # [batch, n_positions]
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        current[layer] = h[rows, idx].double()  # [batch, n_positions, d_model]

    chunks = batches(prompts, batch_size)
    with capture_resid_pre(arch, layers, sink):
        for chunk in tqdm(chunks, desc=desc, leave=False, disable=None):
            batch = encode(lm.tokenizer, chunk, padding_side)
            state["positions"] = batch.trailing_positions(n_positions)
            logits = last_logits(lm, batch)
            mask = torch.ones(len(chunk), dtype=torch.bool)
            if metric is not None:
                values = metric(logits).cpu()
                metrics.extend(values.tolist())
                if keep_sign is not None:
                    mask = values > 0 if keep_sign > 0 else values < 0
            for layer in layers:
                acts = current.pop(layer)
                if not torch.isfinite(acts).all():
                    raise RefusalkitError(
                        f"non-finite activations at layer {layer} ({desc}); the model overflows in this dtype. "
                        "Rerun with --dtype float32"
                    )
                sel = acts[mask.to(acts.device)].sum(0)
                sums[layer] = sel if layer not in sums else sums[layer] + sel
            kept += int(mask.sum())
    if kept == 0:
        raise RefusalkitError(
            f"no prompt passed the filter for {desc}; the model may not refuse these harmful prompts "
            "(or refuses the harmless ones). Check the data, or rerun with --filter-train false"
        )
    mean = torch.stack([sums[layer].cpu() / kept for layer in layers], dim=1)  # [n_pos, n_layers, d]
    return MeanActivations(mean=mean, kept=kept, total=len(prompts), metrics=metrics)
