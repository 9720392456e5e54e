"""How suffixes act on the refusal direction (PAPER.md section 7), measured at the last prompt token.

Four conditions: ``harmful`` prompts, ``adversarial`` (harmful + each found suffix), ``random``
(harmful + random suffixes of the same token length, seeded) and ``harmless`` prompts. For each:

(a) cosine of the last-token residual with the unit direction r^ at every layer;
(b) direct attribution of every attention head's output onto r^ (see ``trace``; pre-norm where a norm
    follows the output projection, and ``attribution_site`` says so); the top heads by mean
    attribution on harmful prompts, and their attribution in each condition;
(c) those heads' attention from the last token: shares on the template before the instruction, the
    instruction, the suffix and the template after (they sum to one);
(d) the refusal metric (no generation) and the refusal rate of greedy completions (substring judge).

The JSON names prompts by index only; suffix strings are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.analysis.tokens import (
    ROLES,
    PromptTemplate,
    SuffixedPrompt,
    allowed_token_ids,
    random_suffixes,
    suffix_token_length,
)
from refusalkit.analysis.trace import Trace, trace
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.refusal import is_refusal, rate
from refusalkit.generation import generate
from refusalkit.models.loading import LoadedModel

CONDITIONS: tuple[str, ...] = ("harmful", "adversarial", "random", "harmless")


@dataclass
class Condition:
    """The prompts of one condition; ``prompt_index`` points into the harmful (or harmless) list and
    ``suffix_index`` into the condition's suffixes (-1: no suffix)."""

    name: str
    prompts: list[SuffixedPrompt]
    prompt_index: list[int]
    suffix_index: list[int]


def build_conditions(
    template: PromptTemplate,
    harmful: list[str],
    harmless: list[str],
    adversarial: list[str],
    random: list[str],
) -> list[Condition]:
    def suffixed(name: str, suffixes: list[str]) -> Condition:
        pairs = [(i, j) for j in range(len(suffixes)) for i in range(len(harmful))]
        return Condition(
            name,
            [template.render(harmful[i], suffixes[j]) for i, j in pairs],
            [i for i, _ in pairs],
            [j for _, j in pairs],
        )

    return [
        Condition(
            "harmful", [template.render(x) for x in harmful], list(range(len(harmful))), [-1] * len(harmful)
        ),
        suffixed("adversarial", adversarial),
        suffixed("random", random),
        Condition(
            "harmless",
            [template.render(x) for x in harmless],
            list(range(len(harmless))),
            [-1] * len(harmless),
        ),
    ]


def _stats(x: torch.Tensor) -> dict[str, list[float]]:
    return {"mean": x.mean(0).tolist(), "std": x.std(0, unbiased=False).tolist()}


def _rate(refused: list[bool]) -> dict[str, Any]:
    return rate(sum(refused), len(refused))


def _refusal(
    cond: Condition, tr: Trace, refused: list[bool] | None, suffixes: list[str], search: set[int]
) -> dict[str, Any]:
    res: dict[str, Any] = {"metric_mean": float(tr.metric.mean()), "metric": tr.metric.tolist()}
    if refused is not None:
        res |= _rate(refused) | {"per_prompt": refused}
    if suffixes and refused is not None:
        res["per_suffix"] = []
        for j, s in enumerate(suffixes):
            rows = [r for r, sj in enumerate(cond.suffix_index) if sj == j]
            res["per_suffix"].append(
                {
                    "suffix": s,
                    **_rate([refused[r] for r in rows]),
                    "metric_mean": float(tr.metric[rows].mean()),
                }
            )
        if search and cond.name == "adversarial":
            for part, keep in (("search_prompts", True), ("heldout_prompts", False)):
                rows = [r for r, i in enumerate(cond.prompt_index) if (i in search) == keep]
                if rows:
                    res[part] = _rate([refused[r] for r in rows]) | {
                        "metric_mean": float(tr.metric[rows].mean())
                    }
    return res


