"""GCG, greedy coordinate gradient (Zou et al. 2023): search for an adversarial suffix.

Each step: the gradient of the loss with respect to a one-hot encoding of the suffix tokens (through
the input embedding matrix) ranks, for every suffix position, the ``topk`` tokens whose swap most
lowers the loss to first order; ``search_width`` candidates each swap ``n_replace`` random positions
to one of those tokens; the candidates are scored exactly by forward passes and the best becomes the
next suffix. One suffix serves several prompts at once: the loss is the mean over prompts. The random
draws of step s come from a generator seeded with ``seed + s``, so a search resumed from a checkpoint
continues exactly as the uninterrupted search would have.

Objectives (``GCGConfig.objective``):
  target     cross-entropy of a target completion ("Sure, here is") after the prompt, mean per token;
  direction  the projection h . r^ of the last prompt token's resid_pre onto the unit refusal
             direction, averaged over layers: only the direction's layer (``direction_layers="at"``)
             or, the default, every layer from it to the last (``"from"``): the heads that write the
             direction sit in middle-to-late layers (PAPER.md section 7), many after the layer the
             direction was read at, and a suffix that silences it at one layer can let later heads
             write it again;
  both       target + direction_weight * direction / |direction at the initial suffix|, so a weight of
             1 makes the two terms comparable whatever the residual norm.

Only candidates whose text encodes back to exactly the optimized tokens *inside every prompt* are
kept, so the suffix string found here gives the same token ids when the analysis (or anyone) renders
the prompt as text. With ``prefix_cache`` the key/value cache of each prompt's fixed part (template
and instruction) is computed once and reused; the loss is the same with or without it. The loss and
its gradient live in ``objective.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from refusalkit.analysis.gcg_config import GCGConfig
from refusalkit.analysis.objective import Scores, SuffixObjective
from refusalkit.directions import Direction
from refusalkit.models.loading import LoadedModel
from refusalkit.utils import write_json

log = logging.getLogger(__name__)


@dataclass
class GCGResult:
    best_suffix: str
    best_ids: list[int]
    best_loss: float
    best_step: int
    best_matched: bool
    stopped: str  # "n_steps", "loss_threshold", "target_matched" or "time_budget"
    history: list[dict[str, Any]]
    config: dict[str, Any]
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        best = {
            "suffix": self.best_suffix,
            "ids": self.best_ids,
            "loss": self.best_loss,
            "step": self.best_step,
            "matched": self.best_matched,
        }
        return {
            "best": best,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 2),
            "seconds_per_step": round(self.seconds / max(len(self.history) - 1, 1), 3),
            "config": self.config,
            "meta": self.meta,
            "history": self.history,
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())


def sample_candidates(
    ids: torch.Tensor, grad: torch.Tensor, allowed: torch.Tensor, config: GCGConfig, gen: torch.Generator
) -> torch.Tensor:
    """[search_width, k] candidates: each swaps ``n_replace`` random positions of ``ids`` [k] to one of
    that position's top-k tokens by negative normalized gradient. Duplicates are dropped."""
    k = ids.shape[0]
    g = grad.float().cpu()
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g[:, ~allowed] = float("inf")
    topk = min(config.topk, int(allowed.sum()))
    top = (-g).topk(topk, dim=1).indices  # [k, topk]
    width, n_rep = config.search_width, min(config.n_replace, k)
    pos = torch.argsort(torch.rand(width, k, generator=gen), dim=1)[:, :n_rep]  # [width, n_rep]
    pick = torch.randint(0, topk, (width, n_rep), generator=gen)
    new = top[pos, pick]  # [width, n_rep]
    cands = ids.cpu().repeat(width, 1).scatter(1, pos, new)
    return torch.unique(cands, dim=0).to(ids.device)


