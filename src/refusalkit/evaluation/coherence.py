"""Coherence: how much an edit disturbs the model where it should not (PAPER.md section 6).

- first-token KL on harmless prompts: KL(unedited || edited) of the next-token distribution at the end of
  each prompt, the same quantity selection thresholds;
- cross-entropy on a text corpus (a file, cut into fixed-length token windows from its start);
- cross-entropy of the unedited model's own greedy completions of harmless prompts, over the completion
  tokens only, conditioned on the prompt.

Each is measured per setting: baseline, ablation, actadd (c = -1 at the direction's layer, the jailbreak
setting) and orthogonalized (weights). CE is the mean negative log-likelihood per scored token, in nats.
``direction_projections`` reads the residual along the direction per prompt and layer, for the report.
The teacher-forced passes under it are ``evaluation/continuations.py``'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from refusalkit.activations import encode_batches, forward_after_prefix, prefix_cache, repeat_cache
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.continuations import (  # re-exported: the measurements import them from here
    LOGIT_BUDGET,
    MIN_PREFIX,
    ContinuationReplay,
    ContinuationScores,
    replay_added,
    score_continuations,
)
from refusalkit.interventions import RowSteering, ablate_direction, add_direction, capture_resid_pre
from refusalkit.metric import kl_div
from refusalkit.models.loading import LoadedModel
from refusalkit.orthogonalize import orthogonalized

log = logging.getLogger(__name__)
__all__ = [
    "ACTADD_COEFF", "COHERENCE_SETTINGS", "HOOK_SETTINGS", "LOGIT_BUDGET", "MIN_PREFIX", "ContinuationReplay",
    "ContinuationScores", "available_settings", "corpus_ce", "corpus_windows", "direction_projections",
    "first_token_kl", "harmless_coherence", "intervention", "kl_stats", "row_steering", "score_continuations",
    "score_settings",
]  # fmt: skip

COHERENCE_SETTINGS = ("baseline", "ablation", "actadd", "orthogonalized")


ACTADD_COEFF = -1.0  # actadd in the coherence measurements: the jailbreak setting


def intervention(
    lm: LoadedModel, setting: str, direction: Direction, coeff: float = ACTADD_COEFF
) -> AbstractContextManager[Any]:
    """The context manager that puts ``lm`` in ``setting``: the one mapping from a setting's name to an
    edit, for the evaluate and measure stages. ``coeff`` scales actadd (-1: the jailbreak setting, +1:
    induced refusal); the other settings ignore it."""
    if setting == "baseline":
        return nullcontext()
    if setting == "ablation":
        return ablate_direction(lm.arch, direction.vector)
    if setting == "actadd":
        return add_direction(lm.arch, direction.vector, direction.layer, coeff)
    if setting == "orthogonalized":
        return orthogonalized(lm, direction.vector)
    raise RefusalkitError(f"unknown setting {setting!r}; known: {', '.join(COHERENCE_SETTINGS)}")


HOOK_SETTINGS = ("baseline", "ablation", "actadd")  # settings that rows of one batch can mix


def row_steering(settings: Sequence[tuple[str, float]], direction: Direction) -> RowSteering:
    """``intervention`` per batch row: one kind per (setting, actadd coefficient), baseline, ablation
    or actadd, for passes whose rows mix them (the evaluate stage's shared generation)."""
    vec = direction.vector.double()
    zero = torch.zeros_like(vec)
    units, adds = [], []
    for name, coeff in settings:
        if name not in HOOK_SETTINGS:
            raise RefusalkitError(
                f"{name} is not an inference-time setting; known: {', '.join(HOOK_SETTINGS)}"
            )
        units.append(vec / vec.norm() if name == "ablation" else zero)
        adds.append(coeff * vec if name == "actadd" else zero)
    return RowSteering(torch.stack(units), torch.stack(adds), direction.layer)


def available_settings(lm: LoadedModel, wanted: Sequence[str] = COHERENCE_SETTINGS) -> list[str]:
    """``wanted`` minus orthogonalized when the architecture cannot be orthogonalized exactly."""
    return [s for s in wanted if s != "orthogonalized" or lm.arch.spec.weights_orthogonalizable]


@torch.inference_mode()
def direction_projections(
    lm: LoadedModel, prompts: list[str], direction: Direction, *, batch_size: int = 16
) -> list[list[float]]:
    """x . r^ of resid_pre at the direction's position (counted from the end), at every layer.

    prompts: formatted. Returns [n_prompts][n_layers]; the report draws them against the layer axis.
    """
    u = direction.unit.double().cpu()
    n_layers = lm.arch.n_layers
    current: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}

    def sink(layer: int, h: torch.Tensor) -> None:
        idx = state["pos"].to(h.device)
        current[layer] = h[torch.arange(h.shape[0], device=h.device), idx].double().cpu() @ u  # [batch]

    # Left-padded suffixes after the shared prefix (run once, outside the capture): the position read
    # is column ``width + position`` of every row, never inside the prefix.
    enc = encode_batches(lm, prompts, batch_size, keep_last=-direction.position)
    cache = prefix_cache(lm, enc.prefix) if enc.prefix else None
    out: dict[int, list[float]] = {}
    with capture_resid_pre(lm.arch, list(range(n_layers)), sink):
        for rows, input_ids, mask in enc.batches:
            state["pos"] = torch.full((len(rows),), input_ids.shape[1] + direction.position)
            past = repeat_cache(cache, len(rows)) if cache is not None else None
            forward_after_prefix(lm, past, len(enc.prefix), input_ids, mask, keep=1)
            values = torch.stack([current[layer] for layer in range(n_layers)], dim=1).tolist()
            out.update(zip(rows, values, strict=True))
    return [out[i] for i in range(len(prompts))]