@dataclass
class Measured:
    """Every condition's trace, greedy-completion verdicts (None without generation) and completions."""

    conditions: list[Condition]
    traces: dict[str, Trace]
    refused: dict[str, list[bool] | None]
    completions: dict[str, list[dict[str, Any]]]


def measure(
    lm: LoadedModel,
    conditions: list[Condition],
    unit: torch.Tensor,
    refusal_ids: list[int],
    *,
    batch_size: int,
    max_new_tokens: int,
    generate_completions: bool,
) -> Measured:
    m = Measured([c for c in conditions if c.prompts], {}, {}, {})
    for cond in m.conditions:
        m.traces[cond.name] = trace(
            lm, cond.prompts, unit, refusal_ids, batch_size=batch_size, desc=cond.name
        )
        m.refused[cond.name] = None
        if not generate_completions:
            continue
        texts = generate(
            lm,
            [p.text for p in cond.prompts],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            desc=f"generate {cond.name}",
        )
        verdicts = [is_refusal(t) for t in texts]
        m.refused[cond.name] = verdicts
        rows = zip(cond.prompt_index, cond.suffix_index, verdicts, texts, strict=True)
        m.completions[cond.name] = [
            {"prompt_index": i, "suffix_index": j, "refused": r, "completion": t} for i, j, r, t in rows
        ]
    return m


