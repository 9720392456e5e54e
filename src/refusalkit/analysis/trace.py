"""One forward pass per batch that measures, at the last prompt token, what the suffix analysis needs.

- the residual at resid_pre[0..L-1] and resid_post[L-1] (the last block's output, before the final
  norm), as cosine with and projection on the unit direction r^;
- direct attribution of every attention head: head h writes W_O[:, h*hd:(h+1)*hd] @ z_h, where z is
  the input of the attention output projection (the concatenated heads); its dot with r^ is the head's
  attribution. The heads plus the projection's bias sum exactly to the projection's output. Where a
  norm follows the projection before the residual add (Gemma 2/3, OLMo 2: attn_write is not the output
  projection) this is the pre-norm output;
- each head's attention from the last token onto each token role (tokens.ROLES); shares over all keys
  sum to one. Attention probabilities exist only in the eager kernel, so the trace switches the model
  to eager attention for its passes and restores each config's previous setting afterwards;
- the refusal metric from the last-token logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from refusalkit.activations import last_logits
from refusalkit.analysis.tokens import ROLES, SuffixedPrompt, token_roles
from refusalkit.errors import RefusalkitError
from refusalkit.interventions import capture_resid_pre, get_hidden, hooks
from refusalkit.metric import refusal_metric
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import batches, encode


@dataclass
class Trace:
    """Per-prompt measurements at the last token of one condition's prompts.

    cosine, projection: [n, L+1]; head_attr: [n, L, H]; attn_share: [n, L, H, len(ROLES)];
    metric: [n]; suffix_tokens: [n] tokens holding the suffix in context.
    """

    cosine: torch.Tensor
    projection: torch.Tensor
    head_attr: torch.Tensor
    attn_share: torch.Tensor
    metric: torch.Tensor
    suffix_tokens: torch.Tensor


def head_outputs(out_proj: nn.Module, z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., n_heads, d_model]: each head's term of ``out_proj(z)`` (bias excluded).

    z: [..., n_heads * head_dim], the projection's input (heads concatenated, as attention builds it).
    """
    weight = getattr(out_proj, "weight", None)  # [d_model, n_heads * head_dim]
    if not isinstance(weight, torch.Tensor) or weight.shape[1] != z.shape[-1] or z.shape[-1] % n_heads:
        raise RefusalkitError("the attention output projection is not a linear map of the concatenated heads")
    head_dim = z.shape[-1] // n_heads
    w = weight.float().reshape(weight.shape[0], n_heads, head_dim)
    return torch.einsum("...hk,dhk->...hd", z.float().reshape(*z.shape[:-1], n_heads, head_dim), w)


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block, then put back exactly what each of its
    configs held (set directly: re-validating the old kernel can fail where loading had chosen it)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    if all(v == "eager" for v in saved.values()):
        yield
        return
    switch = getattr(model, "set_attn_implementation", None)
    try:
        if switch is not None:
            switch("eager")
        else:  # older transformers: the config field is read at each forward
            for c in configs.values():
                c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


