"""The forward passes selection runs per candidate, made cheap.

- Ablation of several candidates in one forward pass: each row of the batch carries its own
  direction (``interventions.RowSteering``), so few validation prompts still fill a batch and the weights are read
  once for several candidates.
- Activation addition at layer l leaves every layer below l untouched, so it restarts at block l
  from the baseline pass's recorded resid_pre[l] (``ResidReplay``, built on ``refusalkit.restart``):
  each block is called again with the keyword arguments the model gave it in the baseline pass (mask,
  rotary embeddings), only the KV cache is a fresh one. A self-check replays the baseline; if that does not reproduce the model's
  own logits (an architecture this replay does not fit), addition runs as an ordinary hooked pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from refusalkit.activations import (
    PromptBatches,
    last_logits,
    logits_after_prefix,
    logits_for_batches,
    prefix_cache,
    select_cache_rows,
)
from refusalkit.interventions import RowSteering, add_direction
from refusalkit.models.compute_dtype import replay_tolerance
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import Batch
from refusalkit.restart import Calls, Recorder, head_logits, run_blocks

log = logging.getLogger(__name__)


Score = Callable[[torch.Tensor, list[int]], torch.Tensor]  # (logits [k*b, vocab], prompt rows) -> [k*b]


@torch.inference_mode()
def ablated_logits(
    lm: LoadedModel, enc: PromptBatches, directions: torch.Tensor, score: Score | None = None
) -> torch.Tensor:
    """[k, n, vocab] last-token logits of the encoded prompts, each of the k candidate ``directions``
    ([k, d_model], finite, non-zero) ablated, all k in the same forward passes. With ``score``, each
    batch's logits (candidate-major rows; ``rows``: the prompts' indices) are reduced at once: [k, n]."""
    k = directions.shape[0]
    unit = directions.double() / directions.double().norm(dim=-1, keepdim=True)
    steering = RowSteering(unit)  # one kind per candidate
    n_prefix = len(enc.prefix)
    chunks = []
    with steering.active(lm.arch):
        steering.use(torch.arange(k))  # the prefix: one row per candidate
        cache = prefix_cache(lm, enc.prefix, rows=k) if n_prefix else None
        for rows, input_ids, mask in enc.batches:
            b = len(rows)
            steering.use(torch.arange(k).repeat_interleave(b))  # candidate-major rows
            ids, m = input_ids.repeat(k, 1), mask.repeat(k, 1)
            if cache is None:
                logits = last_logits(lm, Batch(ids, m))
            else:
                past = select_cache_rows(cache, torch.arange(k).repeat_interleave(b))
                logits = logits_after_prefix(lm, past, n_prefix, ids, m)
            chunks.append(_reduced(logits.cpu(), rows, k, score))
    return _assemble(enc, chunks)


def _reduced(logits: torch.Tensor, rows: list[int], k: int, score: Score | None) -> torch.Tensor:
    values = logits if score is None else score(logits, rows)
    return values.view(k, len(rows), *values.shape[1:])


def _assemble(enc: PromptBatches, chunks: list[torch.Tensor]) -> torch.Tensor:
    """[k, n, ...] from per-batch [k, b, ...] chunks, prompts back in input order."""
    values = torch.cat(chunks, dim=1)
    order = torch.tensor([i for rows, _, _ in enc.batches for i in rows])
    result = torch.empty_like(values)
    result[:, order] = values
    return result


class ResidReplay:
    """A baseline pass over encoded prompts that can be restarted at any recorded layer.

    Holds resid_pre of the listed layers for every prompt (and the shared prefix), plus each block's
    call arguments from ``min(layers)`` on: memory ~ n * seq * len(layers) * d_model floats.
    """

    def __init__(self, lm: LoadedModel, enc: PromptBatches, layers: list[int]) -> None:
        self.lm, self.enc, self.layers = lm, enc, sorted(set(layers))
        rec = Recorder(lm, self.layers)
        self.prefix_calls: Calls | None = None
        self.cache = None
        with torch.inference_mode():
            if enc.prefix:
                with rec.recording() as calls:
                    self.cache = prefix_cache(lm, enc.prefix)
                self.prefix_calls = calls
            self.batch_calls = []
            logits = []
            for _rows, input_ids, mask in enc.batches:
                with rec.recording() as calls:
                    if self.cache is None:
                        logits.append(last_logits(lm, Batch(input_ids, mask)).cpu())
                    else:
                        past = select_cache_rows(self.cache, torch.zeros(len(_rows), dtype=torch.long))
                        logits.append(logits_after_prefix(lm, past, len(enc.prefix), input_ids, mask).cpu())
                self.batch_calls.append(calls)
        self.cache_key = rec.cache_key
        self.baseline = _in_input_order(enc, logits)  # [n, vocab]
        self.exact = self._self_check()

    def _self_check(self) -> bool:
        """Replaying the top recorded layers without an addition (two candidates sharing the pass)
        must give the baseline logits."""
        top = self.layers[max(0, len(self.layers) - 2)]
        try:
            embed_w = self.lm.arch.embed.weight
            assert isinstance(embed_w, torch.Tensor)
            again = self._replay(torch.zeros(2, int(embed_w.shape[1])), top)
        except (TypeError, ValueError, RuntimeError, AttributeError, KeyError) as exc:
            log.warning("restarting at a layer does not work for this model (%s); using full passes", exc)
            return False
        scale = float(self.baseline.abs().max()) or 1.0
        err = float((again - self.baseline).abs().max()) / scale
        tol = replay_tolerance(self.lm.dtype)
        if err > tol:
            log.warning("restarting at a layer changes the logits (rel. error %.1e); using full passes", err)
        return err <= tol

    def added_logits(self, vectors: torch.Tensor, layer: int, score: Score | None = None) -> torch.Tensor:
        """[k, n, vocab] last-token logits with each of the k ``vectors`` ([k, d_model], raw) added to
        resid_pre[layer] at every real token: the numbers of an ``add_direction`` pass per vector,
        computed from ``layer`` on only, the k candidates sharing each forward pass. ``score`` as in
        ``ablated_logits`` ([k, n] out)."""
        if self.exact and layer in self.layers:
            return self._replay(vectors, layer, score)
        out = []
        everyone = list(range(self.enc.n))
        for v in vectors:
            with add_direction(self.lm.arch, v, layer, coeff=1.0):
                out.append(_reduced(logits_for_batches(self.lm, self.enc), everyone, 1, score)[0])
        return torch.stack(out)

    @torch.inference_mode()
    def _replay(self, vectors: torch.Tensor, layer: int, score: Score | None = None) -> torch.Tensor:
        from transformers import DynamicCache

        k = vectors.shape[0]
        cache = None
        if self.prefix_calls is not None:
            cache = DynamicCache(config=self.lm.model.config)
            run_blocks(self.lm, self.prefix_calls, layer, vectors, None, cache, self.cache_key)
        out = []
        for calls, (rows, _ids, mask) in zip(self.batch_calls, self.enc.batches, strict=True):
            b = len(rows)
            past = select_cache_rows(cache, torch.arange(k).repeat_interleave(b)) if cache else None
            h = run_blocks(self.lm, calls, layer, vectors, mask, past, self.cache_key)
            out.append(_reduced(self._head(h[:, -1:]).cpu(), rows, k, score))
        return _assemble(self.enc, out)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """[b, 1, d] last resid_post -> [b, vocab] float32 logits, as the model's own head does."""
        return head_logits(self.lm, h)[:, -1]


def _in_input_order(enc: PromptBatches, chunks: list[torch.Tensor]) -> torch.Tensor:
    logits = torch.cat(chunks)
    order = [i for rows, _, _ in enc.batches for i in rows]
    result = torch.empty_like(logits)
    result[torch.tensor(order)] = logits
    return result
