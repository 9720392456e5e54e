"""Scoring the candidates: only the work that can change the pick, unless asked for everything.

Order of work, cheapest first:
1. bypass of every candidate (ablation on the harmful validation prompts; several candidates share a
   forward pass when those prompts are few);
2. in order of increasing bypass: induce (addition, restarted at the candidate's layer), then KL
   (ablation on the harmless prompts) only if induce passes. The pick is the kept candidate with the
   lowest bypass, so once one is kept no later one can win: the rest are pruned;
3. if nothing is kept, the KL of the candidates nearest to passing the induce rule, so the error can
   say which loosened threshold would give which pick (``rules.loosened_picks``).
``rules.exhaustive`` computes every score of every candidate. A computed score is the same number
either way, and so is the pick.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from refusalkit.activations import BATCH_OVERHEAD_TOKENS, PromptBatches, encode_batches
from refusalkit.directions import Candidates
from refusalkit.metric import kl_function, refusal_metric
from refusalkit.models.loading import LoadedModel
from refusalkit.selection.passes import ResidReplay, ablated_logits
from refusalkit.selection.rules import (
    CandidateScore,
    SelectionRules,
    discard_reason,
    induce_flag,
    layer_cutoff,
)

Checkpoint = Callable[[list[CandidateScore]], None]
MAX_SHARED = 16  # most candidates in one forward pass
PASS_TOKENS = 2048  # token slots per forward pass when candidates share it (memory ~ this * MLP width)
SPECULATE_AFTER = 5  # rejections in a row after which induce is computed for a layer's candidates at once


class Scorer:
    """The three scores of a candidate, with what every candidate shares computed once."""

    def __init__(
        self, lm: LoadedModel, candidates: Candidates, harmful_val: list[str], harmless_val: list[str],
        refusal_ids: list[int], rules: SelectionRules, batch_size: int, layers: list[int],
    ) -> None:  # fmt: skip
        self.lm, self.candidates, self.ids = lm, candidates, refusal_ids
        self.kl_fn = kl_function(rules.kl_definition)
        # Bypass runs every harmful batch once per candidate sharing its pass (up to MAX_SHARED of them),
        # so its padding costs that many times over while the pass's fixed cost does not: cut finer.
        # The harmless batches mostly serve one candidate at a time (KL in order of bypass), where
        # small passes run the matrix products below their speed (on a CPU: 118 GFLOP/s at 80 rows,
        # 175 at 650): cut as usual.
        overhead = BATCH_OVERHEAD_TOKENS / MAX_SHARED
        self.harmful = encode_batches(lm, harmful_val, batch_size, pass_overhead=overhead)
        self.harmless = encode_batches(lm, harmless_val, batch_size)
        # Candidates per forward pass: each pass reads every weight once (on a CPU, as long as tens of
        # tokens of compute), so candidates share passes up to a token budget per pass.
        self.share_harmful = _share(self.harmful)
        self.share_harmless = _share(self.harmless)
        self.layers = layers
        self._replay: ResidReplay | None = None

    @property
    def replay(self) -> ResidReplay:
        if self._replay is None:  # the baseline pass, only once a candidate needs induce or KL
            self._replay = ResidReplay(self.lm, self.harmless, self.layers)
        return self._replay

    def vector(self, s: CandidateScore) -> torch.Tensor:
        return self.candidates.directions[s.position + self.candidates.n_positions, s.layer].float()

    def bypass(self, group: list[CandidateScore]) -> None:
        dirs = torch.stack([self.vector(s) for s in group])
        metrics = ablated_logits(self.lm, self.harmful, dirs, self._metric)
        for s, values in zip(group, metrics, strict=True):
            s.bypass = float(values.mean())

    def induce(self, group: list[CandidateScore]) -> None:
        """Induce scores of candidates at one layer, sharing forward passes."""
        vectors = torch.stack([self.vector(s) for s in group])
        metrics = self.replay.added_logits(vectors, group[0].layer, self._metric)
        for s, values in zip(group, metrics, strict=True):
            s.induce = float(values.mean())

    def kl(self, group: list[CandidateScore]) -> None:
        base = self.replay.baseline
        k = len(group)

        def kl(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
            return self.kl_fn(base[torch.tensor(rows)].repeat(k, 1), logits)

        dirs = torch.stack([self.vector(s) for s in group])
        for s, values in zip(group, ablated_logits(self.lm, self.harmless, dirs, kl), strict=True):
            s.kl = float(values.mean())

    def _metric(self, logits: torch.Tensor, _rows: list[int]) -> torch.Tensor:
        return refusal_metric(logits, self.ids)


def _share(enc: PromptBatches) -> int:
    widest = max((ids.numel() for _, ids, _ in enc.batches), default=1)
    return max(1, min(MAX_SHARED, PASS_TOKENS // max(widest, len(enc.prefix), 1)))


def _usable(v: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).all()) and float(v.norm()) > 0.0


def score_candidates(
    lm: LoadedModel,
    candidates: Candidates,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_ids: list[int],
    *,
    rules: SelectionRules,
    batch_size: int = 16,
    done: list[CandidateScore] | None = None,
    checkpoint: Checkpoint | None = None,
) -> list[CandidateScore]:
    """Score the candidates (see the module docstring); ``done`` scores are reused (resume) and
    ``checkpoint`` sees progress. Returns one score per (position, layer), NaN where not computed."""
    n_layers, nan = candidates.n_layers, math.nan
    cutoff = layer_cutoff(n_layers, rules)
    results = {(s.position, s.layer): s for s in (done or [])}
    keys = [
        (candidates.position_label(p), layer)
        for layer in range(n_layers)
        for p in range(candidates.n_positions)
        if rules.score_late_layers or layer < cutoff
    ]
    layers = sorted({layer for _, layer in keys})
    scorer = Scorer(lm, candidates, harmful_val, harmless_val, refusal_ids, rules, batch_size, layers or [0])

    def save() -> None:
        if checkpoint is not None:
            checkpoint(list(results.values()))

    todo = []
    for key in keys:
        if key not in results:
            s = results[key] = CandidateScore(*key, nan, nan, nan, complete=False)
            if _usable(scorer.vector(s)):
                todo.append(s)
            else:
                s.complete = True  # nothing to ablate or add: every score is NaN
    groups = [todo[i : i + scorer.share_harmful] for i in range(0, len(todo), scorer.share_harmful)]
    for i, group in enumerate(tqdm(groups, desc="bypass scores", disable=None)):
        scorer.bypass(group)
        for s in group:
            s.complete = s.complete or math.isnan(s.bypass)  # a NaN bypass discards it already
        if i % 4 == 3 or i == len(groups) - 1:
            save()
    pending = sorted(
        (s for s in results.values() if not s.complete and not math.isnan(s.bypass)), key=lambda s: s.bypass
    )
    if rules.exhaustive:
        _score_everything(scorer, pending, save)
    else:
        _score_until_certain(
            scorer, pending, [s for s in results.values() if s.complete], rules, cutoff, save
        )
    for p in range(candidates.n_positions):
        for layer in range(n_layers):
            key = (candidates.position_label(p), layer)
            results.setdefault(key, CandidateScore(key[0], layer, nan, nan, nan))
    return sorted(results.values(), key=lambda s: (s.layer, s.position))


def _by_layer(scores: list[CandidateScore], k: int) -> list[list[CandidateScore]]:
    """Groups of at most k candidates of one layer (restarted addition passes start at one layer)."""
    layers: dict[int, list[CandidateScore]] = {}
    for s in scores:
        layers.setdefault(s.layer, []).append(s)
    return [group[i : i + k] for group in layers.values() for i in range(0, len(group), k)]


def _score_everything(scorer: Scorer, pending: list[CandidateScore], save: Callable[[], None]) -> None:
    todo = [s for s in pending if math.isnan(s.induce)]
    for group in tqdm(_by_layer(todo, scorer.share_harmless), desc="induce scores", disable=None):
        scorer.induce(group)
    k = scorer.share_harmless
    todo = [s for s in pending if math.isnan(s.kl)]
    for i in tqdm(range(0, len(todo), k), desc="KL scores", disable=None):
        scorer.kl(todo[i : i + k])
        for s in todo[i : i + k]:
            s.complete = True
        save()


def _score_until_certain(
    scorer: Scorer, pending: list[CandidateScore], judged: list[CandidateScore], rules: SelectionRules,
    cutoff: int, save: Callable[[], None],
) -> None:  # fmt: skip
    """In order of bypass: induce, then KL if induce passes, until a candidate is kept. After
    ``SPECULATE_AFTER`` rejections in a row, a candidate's induce pass also scores the other pending
    candidates of its layer (sharing the pass): likely needed when few candidates pass, and the same
    numbers either way."""
    n_layers = scorer.candidates.n_layers

    def kept(s: CandidateScore) -> bool:
        return s.complete and not discard_reason(s, cutoff, n_layers, rules)

    best = min((s for s in judged if kept(s)), key=lambda s: s.bypass, default=None)
    rejected = 0
    for s in tqdm(pending, desc="induce and KL", disable=None):
        if s.layer >= cutoff or (best is not None and s.bypass >= best.bypass):
            continue  # cannot be the pick: left pruned
        if math.isnan(s.induce):
            group = [s]
            if rejected >= SPECULATE_AFTER:
                same = [t for t in pending if t.layer == s.layer and t is not s and math.isnan(t.induce)]
                group += same[: scorer.share_harmless - 1]
            scorer.induce(group)
        if s.induce >= rules.induce_threshold and math.isnan(s.kl):
            scorer.kl([s])  # only a candidate the induce rule keeps needs its KL
        s.complete = True
        if kept(s) and (best is None or s.bypass < best.bypass):
            best = s
        rejected = 0 if kept(s) else rejected + 1
        save()
    if best is None:
        _score_for_hints(scorer, [*judged, *pending], rules, cutoff, save)


def _score_for_hints(
    scorer: Scorer, scores: list[CandidateScore], rules: SelectionRules, cutoff: int,
    save: Callable[[], None],
) -> None:  # fmt: skip
    """Nothing kept: the KL of the candidates nearest to the induce threshold, down to the first that
    passes the KL rule (and its ties at the flag's precision), so a loosened --induce-threshold can be
    suggested with its exact pick. Loosening KL needs nothing more: every candidate the induce rule
    keeps has its KL already."""
    below = sorted(
        (
            s for s in scores
            if s.layer < cutoff and s.complete and math.isfinite(s.bypass) and math.isfinite(s.induce)
            and s.induce < rules.induce_threshold
        ),
        key=lambda s: -s.induce,
    )  # fmt: skip
    floor = -math.inf
    for s in below:
        if s.induce < floor:
            break
        if math.isnan(s.kl):
            scorer.kl([s])
            save()
        if math.isfinite(s.kl) and s.kl <= rules.kl_threshold and floor == -math.inf:
            floor = induce_flag(s.induce)
