"""Forward passes that read the residual stream: streaming mean activations and last-token logits."""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def common_prefix_len(rows: list[list[int]], keep_last: int = 1) -> int:
    """How many leading tokens every row shares, leaving at least ``keep_last`` tokens of each."""
    first = rows[0]
    n = min(len(r) for r in rows) - keep_last  # leave at least ``keep_last`` tokens per prompt to run
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def shared_prefix_len(rows: list[list[int]], min_prefix: int = 8, keep_last: int = 1) -> int:
    """The prefix worth running once for ``rows``: ``common_prefix_len`` when there are two rows or
    more and it is at least ``min_prefix`` tokens (a shorter one is not worth a pass of its own), else 0."""
    n = common_prefix_len(rows, keep_last) if len(rows) > 1 else 0
    return n if n >= min_prefix else 0


@dataclass
class PromptBatches:
    """Formatted prompts tokenized once, for passes that run them many times (selection).

    prefix: the token ids every prompt starts with, run once per pass and shared through its KV cache
    (empty when too short to pay off); batches: (rows, input_ids [b, s], mask [b, s]) of the rest,
    left padded, in order of length; ``rows`` are the prompts' indices in input order.
    """

    prefix: list[int]
    batches: list[tuple[list[int], torch.Tensor, torch.Tensor]]
    n: int


# What one more forward pass costs beyond its tokens (reading every weight once, hooks, Python), in
# tokens' worth of compute: about 35 on the 0.5B built-in on a 2-core CPU (bench/selection.py).
BATCH_OVERHEAD_TOKENS = 32


def encode_batches(
    lm: LoadedModel,
    prompts: list[str],
    batch_size: int,
    *,
    share_prefix: bool = True,
    min_prefix: int = 8,
    fill: bool = False,
    keep_last: int = 1,
    pass_overhead: float = BATCH_OVERHEAD_TOKENS,
) -> PromptBatches:
    """Tokenize ``prompts``, split off their common prefix and batch the rest by length: cut where
    padding outweighs a pass's fixed cost (``length_batches``), or, with ``fill`` (generation, where
    every decoding step is a pass), into as few batches as ``batch_size`` allows, of equal size. The
    prefix leaves at least ``keep_last`` tokens of every prompt in its batch rows. ``pass_overhead``:
    a pass's fixed cost in tokens of padding; divide it by k when each batch runs for k candidates in
    one pass (selection), which multiplies its padding by k."""
    tok = lm.tokenizer
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    n_prefix = shared_prefix_len(ids, min_prefix, keep_last) if share_prefix else 0
    out = []
    chunks = (
        even_batches(order, batch_size)
        if fill
        else length_batches(order, [len(ids[i]) for i in order], batch_size, pass_overhead)
    )
    for chunk in chunks:
        rows = [ids[i][n_prefix:] for i in chunk]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, width - len(r) :] = torch.tensor(r)
            mask[j, width - len(r) :] = 1
        out.append((chunk, input_ids, mask))
    return PromptBatches(ids[0][:n_prefix] if ids else [], out, len(prompts))


def even_batches(items: list[Any], batch_size: int) -> list[list[Any]]:
    """``items`` in order, cut into the fewest batches of at most ``batch_size``, sizes differing by at most one."""
    if not items:
        return []
    n_batches = -(-len(items) // batch_size)
    size, extra = divmod(len(items), n_batches)
    out, start = [], 0
    for b in range(n_batches):
        end = start + size + (1 if b < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def length_batches(
    items: list[Any], lengths: list[int], batch_size: int, overhead: float = BATCH_OVERHEAD_TOKENS
) -> list[list[Any]]:
    """Split items sorted by length into batches of at most ``batch_size`` that minimize padded
    tokens plus a fixed cost per batch (``overhead`` tokens): one long prompt gets its own batch
    instead of padding fifteen short ones to its length. Dynamic programming over the sorted order."""
    n = len(items)
    best = [0.0] + [math.inf] * n  # best[i]: cost of the first i items
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - batch_size), i):
            cost = best[j] + overhead + (i - j) * lengths[i - 1]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    out, i = [], n
    while i > 0:
        out.append(items[cut[i] : i])
        i = cut[i]
    return out[::-1]