def _top_heads(m: Measured, lm: LoadedModel, unit: torch.Tensor, n_top: int) -> dict[str, Any]:
    """(b) and (c) for the ``n_top`` heads with the largest mean attribution on harmful prompts."""
    arch, names = lm.arch, [c.name for c in m.conditions]
    base = m.traces["harmful"].head_attr.mean(0)  # [L, H]
    order = base.flatten().argsort(descending=True)[: min(n_top, base.numel())]
    top = [(int(i) // arch.n_heads, int(i) % arch.n_heads) for i in order]
    post_norm = arch.spec.attn_write != arch.spec.attn_out_proj
    bias = [
        float(b.float() @ unit.to(b.device))
        if isinstance(b := getattr(p, "bias", None), torch.Tensor)
        else 0.0
        for p in arch.attn_out_proj
    ]

    def shares(n: str, heads: list[tuple[int, int]]) -> dict[str, float]:
        x = torch.stack([m.traces[n].attn_share[:, ly, hd] for ly, hd in heads], 1)  # [n, heads, roles]
        return dict(zip(ROLES, x.mean((0, 1)).tolist(), strict=True))

    return {
        "head_attribution": {
            "attribution_site": "attention output projection"
            + (" (pre-norm: a norm follows it)" if post_norm else ""),
            "bias_projection": bias,
            "mean": {n: m.traces[n].head_attr.mean(0).tolist() for n in names},
            "top_heads": [
                {"layer": ly, "head": hd} | {n: float(m.traces[n].head_attr[:, ly, hd].mean()) for n in names}
                for ly, hd in top
            ],
        },
        "attention": {
            "top_heads": [
                {"layer": ly, "head": hd} | {n: shares(n, [(ly, hd)]) for n in names} for ly, hd in top
            ],
            "mean_over_top_heads": {n: shares(n, top) for n in names},
        },
    }


def analyze_suffixes(
    lm: LoadedModel,
    direction: Direction,
    harmful: list[str],
    harmless: list[str],
    adversarial: list[str],
    *,
    refusal_ids: list[int],
    n_random: int = 3,
    seed: int = 0,
    top_heads: int = 8,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    generate_completions: bool = True,
    system: str | None = None,
    search_prompts: list[int] | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run (a)-(d) for every condition. Returns (results for JSON, completions per condition).

    ``search_prompts``: indices of ``harmful`` the suffix was optimized on, to report the refusal
    rate on them apart from held-out prompts.
    """
    if not adversarial:
        raise RefusalkitError(
            "no adversarial suffix to analyse; run `refusalkit suffix search` or pass --suffix-file"
        )
    if not harmful or not harmless:
        raise RefusalkitError("the suffix analysis needs harmful and harmless prompts")
    arch, tok = lm.arch, lm.tokenizer
    if not arch.n_heads:
        raise RefusalkitError("the model config names no attention head count; cannot attribute per head")
    n_tokens = suffix_token_length(tok, adversarial[0])
    allowed = allowed_token_ids(tok, lm.model.get_input_embeddings().weight.shape[0])
    controls = random_suffixes(tok, n_random, n_tokens, seed=seed, allowed=allowed) if n_random else []
    template = PromptTemplate.from_tokenizer(tok, system)
    unit = direction.unit.float()
    m = measure(
        lm,
        build_conditions(template, harmful, harmless, adversarial, controls),
        unit,
        refusal_ids,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        generate_completions=generate_completions,
    )
    suffixes = {"adversarial": adversarial, "random": controls, "n_tokens": n_tokens, "seed": seed}
    results = {
        "model": lm.name,
        "direction": {"layer": direction.layer, "position": direction.position},
        "n_layers": arch.n_layers,
        "n_heads": arch.n_heads,
        "conditions": [c.name for c in m.conditions],
        "roles": list(ROLES),
        "suffixes": suffixes,
        "prompts": {
            "harmful": list(range(len(harmful))),
            "harmless": list(range(len(harmless))),
            "search": sorted(set(search_prompts or [])),
        },
        **_measured(m, lm, unit, top_heads, suffixes, set(search_prompts or [])),
        "max_new_tokens": max_new_tokens if generate_completions else 0,
    }
    results["summary"] = summarize(results)
    return results, m.completions


def _measured(
    m: Measured, lm: LoadedModel, unit: torch.Tensor, n_top: int, suffixes: dict[str, Any], search: set[int]
) -> dict[str, Any]:
    """(a)-(d) of every condition as JSON: residual cosines and projections per site, head attribution
    and attention of the top heads, refusal."""
    names = [c.name for c in m.conditions]
    n_layers = lm.arch.n_layers
    sites = [f"resid_pre.{layer}" for layer in range(n_layers)] + [f"resid_post.{n_layers - 1}"]
    return {
        "suffix_tokens_in_context": {n: _stats(m.traces[n].suffix_tokens[:, None]) for n in names},
        "cosine": {"sites": sites} | {n: _stats(m.traces[n].cosine) for n in names},
        "projection": {"sites": sites} | {n: _stats(m.traces[n].projection) for n in names},
        **_top_heads(m, lm, unit, n_top),
        "refusal": {
            c.name: _refusal(c, m.traces[c.name], m.refused[c.name], suffixes.get(c.name, []), search)
            for c in m.conditions
        },
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: how far each suffix moves harmful prompts toward harmless, at and after the
    direction's layer; the top heads' summed attribution; their attention on the suffix; refusal."""
    layer = results["direction"]["layer"]
    cos = results["cosine"]
    names = results["conditions"]
    out: dict[str, Any] = {}
    for n in names:
        at = cos[n]["mean"][layer]
        late = sum(cos[n]["mean"][layer:]) / len(cos[n]["mean"][layer:])
        out[n] = {
            "cosine_at_layer": at,
            "cosine_mean_from_layer": late,
            "top_heads_attribution": sum(h[n] for h in results["head_attribution"]["top_heads"]),
            "top_heads_suffix_share": results["attention"]["mean_over_top_heads"][n]["suffix"],
            "top_heads_instruction_share": results["attention"]["mean_over_top_heads"][n]["instruction"],
            "refusal_rate": results["refusal"][n].get("rate"),
            "refusal_metric": results["refusal"][n]["metric_mean"],
        }
    if "harmful" in out and "harmless" in out:
        gap = out["harmful"]["cosine_at_layer"] - out["harmless"]["cosine_at_layer"]
        for n in ("adversarial", "random"):
            if n in out and abs(gap) > 1e-9:
                # 0: no movement; 1: all the way to the harmless level (PAPER.md section 7's claim for GCG)
                out[n]["gap_closed_at_layer"] = (
                    out["harmful"]["cosine_at_layer"] - out[n]["cosine_at_layer"]
                ) / gap
    return out