def first_token_kl(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || edited) per prompt. [n, vocab] x [n, vocab] -> [n] float64."""
    return kl_div(base_logits, edited_logits)


def score_settings(
    lm: LoadedModel, direction: Direction, contexts: list[list[int]], continuations: list[list[int]],
    settings: Sequence[str], *, batch_size: int = 16, keep_first_logits: bool = False,
) -> dict[str, ContinuationScores]:  # fmt: skip
    """``score_continuations`` under each setting (``intervention``), in the order given. When baseline
    comes before actadd, actadd restarts from the baseline's pass at the direction's layer
    (``replay_added``: the same numbers, without recomputing the layers below it)."""
    runs: dict[str, ContinuationScores] = {}
    record = direction.layer if "actadd" in settings else None
    for name in settings:
        base = runs.get("baseline")
        if name == "actadd" and base is not None and base.replay is not None:
            added = replay_added(
                lm, base.replay, ACTADD_COEFF * direction.vector.double(), keep_first_logits=keep_first_logits
            )
            base.replay = None  # its recorded activations are not needed any more
            if added is not None:
                runs[name] = added
                continue
        with intervention(lm, name, direction):
            runs[name] = score_continuations(
                lm, contexts, continuations, batch_size=batch_size, keep_first_logits=keep_first_logits,
                record_at=record if name == "baseline" else None,
            )  # fmt: skip
    for s in runs.values():
        s.replay = None
    return runs


# ---- corpus ------------------------------------------------------------------------------------------


def corpus_windows(tokenizer: Any, path: str | Path, n_windows: int, window_tokens: int) -> list[list[int]]:
    """The first ``n_windows`` non-overlapping windows of ``window_tokens`` tokens of a text file."""
    path = Path(path)
    if not path.is_file():
        raise RefusalkitError(
            f"corpus file {path} not found. Give a plain-text file with --corpus PATH (the shared data has "
            "corpus/wikitext2_tokenized_test.txt and corpus/tinyshakespeare.txt), set --data-dir to the folder "
            "holding corpus/, or drop 'corpus_ce' from --measurements"
        )
    if window_tokens < 2:
        raise RefusalkitError("--corpus-window-tokens must be at least 2 (one token predicts the next)")
    text = path.read_text(encoding="utf-8", errors="replace")
    need = n_windows * window_tokens
    # Tokenize a prefix generous enough for most tokenizers; fall back to the whole text if short.
    ids: list[int] = tokenizer(text[: need * 16], add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < need:
        raise RefusalkitError(
            f"corpus {path} has {len(ids)} tokens, fewer than {n_windows} windows x {window_tokens}; "
            "use a longer file or lower --corpus-windows / --corpus-window-tokens"
        )
    return [ids[i * window_tokens : (i + 1) * window_tokens] for i in range(n_windows)]


def corpus_ce(
    lm: LoadedModel,
    direction: Direction,
    windows: list[list[int]],
    settings: Sequence[str],
    *,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Mean next-token CE over the windows (every token after the first is scored), per setting."""
    out: dict[str, Any] = {"ce": {}, "ce_per_window": {}}
    runs = score_settings(
        lm, direction, [w[:1] for w in windows], [w[1:] for w in windows], settings, batch_size=batch_size
    )
    for name, s in runs.items():
        out["ce"][name] = s.ce
        out["ce_per_window"][name] = (-s.logprob_sum / s.n_tokens).tolist()
    out["n_tokens_scored"] = int(sum(len(w) - 1 for w in windows))
    return out


