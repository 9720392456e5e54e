"""Which front points `refusalkit optimize` verifies, and verifying them under every chat setup on every
held-out prompt set (``search.verify.Verifier`` does the generating and counting); results cached in
search/front.json by the held-out prompts' fingerprint.

With ``--judge``, an LLM judge reads every verified completion after the last edit is undone, all
points' completions in one pass (``search.judging``), and each point records its four-class counts
beside the keyword counts. Every verified point's per-row verdicts and completion hashes (no text) go
to search/completions/trial_N.json (baseline.json for the unedited model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from refusalkit.directions import Candidates
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.verdicts import Judge
from refusalkit.layout import RunLayout
from refusalkit.models.loading import LoadedModel
from refusalkit.search.edit import applied_edit
from refusalkit.search.front import Point, over_label, worst_label
from refusalkit.search.judging import add_judged, build_judge, judge_all, judge_key, save_rows
from refusalkit.search.options import OptimizeOptions
from refusalkit.search.setups import ChatSetup
from refusalkit.search.verify import Generation, Verifier
from refusalkit.utils import read_json, sha256_text


def to_verify(points: list[Point], n: int, max_kl: float | None, at: Sequence[float] = ()) -> list[Point]:
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


def verifier(
    lm: LoadedModel,
    setups: Sequence[ChatSetup],
    harmful_sets: dict[str, list[str]],
    harmless: list[str],
    o: OptimizeOptions,
    over_refusal: dict[str, list[str]] | None = None,
    system: str | None = None,
) -> Verifier:
    """Every harmful set under every setup, in one generation batch, each (setup, set) counted apart;
    KL on the harmless prompts under each setup; each over-refusal set under ``system``."""
    harmful: list[str] = []
    requests: list[str] = []
    groups: list[tuple[str, str]] = []
    for s in setups:
        for name, xs in harmful_sets.items():
            harmful += s.format(lm.tokenizer, xs)
            requests += xs
            groups += [(s.name, name)] * len(xs)
    return Verifier(
        lm, harmful, {s.name: s.format(lm.tokenizer, harmless) for s in setups},
        max_new_tokens=o.verify_max_new_tokens, batch_size=o.batch_size, gen_batch_size=o.gen_batch_size,
        requests=requests, groups=groups, early_stop=o.judge is None,  # a judge reads whole completions
        over_refusal=over_refusal, system=system,
    )  # fmt: skip


def verify_points(
    lm: LoadedModel,
    cands: Candidates,
    points: list[Point],
    make: Callable[[], Verifier],
    o: OptimizeOptions,
    cache: dict[str, Any],
    say: Callable[[str], None],
    saved: Path | None = None,
) -> None:
    """Verify the chosen front points (and the unedited model) unless ``cache`` holds their results,
    judged by the same judge when one is asked for. ``saved``: the folder for each verification's
    per-row verdicts (search/completions)."""
    key = judge_key(o.judge, o.judge_calibration)

    def cached(v: dict[str, Any] | None) -> bool:
        return v is not None and (key is None or (v.get("judge") or {}).get("key") == key)

    done: dict[int, Any] = cache.setdefault("points", {})
    todo = [p for p in to_verify(points, o.verify_n, o.max_kl, o.verify_at) if not cached(done.get(p.trial))]
    need_base = o.verify_baseline and not cached(cache.get("baseline"))
    if not todo and not need_base:
        return
    # built before any generation: a judge model that cannot load fails before minutes of work
    judge = (
        build_judge(o.judge, lm, calibration=o.judge_calibration, batch_size=o.batch_size)
        if o.judge
        else None
    )
    v_of = make()
    runs: list[tuple[str, Generation]] = []
    if need_base:
        runs.append(("baseline", v_of.run(desc="verify baseline", kl=False)))
    for p in todo:
        with applied_edit(lm, cands, p.edit):
            runs.append((f"trial_{p.trial}", v_of.run(desc=f"verify trial {p.trial}")))
    # every edit is undone here: a local judge reads with the unedited weights
    results = judged(v_of, runs, judge, key, say, saved)
    for (name, gen), v in zip(runs, results, strict=True):
        over = f"; over-refusal (paper/broad) {label}" if (label := over_label(v)) else ""
        if name == "baseline":
            cache["baseline"] = v
            say(f"verified the unedited model: {worst_label(v)}{over}")
        else:
            done[int(name.removeprefix("trial_"))] = v
            kl, secs = v["kl"]["mean"], gen.verified.seconds
            say(
                f"verified trial {name.removeprefix('trial_')}: {worst_label(v)}{over}, KL {kl:.4f} ({secs:.0f} s)"
            )


def judged(
    v_of: Verifier,
    runs: list[tuple[str, Generation]],
    judge: Judge | None,
    key: dict[str, Any] | None,
    say: Callable[[str], None],
    saved: Path | None = None,
) -> list[dict[str, Any]]:
    """Each run's verified numbers as a dict, with ``judge``'s four classes (all runs' completions in
    one pass; call it with no edit applied; ``key``: ``judging.judge_key``, recorded for the cache);
    each run's rows saved to ``saved``/NAME.json (verdicts and hashes, no text). A judge that fails
    (a server gone down) costs its counts, not the verification: the runs are kept unjudged."""
    out = [g.verified.as_dict() for _n, g in runs]
    verdicts: list[Any] = [None] * len(runs)
    if judge is not None and runs:
        if v_of.requests is None:
            raise ValueError("a judged verification needs the requests (Verifier(requests=...))")
        t0 = time.perf_counter()
        try:
            verdicts = judge_all(judge, v_of.requests, [g for _n, g in runs])
        except RefusalkitError as exc:
            say(f"the {judge.name} judge failed, the verified points keep their keyword counts only: {exc}")
            judge = None
        else:
            n = sum(len(g.texts) for _n, g in runs)
            say(f"judged {n} completions with the {judge.name} judge: {time.perf_counter() - t0:.0f} s")
            record = {"key": key, **judge.identity()}
            for v, vs in zip(out, verdicts, strict=True):
                add_judged(v, vs, v_of.groups, record)
    if saved is not None:
        for (name, gen), vs in zip(runs, verdicts, strict=True):
            found = (judge, vs) if judge is not None else None
            save_rows(saved / f"{name}.json", name, gen, v_of.groups, found, v_of.max_new_tokens)
    return out


def verify_cache(
    layout: RunLayout,
    setups: Sequence[ChatSetup],
    harmful_sets: dict[str, list[str]],
    harmless: list[str],
    o: OptimizeOptions,
    over_refusal: dict[str, list[str]] | None = None,
    system: str | None = None,
) -> dict[str, Any]:
    """Earlier verification results of this run, if they were made on the same held-out prompts (the
    over-refusal ones and their system prompt too), chat setups and generation length (else none, and
    their saved rows are removed)."""
    parts: list[Any] = [harmful_sets, harmless, o.verify_max_new_tokens, [s.as_dict() for s in setups]]
    if over_refusal:  # absent, the fingerprint of a verification made before over-refusal existed
        parts.append({"over_refusal": over_refusal, "system": system})
    fp = sha256_text(json.dumps(parts, sort_keys=True))[:16]
    old = read_json(layout.front) if layout.front.is_file() else {}
    if old.get("verify_fingerprint") != fp:
        for stale in (layout.search_dir / "completions").glob("*.json"):  # rows of other prompts
            stale.unlink()
        return {"fingerprint": fp, "points": {}, "baseline": None}
    points = {p["trial"]: p["verified"] for p in old.get("points", []) if p.get("verified")}
    return {"fingerprint": fp, "points": points, "baseline": old.get("baseline")}


__all__ = ["judged", "to_verify", "verifier", "verify_cache", "verify_points"]
