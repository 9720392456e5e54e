"""The loss GCG minimizes: a suffix's target cross-entropy and/or projection on the refusal direction,
over several prompts at once, and its gradient with respect to one-hot suffix tokens (see ``gcg``).

Only candidates whose text encodes back to exactly the optimized tokens *inside every prompt* are
kept (``stable``). With ``config.prefix_cache`` each prompt's fixed part (template and instruction)
runs once (``activations.run_prefix``) and every batch gets a copy of its key/value cache
(``repeat_cache``), so the shared cache is never extended in place; the loss is the same without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from refusalkit.activations import cache_kwarg, repeat_cache, run_prefix
from refusalkit.analysis.tokens import PromptTemplate, allowed_token_ids
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import capture_resid_pre
from refusalkit.models.loading import LoadedModel

if TYPE_CHECKING:
    from refusalkit.analysis.gcg_config import GCGConfig


@dataclass
class Scores:
    """Per-candidate loss parts, each [n_candidates], averaged over prompts."""

    target: torch.Tensor  # mean cross-entropy of the target tokens
    projection: torch.Tensor  # mean h . r^ over the objective's layers (nan without a direction)
    match: torch.Tensor  # bool: the target is the greedy continuation on every prompt


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

    def _prefix_cache(self, ids: list[int]) -> Any:
        cache, _ = run_prefix(self.lm, ids)
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