class _Search:
    """The state of one search: the current suffix, the history of steps and the best step so far."""

    def __init__(self, obj: SuffixObjective, config: GCGConfig, meta: dict[str, Any] | None) -> None:
        self.obj, self.config, self.meta = obj, config, dict(meta or {})
        self.t0 = time.perf_counter()
        self.ids = obj.initial_ids()
        self.history: list[dict[str, Any]] = []
        first = obj.scores(self.ids[None])
        if config.objective == "both":  # from the initial suffix, also when resuming: same loss scale
            obj.projection_scale = max(abs(float(first.projection[0])), 1e-6)
        self.best = self.record(0, first, 0, 1) | {"ids": self.ids.tolist()}

    def resume(self, saved: dict[str, Any]) -> int:
        """Continue a checkpoint's JSON (``GCGResult.to_json``): its suffix, history, best and clock.
        Returns the next step to run."""
        self.history = list(saved["history"])
        self.ids = torch.tensor(saved["meta"]["current_ids"], dtype=self.ids.dtype, device=self.ids.device)
        self.best = {k: saved["best"][k] for k in ("suffix", "ids", "loss", "step", "matched")}
        self.t0 = time.perf_counter() - float(saved.get("seconds", 0.0))
        return int(self.history[-1]["step"]) + 1

    def record(self, step: int, s: Scores, i: int, n_cands: int) -> dict[str, Any]:
        """Append step ``step`` (candidate ``i`` of ``s`` is now the suffix) to the history."""
        loss = float(self.obj.combine(s)[i])
        row: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "target_loss": float(s.target[i]),
            "projection": float(s.projection[i]),
            "matched": bool(s.match[i]),
            "candidates": n_cands,
            "suffix": self.obj.decode(self.ids),
            "seconds": round(time.perf_counter() - self.t0, 2),
        }
        self.history.append(row)
        # A suffix that makes the target the greedy continuation everywhere beats any that does not.
        if step and (row["matched"], -loss) > (self.best["matched"], -self.best["loss"]):
            self.best = row | {"ids": self.ids.tolist()}
        return row

    def stop_reason(self, step: int, row: dict[str, Any]) -> str | None:
        c = self.config
        if c.loss_threshold is not None and self.best["loss"] < c.loss_threshold:
            return "loss_threshold"
        if c.stop_on_match and step % c.check_every == 0 and row["matched"]:
            return "target_matched"
        if c.max_seconds is not None and time.perf_counter() - self.t0 > c.max_seconds:
            return "time_budget"
        return None

    def result(self, status: str) -> GCGResult:
        b, obj = self.best, self.obj
        return GCGResult(
            best_suffix=b["suffix"],
            best_ids=b["ids"],
            best_loss=b["loss"],
            best_step=b["step"],
            best_matched=b["matched"],
            stopped=status,
            history=list(self.history),  # a snapshot: checkpoints must not change as the search goes on
            config=asdict(self.config)
            | {
                "target_ids": obj.target_ids.tolist(),
                "layers": obj.layers,
                "projection_scale": obj.projection_scale,
            },
            seconds=time.perf_counter() - self.t0,
            meta=self.meta | {"current_ids": self.ids.tolist()},
        )


def run_gcg(
    lm: LoadedModel,
    instructions: list[str],
    config: GCGConfig | None = None,
    *,
    direction: Direction | None = None,
    system: str | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    resume: dict[str, Any] | None = None,
    checkpoint: Callable[[GCGResult], None] | None = None,
    checkpoint_every: int = 5,
) -> GCGResult:
    """Search one suffix for ``instructions`` (all at once). The best suffix is the lowest-loss one,
    except that a suffix making the target the greedy continuation on every prompt beats any that
    does not.

    ``checkpoint`` receives the result so far (``stopped == "running"``) every ``checkpoint_every``
    steps; passing such a partial result's JSON as ``resume`` continues from its last suffix, step
    count, history and best, exactly as the uninterrupted search goes on (each step seeds its own
    random draws).
    """
    config = config or GCGConfig()
    config.validate()
    obj = SuffixObjective(lm, instructions, config, direction, system)
    search = _Search(obj, config, meta)
    start = search.resume(resume) if resume else 1
    stopped = "n_steps"
    bar = tqdm(range(start, config.n_steps + 1), desc="gcg", disable=None if progress else True, leave=False)
    for step in bar:
        grad, _ = obj.gradient(search.ids)
        gen = torch.Generator().manual_seed(config.seed + step)
        cands = sample_candidates(search.ids, grad, obj.allowed, config, gen)
        cands = cands[obj.stable(cands)]
        if len(cands) == 0:
            log.warning("step %d: every candidate re-tokenized differently; keeping the suffix", step)
            continue
        s = obj.scores(cands)
        i = int(obj.combine(s).argmin())
        search.ids = cands[i]
        row = search.record(step, s, i, len(cands))
        bar.set_postfix(loss=f"{row['loss']:.3f}", matched=row["matched"])
        reason = search.stop_reason(step, row)
        if reason is not None:
            stopped = reason
            break
        if checkpoint is not None and step % checkpoint_every == 0:
            checkpoint(search.result("running"))
    return search.result(stopped)
