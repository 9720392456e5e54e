"""Teacher-forced scoring of continuations: the log-likelihood of given tokens after given contexts,
in batches that share the contexts' common prefix, and the replay of a recorded pass restarted at one
layer with a vector added there (the actadd setting without recomputing the layers below it).

The coherence measurements (corpus CE, CE of the model's own completions, first-token KL) and the
capability measurements score through here. Log-probabilities are taken in float64 from the model's
logits (bfloat16 or float32), so a bfloat16 run rounds only the logits themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from refusalkit.activations import forward_after_prefix, prefix_cache, repeat_cache, shared_prefix_len
from refusalkit.models.compute_dtype import replay_tolerance
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import Batch, pad_left
from refusalkit.restart import Calls, Recorder, head_logits, run_blocks

log = logging.getLogger(__name__)

MIN_PREFIX = 8  # a shorter shared prefix is not worth a pass of its own
LOGIT_BUDGET = 1 << 27  # floats of logits held at once (512 MiB in float32); batches shrink to fit


@dataclass
class ContinuationScores:
    """Per row: summed log-probability of the continuation tokens and their count.

    logprob_sum: [n] float64; n_tokens: [n] int64; first_logits: [n, vocab] float32 logits at the last
    context token (the distribution of the first continuation token), when asked for.
    """

    logprob_sum: torch.Tensor
    n_tokens: torch.Tensor
    first_logits: torch.Tensor | None = None
    replay: ContinuationReplay | None = None  # with score_continuations(record_at=...)

    @property
    def ce(self) -> float:
        """Token-weighted mean cross-entropy (nats) over every scored token."""
        return float(-self.logprob_sum.sum() / self.n_tokens.sum().clamp(min=1))


Plan = list[tuple[list[int], Batch, int]]  # (rows, left-padded batch, positions whose logits are kept)


@dataclass
class ContinuationReplay:
    """An unedited ``score_continuations`` pass recorded at one layer, to be restarted there with a
    vector added (``refusalkit.restart``): the actadd setting without recomputing the layers below."""

    layer: int
    continuations: list[list[int]]
    plan: Plan
    prefix_calls: Calls | None
    batch_calls: list[Calls]
    cache_key: str | None
    first_batch: torch.Tensor  # [b, vocab] the first batch's last-position logits, for the self-check


def _plan(
    lm: LoadedModel, contexts: list[list[int]], continuations: list[list[int]], batch_size: int
) -> tuple[int, Plan]:
    """The shared prefix length and the batches: rows sorted by length, left-padded after the prefix,
    each batch small enough that its kept logits stay under ``LOGIT_BUDGET`` floats."""
    n = len(contexts)
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    n_prefix = shared_prefix_len(contexts, MIN_PREFIX)
    order = sorted(range(n), key=lambda i: len(contexts[i]) + len(continuations[i]))
    plan: Plan = []
    start = 0
    while start < n:
        keep = max(len(continuations[i]) for i in order[start : start + batch_size]) + 1
        size = max(1, min(batch_size, LOGIT_BUDGET // (keep * vocab)))
        chunk = order[start : start + size]
        keep = max(len(continuations[i]) for i in chunk) + 1
        rows = [(contexts[i] + continuations[i])[n_prefix:] for i in chunk]
        plan.append((chunk, pad_left(rows, pad), keep))
        start += len(chunk)
    return n_prefix, plan


class _Collector:
    """Summed log-probabilities (and first-token logits) of continuations, batch by batch."""

    def __init__(self, lm: LoadedModel, continuations: list[list[int]], keep_first_logits: bool) -> None:
        n = len(continuations)
        vocab = int(lm.model.get_output_embeddings().weight.shape[0])
        self.continuations = continuations
        self.lp_sum = torch.zeros(n, dtype=torch.float64)
        self.first = torch.empty((n, vocab), dtype=torch.float32) if keep_first_logits else None

    def add(self, chunk: list[int], logits: torch.Tensor, keep: int) -> None:
        """logits: [b, keep, vocab] of the batch holding rows ``chunk``."""
        for row, i in enumerate(chunk):
            c = len(self.continuations[i])
            if self.first is not None:
                self.first[i] = logits[row, keep - c - 1].cpu()
            if c:
                logp = torch.log_softmax(logits[row, keep - c - 1 : keep - 1].double(), dim=-1)  # [c, vocab]
                target = torch.tensor(self.continuations[i], device=logp.device)
                self.lp_sum[i] = logp.gather(-1, target[:, None]).sum().cpu()

    def scores(self) -> ContinuationScores:
        counts = torch.tensor([len(c) for c in self.continuations], dtype=torch.long)
        return ContinuationScores(self.lp_sum, counts, self.first)


@torch.inference_mode()
def score_continuations(
    lm: LoadedModel,
    contexts: list[list[int]],
    continuations: list[list[int]],
    *,
    batch_size: int = 16,
    keep_first_logits: bool = False,
    record_at: int | None = None,
) -> ContinuationScores:
    """Log-likelihood of each continuation given its context (token ids; each context non-empty).

    Rows are left-padded, so every continuation ends at the last position and only the last
    ``max continuation length + 1`` positions' logits are computed. The token prefix every context
    shares (a chat template's system turn) runs once, under the active hooks, and batches continue from
    its KV cache. Batches shrink so that the logits held at once stay under ``LOGIT_BUDGET`` floats.
    With ``record_at`` (a layer; run without interventions), the result carries a
    ``ContinuationReplay`` for ``replay_added``.
    """
    if any(not c for c in contexts):
        raise ValueError("every context needs at least one token")
    n_prefix, plan = _plan(lm, contexts, continuations, batch_size)
    rec = Recorder(lm, [record_at]) if record_at is not None else None
    recorded: list[Calls] = []

    def recording() -> AbstractContextManager[Calls]:
        return rec.recording() if rec is not None else nullcontext({})

    with recording() as calls:
        cache = prefix_cache(lm, contexts[0][:n_prefix]) if n_prefix else None
    prefix_calls = calls if n_prefix else None
    out = _Collector(lm, continuations, keep_first_logits)
    first_batch = torch.empty(0)
    for chunk, batch, keep in plan:
        past = repeat_cache(cache, len(chunk)) if cache is not None else None
        with recording() as calls:
            logits = forward_after_prefix(
                lm, past, n_prefix, batch.input_ids, batch.attention_mask, keep=keep
            )  # [b, keep, vocab] in the model's dtype: the collector takes float64 log-probs row by row
        if rec is not None:
            recorded.append(calls)
            if not first_batch.numel():  # a copy: a view would hold the batch's [b, keep, vocab] alive
                first_batch = logits[:, -1].to(torch.float32, copy=True)
        out.add(chunk, logits, keep)
    scores = out.scores()
    if rec is not None and record_at is not None:
        scores.replay = ContinuationReplay(
            record_at, continuations, plan, prefix_calls, recorded, rec.cache_key, first_batch
        )
    return scores


@torch.inference_mode()
def replay_added(
    lm: LoadedModel, replay: ContinuationReplay, vector: torch.Tensor, *, keep_first_logits: bool = False
) -> ContinuationScores | None:
    """The recorded pass's scores with ``vector`` ([d_model], raw) added to resid_pre[layer] at every
    real token (``add_direction``'s numbers), computed from that layer on. None when replaying the
    first batch without a vector does not give its recorded logits (rel. 1e-4 in float32, a few roundings
    in bfloat16: ``replay_tolerance``): run the hooked pass."""
    try:
        again = next(_replay(lm, replay, torch.zeros_like(vector), 1))[:, -1]
    except (TypeError, ValueError, RuntimeError, AttributeError, KeyError) as exc:
        log.warning("restarting at a layer does not work for this model (%s); using a full pass", exc)
        return None
    err = float((again - replay.first_batch).abs().max()) / (float(replay.first_batch.abs().max()) or 1.0)
    if err > replay_tolerance(lm.dtype):
        log.warning("restarting at a layer changes the logits (rel. error %.1e); using a full pass", err)
        return None
    out = _Collector(lm, replay.continuations, keep_first_logits)
    for (chunk, _batch, keep), logits in zip(replay.plan, _replay(lm, replay, vector), strict=True):
        out.add(chunk, logits, keep)
    return out.scores()


def _replay(
    lm: LoadedModel, replay: ContinuationReplay, vector: torch.Tensor, n_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Each batch's [b, keep, vocab] logits, restarted at the recorded layer with ``vector`` added."""
    from transformers import DynamicCache

    cache = None
    if replay.prefix_calls is not None:
        cache = DynamicCache(config=lm.model.config)
        run_blocks(lm, replay.prefix_calls, replay.layer, vector[None], None, cache, replay.cache_key)
    steps = list(zip(replay.plan, replay.batch_calls, strict=True))[:n_batches]
    for (chunk, batch, keep), calls in steps:
        past = repeat_cache(cache, len(chunk)) if cache is not None else None
        h = run_blocks(lm, calls, replay.layer, vector[None], batch.attention_mask, past, replay.cache_key)
        yield head_logits(lm, h[:, -keep:])