# ---- the model's own completions of harmless prompts ---------------------------------------------------


def kl_stats(per_prompt: torch.Tensor) -> dict[str, Any]:
    """Mean, median and max of per-prompt KL values [n], and the values themselves."""
    return {
        "mean": float(per_prompt.mean()),
        "median": float(per_prompt.median()),
        "max": float(per_prompt.max()),
        "per_prompt": per_prompt.tolist(),
    }


def harmless_coherence(
    lm: LoadedModel,
    direction: Direction,
    prompts: list[str],
    completions: list[str],
    settings: Sequence[str],
    *,
    batch_size: int = 8,
    max_completion_tokens: int | None = None,
    kl_prompts: list[str] | None = None,
) -> dict[str, Any]:
    """First-token KL against the unedited model and CE of the baseline completions, per setting.

    prompts: formatted (chat template applied); completions: the unedited model's completions of them.
    KL is measured on ``kl_prompts`` (formatted; a larger set, since it needs no generation) when
    given, else on ``prompts``. One teacher-forced pass per setting gives both: a KL prompt that is
    also a CE prompt carries its completion (its first-token logits are read at its last prompt
    token either way). KL values: mean, median, max and per prompt.
    """
    tok = lm.tokenizer
    kl_rows = list(kl_prompts if kl_prompts is not None else prompts)
    rows, conts = list(kl_rows), [list[int]() for _ in kl_rows]
    free: dict[str, int] = {}  # prompt -> a KL row still without a continuation
    for i in reversed(range(len(kl_rows))):
        free[kl_rows[i]] = i
    ce_rows = []
    for p, c in zip(prompts, completions, strict=True):
        ids = tok(c, add_special_tokens=False)["input_ids"][:max_completion_tokens]
        r = free.pop(p, None)
        if r is None:
            r = len(rows)
            rows.append(p)
            conts.append([])
        conts[r] = ids
        ce_rows.append(r)
    ctx = [tok(p, add_special_tokens=False)["input_ids"] for p in rows]
    names = ["baseline", *[s for s in settings if s != "baseline"]]
    runs = score_settings(lm, direction, ctx, conts, names, batch_size=batch_size, keep_first_logits=True)
    base = runs["baseline"].first_logits
    assert base is not None
    idx = torch.tensor(ce_rows, dtype=torch.long)
    kl: dict[str, Any] = {}
    ce: dict[str, Any] = {}
    for name, s in runs.items():
        assert s.first_logits is not None
        if name != "baseline":
            kl[name] = kl_stats(first_token_kl(base[: len(kl_rows)], s.first_logits[: len(kl_rows)]))
        if name in settings:
            lp, nt = s.logprob_sum[idx], s.n_tokens[idx]
            per = (-lp / nt.clamp(min=1)).tolist()
            ce[name] = {
                "ce": float(-lp.sum() / nt.sum().clamp(min=1)),
                "per_completion": [x if math.isfinite(x) else None for x in per],
            }
    return {
        "kl": kl,
        "completion_ce": ce,
        "n_prompts": len(prompts),
        "n_kl_prompts": len(kl_rows),
        "n_completion_tokens": int(runs["baseline"].n_tokens[idx].sum()),
    }
