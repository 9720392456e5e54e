"""GCG, greedy coordinate gradient (Zou et al. 2023): search for an adversarial suffix.

Each step: the gradient of the loss with respect to a one-hot encoding of the suffix tokens (through
the input embedding matrix) ranks, for every suffix position, the ``topk`` tokens whose swap most
lowers the loss to first order; ``search_width`` candidates each swap ``n_replace`` random positions
to one of those tokens; the candidates are scored exactly by forward passes and the best becomes the
next suffix. One suffix serves several prompts at once: the loss is the mean over prompts.

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
and instruction) is computed once and reused; the loss is the same with or without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refusalkit.activations import cache_kwarg, cache_of, repeat_cache
from refusalkit.analysis.tokens import PromptTemplate, allowed_token_ids
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import capture_resid_pre
from refusalkit.models.loading import LoadedModel
from refusalkit.utils import write_json

log = logging.getLogger(__name__)

Objective = Literal["target", "direction", "both"]
OBJECTIVES: tuple[str, ...] = ("target", "direction", "both")


@dataclass
class GCGConfig:
    """Knobs of the search. Defaults suit a small model on a CPU; the GCG paper used 500 steps,
    width 512, top-k 256 on GPUs."""

    n_steps: int = 100
    search_width: int = 128  # candidates evaluated per step
    topk: int = 64  # tokens considered per suffix position
    batch_size: int = 64  # candidate sequences per forward pass
    n_replace: int = 1  # positions swapped per candidate
    n_tokens: int = 20  # suffix length when ``init`` is None
    init: str | None = None  # initial suffix text; default " ! ! ... !" (n_tokens tokens)
    target: str = "Sure, here is"
    seed: int = 0
    objective: Objective = "target"
    direction_weight: float = 1.0
    direction_layers: Literal["at", "from"] = "from"
    loss_threshold: float | None = None  # stop once the best loss is below this
    stop_on_match: bool = True  # stop once the target is the greedy continuation on every prompt
    check_every: int = 1  # steps between match checks (the check is free: it reuses the step's logits)
    ascii_only: bool = True
    prefix_cache: bool = True
    max_seconds: float | None = None  # wall-clock budget of the search (setup included); None: no limit

    def validate(self) -> None:
        problems = [
            f"{name} must be at least 1, got {getattr(self, name)}"
            for name in (
                "n_steps",
                "search_width",
                "topk",
                "batch_size",
                "n_replace",
                "n_tokens",
                "check_every",
            )
            if getattr(self, name) < 1
        ]
        if self.max_seconds is not None and self.max_seconds <= 0:
            problems.append(f"max_seconds must be positive, got {self.max_seconds}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.direction_layers not in ("at", "from"):
            problems.append(f"direction_layers must be 'at' or 'from', got {self.direction_layers!r}")
        if not self.target.strip():
            problems.append("target must be non-empty text")
        if problems:
            raise RefusalkitError("invalid GCG settings:\n  " + "\n  ".join(problems))


@dataclass
class Scores:
    """Per-candidate loss parts, each [n_candidates], averaged over prompts."""

    target: torch.Tensor  # mean cross-entropy of the target tokens
    projection: torch.Tensor  # mean h . r^ over the objective's layers (nan without a direction)
    match: torch.Tensor  # bool: the target is the greedy continuation on every prompt


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


def _embedding_scale(embed: Any) -> float:
    """The factor the embedding module applies to its weight rows (sqrt(d_model) for Gemma, else 1),
    so one-hot @ weight * scale equals what the module itself outputs."""
    weight = embed.weight
    ids = torch.arange(min(8, weight.shape[0]), device=weight.device)
    with torch.no_grad():
        out, rows = embed(ids).float(), weight[ids].float()
    scale = float((out * rows).sum() / (rows * rows).sum())
    if not torch.allclose(out, rows * scale, rtol=1e-3, atol=1e-5):
        raise RefusalkitError(
            "the input embedding is not a scaled lookup table; GCG cannot take its gradient"
        )
    return scale


class SuffixObjective:
    """The loss of suffix token ids over a set of prompts, and its gradient wrt one-hot tokens."""

    def __init__(
        self,
        lm: LoadedModel,
        instructions: list[str],
        config: GCGConfig,
        direction: Direction | None = None,
        system: str | None = None,
    ) -> None:
        if not instructions:
            raise RefusalkitError("GCG needs at least one prompt")
        if config.objective != "target" and direction is None:
            raise RefusalkitError(
                f"objective {config.objective!r} needs a refusal direction; select one first"
            )
        self.lm, self.config = lm, config
        tok, dev = lm.tokenizer, lm.device
        self.template = PromptTemplate.from_tokenizer(tok, system)
        self.pre_texts = [self.template.pre + x for x in instructions]
        self.before = [self._encode(t) for t in self.pre_texts]
        self.after = self._encode(self.template.post)
        self.target_ids = torch.tensor(self._encode(config.target), device=dev)
        self.embed = lm.model.get_input_embeddings()  # the module the model itself embeds tokens with
        self.weight: torch.Tensor = self.embed.weight  # [vocab, d_model]
        self.scale = _embedding_scale(self.embed)
        self.allowed = allowed_token_ids(tok, self.weight.shape[0], ascii_only=config.ascii_only)
        self.unit: torch.Tensor | None = None
        self.layers: list[int] = []
        if direction is not None:
            self.unit = direction.unit.to(device=dev, dtype=torch.float32)
            start = direction.layer
            self.layers = [start] if config.direction_layers == "at" else list(range(start, lm.arch.n_layers))
        self.projection_scale = 1.0
        self._cache_kw = cache_kwarg(lm.model)
        self.caches = [self._prefix_cache(ids) for ids in self.before] if config.prefix_cache else None

    def _encode(self, text: str) -> list[int]:
        return list(self.lm.tokenizer.encode(text, add_special_tokens=False))

    @torch.no_grad()
    def _prefix_cache(self, ids: list[int]) -> Any:
        out = self.lm.model(
            input_ids=torch.tensor([ids], device=self.lm.device), use_cache=True, logits_to_keep=1
        )
        cache = cache_of(out)
        if cache is None:
            raise RefusalkitError(
                "this model returned no key/value cache; rerun the search with --no-prefix-cache"
            )
        return cache

    def initial_ids(self) -> torch.Tensor:
        """[n_tokens] the initial suffix: ``config.init`` tokenized, or ' !' repeated."""
        c = self.config
        ids = self._encode(c.init) if c.init else (self._encode(" !") * c.n_tokens)[: c.n_tokens]
        t = torch.tensor(ids, device=self.lm.device)
        if not ids or not bool(self.stable(t[None])[0]):
            raise RefusalkitError(
                f"the initial suffix {self.decode(t)!r} does not encode back to the same tokens inside the prompts; "
                "choose another --init"
            )
        return t

    def decode(self, ids: torch.Tensor) -> str:
        return str(self.lm.tokenizer.decode(ids.tolist()))

    def stable(self, cands: torch.Tensor) -> torch.Tensor:
        """[n] bool: candidate [n, k] whose text, placed in every prompt, encodes to the same ids."""
        tok = self.lm.tokenizer
        texts = tok.batch_decode(cands.tolist())
        ok = torch.ones(len(texts), dtype=torch.bool)
        for pre, before in zip(self.pre_texts, self.before, strict=True):
            enc = tok([pre + s + self.template.post for s in texts], add_special_tokens=False)["input_ids"]
            for i, (ids, cand) in enumerate(zip(enc, cands.tolist(), strict=True)):
                ok[i] &= ids == before + cand + self.after
        return ok.to(cands.device)

    def _forward(self, p: int, rest: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run prompt ``p`` with ``rest`` = suffix + post-template + target (ids [B, n] or embeddings
        [B, n, d]). Returns per-row target CE [B], projection [B] and match [B]."""
        lm, n_target = self.lm, len(self.target_ids)
        batch = rest.shape[0]
        kwargs: dict[str, Any] = {"use_cache": self.caches is not None, "logits_to_keep": n_target + 1}
        offset = 0
        if self.caches is not None:
            cache = repeat_cache(self.caches[p], batch)
            kwargs[self._cache_kw] = cache
        else:
            before = torch.tensor(self.before[p], device=lm.device).expand(batch, -1)
            offset = before.shape[1]
            rest = torch.cat([before if rest.dim() == 2 else self.embed(before), rest], dim=1)
        kwargs["input_ids" if rest.dim() == 2 else "inputs_embeds"] = rest
        last = offset + k + len(self.after) - 1  # the last prompt token, where the reply begins
        seen: dict[int, torch.Tensor] = {}

        def sink(layer: int, h: torch.Tensor) -> None:
            seen[layer] = h[:, last].float().to(lm.device)  # sharded models: layers on other devices

        with capture_resid_pre(lm.arch, self.layers, sink):
            logits = lm.model(**kwargs).logits[:, :-1].float()  # [B, n_target, vocab]
        logits = logits.to(lm.device)
        target = self.target_ids.expand(batch, -1)
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(-1)
        match = (logits.argmax(-1) == target).all(-1)
        if self.unit is None:
            proj = torch.full_like(ce, float("nan"))
        else:
            proj = torch.stack([seen[layer] @ self.unit for layer in self.layers]).mean(0)
        return ce, proj, match

    def _tail(self, batch: int) -> torch.Tensor:
        tail = torch.tensor(self.after, device=self.lm.device)
        return torch.cat([tail, self.target_ids]).expand(batch, -1)

    def combine(self, s: Scores) -> torch.Tensor:
        """The scalar loss per candidate that GCG minimizes."""
        if self.config.objective == "target":
            return s.target
        if self.config.objective == "direction":
            return s.projection
        return s.target + self.config.direction_weight * s.projection / self.projection_scale

    @torch.no_grad()
    def scores(self, cands: torch.Tensor) -> Scores:
        """Exact loss parts of candidates [n, k], in batches of ``config.batch_size`` sequences."""
        k = cands.shape[1]
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for p in range(len(self.before)):
            rows = []
            for chunk in cands.split(self.config.batch_size):
                rows.append(self._forward(p, torch.cat([chunk, self._tail(len(chunk))], dim=1), k))
            parts.append(tuple(torch.cat(x) for x in zip(*rows, strict=True)))  # type: ignore[arg-type]
        ce = torch.stack([x[0] for x in parts]).mean(0)
        proj = torch.stack([x[1] for x in parts]).mean(0)
        match = torch.stack([x[2] for x in parts]).all(0)
        return Scores(ce.cpu(), proj.cpu(), match.cpu())

    def gradient(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """([k, vocab] d loss / d one-hot(suffix), the loss), the loss averaged over prompts."""
        k = ids.shape[0]
        one_hot = torch.zeros(k, self.weight.shape[0], device=self.weight.device, dtype=self.weight.dtype)
        one_hot.scatter_(1, ids[:, None], 1.0)
        one_hot.requires_grad_(True)
        n = len(self.before)
        total = 0.0
        with torch.enable_grad():
            for p in range(n):
                suffix = (one_hot @ self.weight) * self.scale  # [k, d]
                tail = self.embed(self._tail(1))  # [1, n_tail, d]
                ce, proj, match = self._forward(p, torch.cat([suffix[None], tail], dim=1), k)
                loss = self.combine(Scores(ce, proj, match)).sum() / n
                loss.backward()
                total += float(loss.detach())
        assert one_hot.grad is not None
        return one_hot.grad.detach(), total


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
    count, history and best (the candidate sampling restarts its random stream, so a resumed search
    is not bit-identical to an uninterrupted one).
    """
    config = config or GCGConfig()
    config.validate()
    obj = SuffixObjective(lm, instructions, config, direction, system)
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    ids = obj.initial_ids()
    first = obj.scores(ids[None])
    if config.objective == "both":
        obj.projection_scale = max(abs(float(first.projection[0])), 1e-6)
    history: list[dict[str, Any]] = []
    start = 1
    if resume:
        history = list(resume["history"])
        ids = torch.tensor(resume["meta"]["current_ids"], dtype=ids.dtype, device=ids.device)
        start = int(history[-1]["step"]) + 1
        gen.manual_seed(config.seed + start)
        t0 -= float(resume.get("seconds", 0.0))

    def record(step: int, s: Scores, i: int, n_cands: int) -> dict[str, Any]:
        row = {
            "step": step,
            "loss": float(obj.combine(s)[i]),
            "target_loss": float(s.target[i]),
            "projection": float(s.projection[i]),
            "matched": bool(s.match[i]),
            "candidates": n_cands,
            "suffix": obj.decode(ids),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        history.append(row)
        return row

    if resume:
        b = resume["best"]
        best = {
            "suffix": b["suffix"],
            "ids": b["ids"],
            "loss": b["loss"],
            "step": b["step"],
            "matched": b["matched"],
        }
    else:
        best = record(0, first, 0, 1) | {"ids": ids.tolist()}
    stopped = "n_steps"

    def result(status: str) -> GCGResult:
        return GCGResult(
            best_suffix=best["suffix"],
            best_ids=best["ids"],
            best_loss=best["loss"],
            best_step=best["step"],
            best_matched=best["matched"],
            stopped=status,
            history=list(history),  # a snapshot: checkpoints must not change as the search goes on
            config=asdict(config)
            | {
                "target_ids": obj.target_ids.tolist(),
                "layers": obj.layers,
                "projection_scale": obj.projection_scale,
            },
            seconds=time.perf_counter() - t0,
            meta=dict(meta or {}) | {"current_ids": ids.tolist()},
        )

    bar = tqdm(range(start, config.n_steps + 1), desc="gcg", disable=None if progress else True, leave=False)
    for step in bar:
        grad, _ = obj.gradient(ids)
        cands = sample_candidates(ids, grad, obj.allowed, config, gen)
        cands = cands[obj.stable(cands)]
        if len(cands) == 0:
            log.warning("step %d: every candidate re-tokenized differently; keeping the suffix", step)
            continue
        s = obj.scores(cands)
        i = int(obj.combine(s).argmin())
        ids = cands[i]
        row = record(step, s, i, len(cands))
        bar.set_postfix(loss=f"{row['loss']:.3f}", matched=row["matched"])
        if (row["matched"], -row["loss"]) > (best["matched"], -best["loss"]):
            best = row | {"ids": ids.tolist()}
        if config.loss_threshold is not None and best["loss"] < config.loss_threshold:
            stopped = "loss_threshold"
            break
        if config.stop_on_match and step % config.check_every == 0 and row["matched"]:
            stopped = "target_matched"
            break
        if config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds:
            stopped = "time_budget"
            break
        if checkpoint is not None and step % checkpoint_every == 0:
            checkpoint(result("running"))
    return result(stopped)
