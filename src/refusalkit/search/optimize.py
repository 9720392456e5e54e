"""`refusalkit optimize RUN_DIR`: search edits on a run's candidates, verify the front, choose, export.

Reads the run folder (settings in the manifest, splits, extract/candidates.safetensors and, if the
select stage ran, the paper's pick), keeps one model loaded for every trial, and writes
search/study.db (the Optuna study), search/front.json and search/chosen.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from refusalkit.data import load_instructions
from refusalkit.directions import Candidates, Direction
from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.metric import refusal_token_ids
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.prompts import format_prompts
from refusalkit.search.edit import EditParams, applied_edit, export_edit_checkpoint
from refusalkit.search.front import Point, choose, points_of, write_front
from refusalkit.search.objectives import ProxyScorer
from refusalkit.search.space import SearchSpace, seed_params
from refusalkit.search.study import Budget, Seed, front_trials, open_study, run_search, trial_records
from refusalkit.search.verify import Verifier
from refusalkit.settings import Settings, build_settings
from refusalkit.utils import read_json, sha256_file, sha256_text, write_json

log = logging.getLogger(__name__)


class OptimizeOptions(BaseModel):
    """Options of `refusalkit optimize` (the run's own settings come from its manifest)."""

    trials: int = Field(
        default=40,
        ge=1,
        description="Completed trials the study should hold (a resumed study counts its old ones).",
    )
    minutes: float | None = Field(
        default=10.0, gt=0, description="Wall-time budget for this call's trials; unset: no limit."
    )
    seed: int = Field(default=0, description="Seed of the Optuna sampler.")
    startup_trials: int = Field(default=8, ge=0, description="Random trials before TPE starts modelling.")
    harmful_prompts: str | None = Field(
        default=None,
        description="Harmful prompts for the refusal proxy (data spec); default: the run's harmful_val split.",
    )
    kl_prompts: str | None = Field(
        None,
        description="Harmless prompts for the search's KL (data spec); default: DATA_DIR/refusal_direction/"
        "splits/harmless_val.json, else the run's harmless train and val splits.",
    )
    kl_n: int = Field(
        100,
        ge=1,
        description="Harmless prompts for the search's KL (first N; a KL's heavy tail needs about 100); "
        "verification measures KL on --verify-kl-n held-out prompts.",
    )
    batch_size: int = Field(default=32, ge=1, description="Prompts per forward pass.")
    proxy_new_tokens: int = Field(
        default=24,
        ge=0,
        description="Greedy tokens per harmful prompt judged by both marker lists in each trial (catches "
        "replies that turn to a refusal after the first token); 0: the first token's logits only.",
    )
    sources: list[str] = Field(
        default=["interpolated", "per_layer"],
        description="Direction sources to search: interpolated, per_layer, candidate.",
    )
    positions: list[int] | None = Field(
        default=None,
        description="Post-instruction positions to search (negative); default: -1 and the paper pick's position.",
    )
    edit_embed: bool = Field(False, description="Also search the token-embedding edit (slower per trial).")
    verify_n: int = Field(
        default=3, ge=0, description="Front points to verify on held-out prompts with full generations."
    )
    verify_at: list[float] = Field(
        default=[],
        description="KL budgets (proxy KL, comma-separated) to compare at: the search aims a trial at each "
        "one no trial has reached (the front point nearest above it, weights scaled down), and the front "
        "point with the lowest expected refusal within each is verified first.",
    )
    verify_harmful: str | None = Field(
        default=None,
        description="Held-out harmful prompts for verification (data spec); default: the run's harmful_test split.",
    )
    verify_harmless: str | None = Field(
        None,
        description="Held-out harmless prompts for verification KL (data spec); default: DATA_DIR/refusal_direction/"
        "splits/harmless_test.json, else the run's harmless_test split.",
    )
    verify_kl_n: int = Field(
        100, ge=1, description="Held-out harmless prompts for verification KL (first N)."
    )
    verify_max_new_tokens: int = Field(
        default=64, ge=1, description="New tokens per verification completion (greedy)."
    )
    verify_baseline: bool = Field(
        default=True, description="Also verify the unedited model (one more generation pass)."
    )
    gen_batch_size: int = Field(
        default=128,
        ge=1,
        description="Prompts per verification generation batch (a CPU decodes 100 rows in one step "
        "for about twice the cost of 32).",
    )
    system_prompt: str | None = Field(default=None, description="System prompt; default: the run's.")
    max_kl: float | None = Field(
        default=None,
        gt=0,
        description="Choose the fewest refusals with KL <= this (also limits what is verified).",
    )
    max_refusals: float | None = Field(
        default=None, ge=0, le=1, description="Choose the lowest KL with refusal rate <= this."
    )
    trial: int | None = Field(default=None, ge=0, description="Choose this trial number.")
    export: bool = Field(
        default=False, description="Export the chosen edit as a checkpoint into RUN_DIR/model."
    )

    @field_validator("positions", mode="before")
    @classmethod
    def _split_positions(cls, v: object) -> object:
        return [int(x) for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("verify_at", mode="before")
    @classmethod
    def _split_budgets(cls, v: object) -> object:
        return [float(x) for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("verify_at")
    @classmethod
    def _positive_budgets(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError(f"KL budgets must be positive, got {v}")
        return v

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, v: list[str]) -> list[str]:
        known = ("interpolated", "per_layer", "candidate")
        bad = [x for x in v if x not in known]
        if bad or not v:
            raise ValueError(f"unknown or no direction source {bad}; known: {', '.join(known)}")
        return v


def run_settings(layout: RunLayout) -> Settings:
    saved = read_json(layout.manifest).get("settings", {}) if layout.manifest.is_file() else {}
    return build_settings(base=saved)


def _spec_prompts(spec: str, n: int | None) -> list[str]:
    items = load_instructions(spec).instructions
    return items[:n] if n is not None else items


def prompt_sets(layout: RunLayout, s: Settings, o: OptimizeOptions) -> dict[str, list[str]]:
    """Instructions for each role: harmful (proxy), harmless (search KL), and the held-out sets."""
    if not layout.splits.is_file():
        raise RefusalkitError(
            f"{layout.splits} is missing; run `refusalkit extract --out {layout.root}` first"
        )
    splits = read_json(layout.splits)["splits"]
    shared = Path(s.data_dir) / "refusal_direction" / "splits"

    def default(file: str, fallback: list[str], n: int) -> list[str]:
        path = shared / file
        return _spec_prompts(str(path), n) if path.is_file() else fallback[:n]

    sets = {
        "harmful": _spec_prompts(o.harmful_prompts, None) if o.harmful_prompts else splits["harmful_val"],
        "harmless": _spec_prompts(o.kl_prompts, o.kl_n)
        if o.kl_prompts
        else default("harmless_val.json", splits["harmless_train"] + splits["harmless_val"], o.kl_n),
        "harmful_test": _spec_prompts(o.verify_harmful, None) if o.verify_harmful else splits["harmful_test"],
        "harmless_test": _spec_prompts(o.verify_harmless, o.verify_kl_n)
        if o.verify_harmless
        else default("harmless_test.json", splits["harmless_test"], o.verify_kl_n),
    }
    for name, n in (("harmless", o.kl_n), ("harmless_test", o.verify_kl_n)):
        if len(sets[name]) < n:
            log.warning("only %d %s prompts for KL (asked for %d)", len(sets[name]), name, n)
    return sets


def _default_positions(layout: RunLayout) -> list[int]:
    """The last token (where abliteration tools read the direction) and the paper pick's position."""
    if not layout.direction.with_suffix(".json").is_file():
        return [-1]
    return sorted({-1, Direction.load(layout.direction).position})


def _space(layout: RunLayout, o: OptimizeOptions, n_layers: int) -> SearchSpace:
    """The default space, its direction layers widened to hold the paper pick's (its seeds lie inside)."""
    space = SearchSpace(
        sources=o.sources, positions=o.positions or _default_positions(layout), edit_embed=o.edit_embed
    )
    if layout.direction.with_suffix(".json").is_file():
        at = Direction.load(layout.direction).layer / max(n_layers - 1, 1)
        lo, hi = space.layer_range
        space.layer_range = (min(lo, at), max(hi, at))
    return space


def _seeds(layout: RunLayout, cands: Candidates, space: SearchSpace) -> list[Seed]:
    """The paper's pick, exactly as orthogonalized, then its direction inside the search space."""
    if not layout.direction.with_suffix(".json").is_file():
        # No selection ran: start from the last position's direction two thirds of the way up, where
        # the paper's rules usually pick (a starting point for the sampler, nothing more).
        layer = round(2 * (cands.n_layers - 1) / 3)
        mid = seed_params(layer, -1, cands.n_layers, space)
        return [Seed("mid-dir" + suffix, params=p) for suffix, p in mid.items()]
    d = Direction.load(layout.direction)
    out = [Seed("paper", edit=EditParams.orthogonalization(d.layer, d.position))]
    for suffix, params in seed_params(d.layer, d.position, cands.n_layers, space).items():
        out.append(Seed("paper-dir" + suffix, params=params))
    return out


def _filter_refused(scorer: ProxyScorer) -> None:
    """Keep the harmful prompts the unedited model refuses (metric > 0, as the paper's selection does,
    or, with a generated proxy, a judge's marker in its first tokens)."""
    kept = [p for p, r in zip(scorer.harmful, scorer.refusing(), strict=True) if r]
    if len(kept) >= 2:
        scorer.harmful = kept


def _fingerprint(
    lm: LoadedModel, layout: RunLayout, sets: dict[str, list[str]], ids: list[int], space: SearchSpace,
    o: OptimizeOptions,
) -> str:  # fmt: skip
    parts = {
        "model": lm.fingerprint,
        "candidates": sha256_file(layout.candidates),
        "harmful": sha256_text("\n".join(sets["harmful"])),
        "harmless": sha256_text("\n".join(sets["harmless"])),
        "refusal_ids": ids,
        "space": space.model_dump(mode="json"),
        "proxy_new_tokens": o.proxy_new_tokens,
    }
    return sha256_text(json.dumps(parts, sort_keys=True))[:16]


def _to_verify(
    points: list[Point], n: int, max_kl: float | None, at: list[float] | tuple[float, ...] = ()
) -> list[Point]:
    """For each KL budget in ``at``, the front point with the lowest expected refusal within it (proxy);
    then ``n`` more: the lowest expected refusal among points within ``max_kl``, and when fewer lie
    within it, the next ones by increasing KL (the proxy KL is on other prompts)."""
    by_refusal = sorted(points, key=lambda p: (p.proxy["refusal"], p.proxy["kl"]["mean"]))
    picked: list[Point] = []
    for budget in at:
        best = next((p for p in by_refusal if p.proxy["kl"]["mean"] <= budget), None)
        if best is not None and best not in picked:
            picked.append(best)
    inside = [p for p in by_refusal if max_kl is None or p.proxy["kl"]["mean"] <= max_kl]
    outside = sorted((p for p in points if p not in inside), key=lambda p: p.proxy["kl"]["mean"])
    return picked + [p for p in inside + outside if p not in picked][:n]


def _verify(
    lm: LoadedModel,
    cands: Candidates,
    points: list[Point],
    verifier: Callable[[], Verifier],
    o: OptimizeOptions,
    cache: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """Verify the chosen front points (and the unedited model) unless ``cache`` holds their results."""
    done: dict[int, Any] = cache.setdefault("points", {})
    todo = [p for p in _to_verify(points, o.verify_n, o.max_kl, o.verify_at) if p.trial not in done]
    need_base = o.verify_baseline and cache.get("baseline") is None
    v_of: Verifier | None = verifier() if todo or need_base else None
    if need_base and v_of is not None:
        cache["baseline"] = v_of(desc="verify baseline").as_dict()
        say(
            f"verified the unedited model: refused {cache['baseline']['refused']} of {cache['baseline']['n']}"
        )
    for p in todo:
        assert v_of is not None
        with applied_edit(lm, cands, p.edit):
            v = v_of(desc=f"verify trial {p.trial}")
        done[p.trial] = v.as_dict()
        say(f"verified trial {p.trial}: refused {v.refused} of {v.n}, KL {v.kl.mean:.4f} ({v.seconds:.0f} s)")


def _verify_cache(
    layout: RunLayout, sets: dict[str, list[str]], o: OptimizeOptions, system: str | None
) -> dict[str, Any]:
    """Earlier verification results of this run, if they were made on the same held-out prompts."""
    fp = sha256_text(
        json.dumps([sets["harmful_test"], sets["harmless_test"], o.verify_max_new_tokens, system])
    )[:16]
    old = read_json(layout.front) if layout.front.is_file() else {}
    if old.get("verify_fingerprint") != fp:
        return {"fingerprint": fp, "points": {}, "baseline": None}
    points = {p["trial"]: p["verified"] for p in old.get("points", []) if p.get("verified")}
    return {"fingerprint": fp, "points": points, "baseline": old.get("baseline")}


def _search(
    layout: RunLayout,
    lm: LoadedModel,
    cands: Candidates,
    sets: dict[str, list[str]],
    o: OptimizeOptions,
    system: str | None,
    ids: list[int],
    say: Callable[[str], None],
) -> tuple[Any, int, float]:
    """Open (or resume) the study and run this call's trials. Returns (study, trials run, seconds)."""
    space = _space(layout, o, cands.n_layers)
    study = open_study(layout.study, _fingerprint(lm, layout, sets, ids, space, o), o.seed, o.startup_trials)
    done = sum(t.values is not None for t in study.get_trials(deepcopy=False))
    if done >= o.trials:
        return study, 0, 0.0  # nothing to run: no baseline pass needed
    fmt = lambda xs: format_prompts(lm.tokenizer, xs, system)  # noqa: E731
    scorer = ProxyScorer(
        lm, fmt(sets["harmful"]), fmt(sets["harmless"]), ids, o.batch_size,
        new_tokens=o.proxy_new_tokens, gen_batch_size=o.gen_batch_size,
    )  # fmt: skip
    t_harmful = time.perf_counter()
    _filter_refused(scorer)
    estimate = scorer.baseline_seconds + (time.perf_counter() - t_harmful)
    t0 = time.perf_counter()
    ran = run_search(
        study, lm, cands, scorer, space, Budget(o.trials, o.minutes * 60 if o.minutes else None),
        seeds=_seeds(layout, cands, space), trial_estimate=estimate,
        progress=lambda i, n: say(f"trial {i}/{n}") if i % 5 == 0 else None, kl_targets=o.verify_at,
    )  # fmt: skip
    return study, ran, time.perf_counter() - t0


def optimize(
    layout: RunLayout,
    o: OptimizeOptions,
    *,
    lm: LoadedModel | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Search (resuming any study in the run), verify the front, choose and optionally export.

    Returns the front artifact (also written to search/front.json) with the chosen trial number.
    """
    if not layout.candidates.is_file():
        raise RefusalkitError(
            f"no candidates in {layout.root} ({layout.candidates} is missing); run "
            f"`refusalkit extract --out {layout.root}` first"
        )
    t0 = time.perf_counter()
    s = run_settings(layout)
    system = o.system_prompt if o.system_prompt is not None else s.system_prompt
    cands = Candidates.load(layout.candidates)
    lm = lm or load_model(s.model, **s.model_kwargs())
    sets = prompt_sets(layout, s, o)
    ids = refusal_token_ids(lm.tokenizer, s.refusal_tokens)
    study, ran, search_seconds = _search(layout, lm, cands, sets, o, system, ids, say)
    points = [Point.from_trial(t) for t in front_trials(study)]
    cache = _verify_cache(layout, sets, o, system)
    t_verify = time.perf_counter()

    def verifier() -> Verifier:
        return Verifier(
            lm, format_prompts(lm.tokenizer, sets["harmful_test"], system),
            format_prompts(lm.tokenizer, sets["harmless_test"], system),
            max_new_tokens=o.verify_max_new_tokens, batch_size=o.batch_size, gen_batch_size=o.gen_batch_size,
            requests=sets["harmful_test"],
        )  # fmt: skip

    if o.verify_n or o.verify_at:
        _verify(lm, cands, points, verifier, o, cache, say)
    for p in points:  # this call's verifications and earlier ones on the same held-out sets
        p.verified = cache["points"].get(p.trial)
    front = {
        "objectives": list(study.user_attrs.get("objectives", [])),
        "points": [p.as_dict() for p in points],
        "trials": trial_records(study),
        "chosen": None,
        "baseline": cache.get("baseline"),
        "verify_fingerprint": cache["fingerprint"],
        "sets": {k: len(v) for k, v in sets.items()},
        "verify_max_new_tokens": o.verify_max_new_tokens,
        "system_prompt": system,
        "n_layers": cands.n_layers,
        "seconds": {"search": round(search_seconds, 1), "verify": round(time.perf_counter() - t_verify, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "trials_run": ran,
    }  # fmt: skip
    write_front(layout, front)  # before choosing: a choice that finds nothing loses no search or verification
    chosen = _by_trial(study, points, o.trial) if o.trial is not None else choose(
        points, max_kl=o.max_kl, max_refusals=o.max_refusals
    )  # fmt: skip
    front["chosen"] = chosen.trial
    write_front(layout, front)
    write_chosen(layout, chosen, cands.n_layers)
    if o.export:
        say(f"checkpoint: {export_edit_checkpoint(lm, cands, chosen.edit, layout.model_dir)}")
    return front


def _by_trial(study: Any, points: list[Point], number: int) -> Point:
    """Any completed trial can be chosen by number, on the front or not."""
    for p in points:
        if p.trial == number:
            return p
    for t in study.get_trials(deepcopy=False):
        if t.number == number and t.values is not None:
            return Point.from_trial(t)
    raise RefusalkitError(f"trial {number} did not complete; on the front: {sorted(p.trial for p in points)}")


def write_chosen(layout: RunLayout, p: Point, n_layers: int) -> None:
    write_json(layout.chosen, p.as_dict() | {"kernels": p.edit.kernels(n_layers), "embed": p.edit.embed})


def chosen_edit(layout: RunLayout) -> EditParams:
    """The edit chosen in a run's search (for exports that run on another module's model)."""
    if not layout.chosen.is_file():
        raise RefusalkitError(
            f"no chosen edit in {layout.root}; run `refusalkit optimize {layout.root}` first"
        )
    return EditParams.model_validate(read_json(layout.chosen)["edit"])


__all__ = ["OptimizeOptions", "chosen_edit", "optimize", "points_of"]