@torch.inference_mode()
def logits_for_batches(lm: LoadedModel, enc: PromptBatches) -> torch.Tensor:
    """[n, vocab] last-token logits of encoded prompts, in input order, under the active hooks.

    The prefix runs once, under whatever interventions are active, and every batch reuses its KV cache.
    """
    cache = prefix_cache(lm, enc.prefix) if enc.prefix else None
    n_prefix = len(enc.prefix)
    out = []
    order: list[int] = []
    for rows, input_ids, mask in enc.batches:
        if cache is None:
            out.append(last_logits(lm, Batch(input_ids, mask)).cpu())
        else:
            past = repeat_cache(cache, len(rows))
            out.append(logits_after_prefix(lm, past, n_prefix, input_ids, mask).cpu())
        order.extend(rows)
    logits = torch.cat(out)
    result = torch.empty_like(logits)
    result[torch.tensor(order)] = logits
    return result


def logits_for_prompts(
    lm: LoadedModel, prompts: list[str], batch_size: int, *, share_prefix: bool = True, min_prefix: int = 8
) -> torch.Tensor:
    """[n, vocab] last-token logits for formatted prompts, in input order.

    Prompts are batched in order of length, so little compute goes to padding. With ``share_prefix``,
    the token prefix common to all prompts (a chat template's system turn is often half of each prompt)
    runs once, under whatever interventions are active, and its KV cache is reused by every batch.
    """
    enc = encode_batches(lm, prompts, batch_size, share_prefix=share_prefix, min_prefix=min_prefix)
    return logits_for_batches(lm, enc)


@torch.inference_mode()
def prefix_cache(lm: LoadedModel, prefix: list[int], rows: int = 1) -> Any:
    """The KV cache of ``prefix`` run as ``rows`` rows under the active hooks. The rows are computed,
    not copied (unlike ``run_prefix`` + ``repeat_cache``): hooks that steer each row differently
    (candidates sharing one pass in selection) give each row its own cache."""
    ids = torch.tensor([prefix] * rows, device=lm.device)
    mask = torch.ones_like(ids)
    with token_mask(mask):
        out = lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=Batch(ids, mask).position_ids,
            use_cache=True,
            logits_to_keep=1,  # the prefix's logits are never read
        )
    return cache_of(out)


# transformers 5 renamed the KV-cache argument and output from ``past_key_values`` to ``cache``; these
# helpers accept both generations of the API, for every prefix-cache user in the package.
def cache_kwarg(model: Any) -> str:
    """The name of ``model.forward``'s KV-cache argument."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned (``use_cache=True``)."""
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def repeat_cache(cache: Any, n: int) -> Any:
    """A copy of a batch-1 prefix cache repeated for ``n`` rows (a forward appends to its cache)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A copy of a prefix cache holding ``rows`` of it ([n] indices, repeats allowed)."""
    out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out


