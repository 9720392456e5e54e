"""`refusalkit optimize RUN_DIR`: search edits on a run's candidates, verify the front, choose, export.

Reads the run folder (settings in the manifest, splits, extract/candidates.safetensors and, if the
select stage ran, the paper's pick and the candidates' scores), keeps one model loaded for every trial,
and writes search/study.db (the Optuna study), search/front.json and search/chosen.json. A call whose
options only choose (``OptimizeOptions.choosing_only``) on a run with a search chooses from it and
runs nothing (``search.choosing.choose_saved``).

The pieces: options (``search.options``), chat setups (``search.setups``), prompt sets
(``search.promptsets``), seeds and space (``search.seeds``), the study (``search.study``), verification
(``search.verification``), choosing and chosen.json (``search.choosing``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from refusalkit.directions import Candidates
from refusalkit.layout import RunLayout
from refusalkit.metric import refusal_token_ids
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.run import RunFolder
from refusalkit.search import proxy_judge
from refusalkit.search.choosing import choose_point, choose_saved, write_chosen
from refusalkit.search.edit import EditParams
from refusalkit.search.front import Point, points_of, write_front
from refusalkit.search.judging import judge_key
from refusalkit.search.objectives import ProxyScorer, filter_refused
from refusalkit.search.options import OptimizeOptions
from refusalkit.search.promptsets import over_refusal_sets, prompt_sets, verify_sets
from refusalkit.search.seeds import search_space, seeds
from refusalkit.search.setups import ChatSetup, named_setups, usable_setups
from refusalkit.search.space import SearchSpace
from refusalkit.search.study import Budget, front_trials, open_study, run_search, trial_records
from refusalkit.search.verification import verifier, verify_cache, verify_points
from refusalkit.settings import Settings
from refusalkit.utils import sha256_file, sha256_text

log = logging.getLogger(__name__)


def run_settings(layout: RunLayout) -> Settings:
    """The run's settings (``run.RunFolder.settings``: saved settings < environment)."""
    return RunFolder(layout).settings()


def setups_for(lm: LoadedModel, s: Settings, o: OptimizeOptions) -> list[ChatSetup]:
    """The chat setups of this call that the model's template renders (``search.setups``)."""
    return usable_setups(lm.tokenizer, named_setups(o.setups, o.system_prompts, s.system_prompt))


Prompts = dict[str, list[str]]  # chat setup name -> formatted prompts


def proxy_prompts(
    lm: LoadedModel, setups: list[ChatSetup], sets: dict[str, list[str]]
) -> tuple[Prompts, Prompts]:
    """The search's prompts: every harmful validation prompt under every setup; the ``kl_n`` harmless
    prompts shared out among the setups in turn (prompt i under setup i mod k), so a trial's KL costs
    what one setup's did."""
    k = len(setups)
    harmful = {s.name: s.format(lm.tokenizer, sets["harmful"]) for s in setups}
    harmless = {s.name: s.format(lm.tokenizer, sets["harmless"][i::k]) for i, s in enumerate(setups)}
    return harmful, harmless


def _fingerprint(
    lm: LoadedModel, layout: RunLayout, prompts: tuple[Prompts, Prompts], ids: list[int], space: SearchSpace,
    o: OptimizeOptions,
) -> str:  # fmt: skip
    """What makes two searches' trials comparable: model, candidates, the formatted prompts of every
    setup (before the refusal filter), the refusal tokens, the space and the proxy."""
    parts = {
        "model": lm.fingerprint,
        "candidates": sha256_file(layout.candidates),
        "harmful": sha256_text(json.dumps(prompts[0], sort_keys=True)),
        "harmless": sha256_text(json.dumps(prompts[1], sort_keys=True)),
        "refusal_ids": ids,
        "space": space.model_dump(mode="json"),
        "proxy_new_tokens": o.proxy_new_tokens,
        **proxy_judge.fingerprint_part(proxy_judge.proxy_key(o)),
    }
    return sha256_text(json.dumps(parts, sort_keys=True))[:16]