class _Probes:
    """The hooks of one trace: each records, at every row's last prompt token, its part of a batch."""

    def __init__(self, arch: Any, u: torch.Tensor) -> None:
        self.arch, self.u = arch, u
        self.last = torch.zeros(0, dtype=torch.long)  # [b] the batch's last real positions
        self.roles = torch.zeros(0)  # [b, seq, len(ROLES)] one-hot token roles
        self.resid: dict[int, torch.Tensor] = {}
        self.attr: dict[int, torch.Tensor] = {}
        self.share: dict[int, torch.Tensor] = {}

    def at_last(self, h: torch.Tensor) -> torch.Tensor:
        return h[torch.arange(h.shape[0], device=h.device), self.last.to(h.device)]

    def on_resid(self, layer: int, h: torch.Tensor) -> None:
        self.resid[layer] = self.at_last(h).float().cpu()  # CPU: layers may sit on several devices

    def on_final(self, _m: nn.Module, _a: Any, out: Any) -> None:
        h = out if isinstance(out, torch.Tensor) else out[0]
        self.resid[self.arch.n_layers] = self.at_last(h).float().cpu()

    def on_proj(self, layer: int) -> Any:
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            z = self.at_last(get_hidden(args, kwargs))
            self.attr[layer] = head_outputs(m, z, self.arch.n_heads).cpu() @ self.u  # [b, H]

        return hook

    def on_attn(self, layer: int) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:
                raise RefusalkitError(
                    "the attention module returned no probabilities; the model must run eager attention"
                )
            rows = torch.arange(weights.shape[0], device=weights.device)
            w = weights[rows, :, self.last.to(weights.device)].float()  # [b, H, keys]
            self.share[layer] = torch.einsum("bhk,bkr->bhr", w, self.roles.to(w.device)).cpu()

        return hook

    def registrations(self) -> list[Callable[[], RemovableHandle]]:
        arch = self.arch
        regs: list[Callable[[], RemovableHandle]] = [
            lambda: arch.blocks[-1].register_forward_hook(self.on_final)
        ]
        for layer in range(arch.n_layers):
            proj, attn = arch.attn_out_proj[layer], arch.attn[layer]
            regs.append(partial(proj.register_forward_pre_hook, self.on_proj(layer), with_kwargs=True))
            regs.append(partial(attn.register_forward_hook, self.on_attn(layer)))
        return regs


def _roles(tok: Any, chunk: list[SuffixedPrompt], mask: torch.Tensor) -> torch.Tensor:
    """[b, seq, len(ROLES)] one-hot role of every real token of a padded batch."""
    roles = torch.zeros(*mask.shape, len(ROLES))
    for row, p in enumerate(chunk):
        real = mask[row].nonzero().flatten()
        ids = torch.tensor(token_roles(tok, p))
        if len(ids) != len(real):  # the batch and the prompt alone must tokenize alike
            raise RefusalkitError(
                "a prompt tokenizes differently alone and in a batch; cannot locate its roles"
            )
        roles[row, real, ids] = 1.0
    return roles


@torch.inference_mode()
def trace(
    lm: LoadedModel,
    prompts: list[SuffixedPrompt],
    unit: torch.Tensor,
    refusal_ids: list[int],
    *,
    batch_size: int = 8,
    desc: str = "trace",
) -> Trace:
    """Measure (a), (b), (c) and the refusal metric for ``prompts`` in one forward pass per batch."""
    arch, tok = lm.arch, lm.tokenizer
    L = arch.n_layers
    u = unit.float().cpu()
    probe = _Probes(arch, u)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("resid", "attr", "share", "metric", "n_suffix")}
    with (
        eager_attention(lm.model),
        hooks(probe.registrations()),
        capture_resid_pre(arch, list(range(L)), probe.on_resid),
    ):
        for chunk in tqdm(batches(prompts, batch_size), desc=desc, leave=False, disable=None):
            batch = encode(tok, [p.text for p in chunk])
            probe.last, probe.roles = batch.last_index, _roles(tok, chunk, batch.attention_mask)
            logits = last_logits(lm, batch)
            out["resid"].append(torch.stack([probe.resid[i] for i in range(L + 1)], 1))  # [b, L+1, d]
            out["attr"].append(torch.stack([probe.attr[i] for i in range(L)], 1))
            out["share"].append(torch.stack([probe.share[i] for i in range(L)], 1))
            out["metric"].append(refusal_metric(logits, refusal_ids).cpu())
            out["n_suffix"].append(probe.roles[..., ROLES.index("suffix")].sum(-1))
    h = torch.cat(out["resid"])
    proj = h @ u
    return Trace(
        cosine=proj / h.norm(dim=-1).clamp_min(1e-12),
        projection=proj,
        head_attr=torch.cat(out["attr"]),
        attn_share=torch.cat(out["share"]),
        metric=torch.cat(out["metric"]),
        suffix_tokens=torch.cat(out["n_suffix"]),
    )