@torch.inference_mode()
def logits_after_prefix(
    lm: LoadedModel, past: Any, n_prefix: int, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """[b, vocab] last logits of left-padded suffixes run after a prefix held in ``past`` (b rows;
    the forward appends to it, so pass a copy)."""
    return forward_after_prefix(lm, past, n_prefix, input_ids, mask, keep=1)[:, -1].float()


@torch.inference_mode()
def forward_after_prefix(
    lm: LoadedModel, past: Any, n_prefix: int, input_ids: torch.Tensor, mask: torch.Tensor, *, keep: int = 1
) -> torch.Tensor:
    """[b, keep, vocab] logits of the last ``keep`` positions of left-padded suffixes run after a
    prefix of ``n_prefix`` tokens held in ``past`` (None: no prefix; else b rows, extended in place by
    the forward, so pass a copy)."""
    b = input_ids.shape[0]
    full_mask = torch.cat([torch.ones((b, n_prefix), dtype=mask.dtype), mask], dim=1).to(lm.device)
    position_ids = (n_prefix + mask.cumsum(-1) - 1).clamp(min=n_prefix).to(lm.device)
    with token_mask(full_mask):
        out = lm.model(
            input_ids=input_ids.to(lm.device),
            attention_mask=full_mask,
            position_ids=position_ids,
            use_cache=past is not None,
            logits_to_keep=keep,
            **({cache_kwarg(lm.model): past} if past is not None else {}),
        )
    return out.logits[:, -keep:]


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


def _mean_work(
    lm: LoadedModel, prompts: list[str], n_positions: int, batch_size: int, padding_side: str
) -> tuple[list[tuple[list[int], Batch]], list[int]]:
    """The batches of a mean (prompt indices, batch) and the prefix they share (empty: none).

    Left padded, the shared prefix splits off and batches are cut by length, the last ``n_positions``
    tokens of every prompt left out of the prefix; right padded, whole prompts in input order."""
    if padding_side == "left":
        enc = encode_batches(lm, prompts, batch_size, keep_last=n_positions)
        return [(rows, Batch(ids, mask)) for rows, ids, mask in enc.batches], enc.prefix
    order = list(range(len(prompts)))
    work = [
        (c, encode(lm.tokenizer, [prompts[i] for i in c], padding_side)) for c in batches(order, batch_size)
    ]
    return work, []


class _Sums:
    """Float64 sums of the kept rows' activations per layer, on each layer's own device."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.sums: dict[int, torch.Tensor] = {}
        self.kept = 0

    def add(self, layer: int, acts: torch.Tensor, keep: torch.Tensor) -> None:
        """acts: [batch, n_positions, d_model] float64; keep: [batch] bool."""
        if not torch.isfinite(acts).all():
            raise RefusalkitError(
                f"non-finite activations at layer {layer} ({self.desc}); the model overflows in this dtype. "
                "Rerun with --dtype float32"
            )
        sel = acts[keep.to(acts.device)].sum(0)
        self.sums[layer] = sel if layer not in self.sums else self.sums[layer] + sel

    def mean(self, layers: list[int]) -> torch.Tensor:
        """[n_positions, n_layers, d_model] float64 on the CPU."""
        return torch.stack([self.sums[layer].cpu() / self.kept for layer in layers], dim=1)


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

    Sums accumulate in float64 on each layer's own device (whatever the model's dtype: a bfloat16
    run rounds the activations, never the sums); only one batch's slice of activations
    ([batch, n_positions, d_model] per layer) is held at a time, so memory does not grow with the
    number of prompts. ``metric(logits) -> [batch]`` is computed from the last-token logits in the same
    pass; with ``keep_sign`` +1 (or -1) only prompts whose metric is > 0 (< 0) enter the mean: the
    paper's filter on the baseline refusal metric.

    Left padded (the default), the token prefix all prompts share (a chat template's system turn, often
    half of each prompt) runs once and batches continue from its KV cache, batched by length; the last
    ``n_positions`` tokens always stay out of the prefix. ``padding_side="right"`` runs whole prompts in
    input order (a check that padding does not change the means).
    """
    layers = list(range(lm.arch.n_layers))
    current: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    sums = _Sums(desc)
    metrics: dict[int, float] = {}

    def sink(layer: int, h: torch.Tensor) -> None:
        idx = state["positions"].to(h.device)  # [batch, n_positions]
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        current[layer] = h[rows, idx].double()  # [batch, n_positions, d_model]

    work, prefix = _mean_work(lm, prompts, n_positions, batch_size, padding_side)
    cache = prefix_cache(lm, prefix) if prefix else None
    with capture_resid_pre(lm.arch, layers, sink):
        for rows, batch in tqdm(work, desc=desc, leave=False, disable=None):
            state["positions"] = batch.trailing_positions(n_positions)
            if cache is None:
                logits = last_logits(lm, batch)
            else:
                past = repeat_cache(cache, len(rows))
                logits = logits_after_prefix(lm, past, len(prefix), batch.input_ids, batch.attention_mask)
            keep = torch.ones(len(rows), dtype=torch.bool)
            if metric is not None:
                values = metric(logits).cpu()
                metrics.update(zip(rows, values.tolist(), strict=True))
                if keep_sign is not None:
                    keep = values > 0 if keep_sign > 0 else values < 0
            for layer in layers:
                sums.add(layer, current.pop(layer), keep)
            sums.kept += int(keep.sum())
    if sums.kept == 0:
        raise RefusalkitError(
            f"no prompt passed the filter for {desc}; the model may not refuse these harmful prompts "
            "(or refuses the harmless ones). Check the data, or rerun with --filter-train false"
        )
    return MeanActivations(
        mean=sums.mean(layers),
        kept=sums.kept,
        total=len(prompts),
        metrics=[metrics[i] for i in sorted(metrics)],
    )


@torch.no_grad()  # not inference_mode: GCG reuses the cache in passes that take gradients
def run_prefix(lm: LoadedModel, ids: list[int]) -> tuple[Any, torch.Tensor]:
    """Run one token prefix (batch 1) under whatever hooks are active.

    Returns (its KV cache, [vocab] float32 logits at its last token). The cache is the caller's to
    share: pass ``repeat_cache(cache, n)`` to each forward (a forward appends to the cache it is
    given), never the cache itself, so one prefix serves any number of batches.
    """
    if not ids:
        raise ValueError("a prefix needs at least one token")
    t = torch.tensor([ids], device=lm.device)
    mask = torch.ones_like(t)
    with token_mask(mask):
        out = lm.model(
            input_ids=t,
            attention_mask=mask,
            position_ids=Batch(t, mask).position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
    return cache_of(out), out.logits[0, -1].float()