def _search(
    layout: RunLayout,
    lm: LoadedModel,
    cands: Candidates,
    prompts: tuple[Prompts, Prompts],
    o: OptimizeOptions,
    ids: list[int],
    say: Callable[[str], None],
    requests: list[str],
) -> tuple[Any, int, float]:
    """Open (or resume) the study and run this call's trials. Returns (study, trials run, seconds).
    requests: the harmful prompts unformatted (what a proxy judge reads as each reply's request)."""
    space = search_space(layout, o.sources, o.positions, o.edit_embed, cands.n_layers)
    key = proxy_judge.proxy_key(o)
    proxy_judge.check_study(layout.study, key)  # another proxy judge's study: refused, saying so
    study = open_study(
        layout.study, _fingerprint(lm, layout, prompts, ids, space, o), o.seed, o.startup_trials
    )
    proxy_judge.record(study, key)
    done = sum(t.values is not None for t in study.get_trials(deepcopy=False))
    if done >= o.trials:
        return study, 0, 0.0  # nothing to run: no baseline pass needed
    proxy = ProxyScorer(
        lm, *prompts, ids, o.batch_size, new_tokens=o.proxy_new_tokens, gen_batch_size=o.gen_batch_size,
        judge=proxy_judge.build(o, lm), requests=dict.fromkeys(prompts[0], requests),
    )  # fmt: skip
    t_harmful = time.perf_counter()
    filter_refused(proxy)
    estimate = proxy.baseline_seconds + (time.perf_counter() - t_harmful)
    t0 = time.perf_counter()
    ran = run_search(
        study, lm, cands, proxy, space, Budget(o.trials, o.minutes * 60 if o.minutes else None),
        seeds=seeds(layout, cands, space), trial_estimate=estimate,
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
    """Search (resuming any study in the run), verify the front, choose and optionally export; or, when
    the options only choose and the run has a search, choose from it without searching.

    Returns the front artifact (also written to search/front.json) with the chosen trial number.
    """
    if o.goal == "calibrate":  # the calibration search: its own folder, front and choice
        from refusalkit.search.calibrate_optimize import optimize_calibration

        return optimize_calibration(layout, o, lm=lm, say=say)
    cands = RunFolder(layout).candidates()  # the run reader's one error when extract has not run
    t0 = time.perf_counter()
    s = run_settings(layout)

    def model() -> LoadedModel:
        nonlocal lm
        lm = lm or load_model(s.model, **s.model_kwargs())
        return lm

    def export(edit: EditParams) -> None:  # the one writer of RUN_DIR/model: weights and card of the choice
        from refusalkit.export.cli import write_model

        del edit  # written to search/chosen.json before any export
        say(f"checkpoint: {write_model(layout.root, model(), edit='search', settings=s)}")

    if o.choosing_only() and layout.front.is_file():
        return choose_saved(layout, o, export)
    judge_key(o.judge, o.judge_calibration)  # a bad judge calibration fails before any trial
    proxy_judge.proxy_key(o)  # likewise a proxy judge without generated tokens
    lm = model()
    sets = prompt_sets(layout, s, o)
    setups = setups_for(lm, s, o)
    ids = refusal_token_ids(lm.tokenizer, s.refusal_tokens)
    study, ran, search_seconds = _search(
        layout, lm, cands, proxy_prompts(lm, setups, sets), o, ids, say, sets["harmful"]
    )
    points = [Point.from_trial(t) for t in front_trials(study)]
    held_out = verify_sets(sets, s, o)
    over = over_refusal_sets(s, o)
    cache = verify_cache(layout, setups, held_out, sets["harmless_test"], o, over, s.system_prompt)
    t_verify = time.perf_counter()
    if o.verify_n or o.verify_at:
        make = lambda: verifier(lm, setups, held_out, sets["harmless_test"], o, over, s.system_prompt)  # noqa: E731
        verify_points(lm, cands, points, make, o, cache, say, layout.search_dir / "completions")
    for p in points:  # this call's verifications and earlier ones on the same held-out sets
        p.verified = cache["points"].get(p.trial)
    front = {
        "objectives": list(study.user_attrs.get("objectives", [])),
        "proxy_judge": study.user_attrs.get("proxy_judge", proxy_judge.KEYWORD_KEY),
        "points": [p.as_dict() for p in points],
        "trials": trial_records(study),
        "chosen": None,
        "baseline": cache.get("baseline"),
        "verify_fingerprint": cache["fingerprint"],
        "sets": {k: len(v) for k, v in sets.items()} | {f"verify:{k}": len(v) for k, v in held_out.items()},
        "setups": [x.as_dict() for x in setups],
        "verify_max_new_tokens": o.verify_max_new_tokens,
        "n_layers": cands.n_layers,
        "seconds": {"search": round(search_seconds, 1), "verify": round(time.perf_counter() - t_verify, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "trials_run": ran,
    }  # fmt: skip
    write_front(layout, front)  # before choosing: a choice that finds nothing loses no search or verification
    chosen = choose_point(study, points, o)
    front["chosen"] = chosen.trial
    write_front(layout, front)
    write_chosen(layout, chosen, cands.n_layers)
    if o.export:
        export(chosen.edit)
    return front


__all__ = [
    "OptimizeOptions",
    "optimize",
    "points_of",
    "proxy_prompts",
    "run_settings",
    "setups_for",
]
