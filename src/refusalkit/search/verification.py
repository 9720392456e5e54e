"""Which front points `refusalkit optimize` verifies, and verifying them under every chat setup on every
held-out prompt set (``search.verify.Verifier`` does the generating and counting); results cached in
search/front.json by the held-out prompts' fingerprint."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from refusalkit.directions import Candidates
from refusalkit.layout import RunLayout
from refusalkit.models.loading import LoadedModel
from refusalkit.search.edit import applied_edit
from refusalkit.search.front import Point, worst_label
from refusalkit.search.options import OptimizeOptions
from refusalkit.search.setups import ChatSetup
from refusalkit.search.verify import Verifier
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
) -> Verifier:
    """Every harmful set under every setup, in one generation batch, each (setup, set) counted apart;
    KL on the harmless prompts under each setup."""
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
        requests=requests, groups=groups,
    )  # fmt: skip


def verify_points(
    lm: LoadedModel,
    cands: Candidates,
    points: list[Point],
    make: Callable[[], Verifier],
    o: OptimizeOptions,
    cache: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    """Verify the chosen front points (and the unedited model) unless ``cache`` holds their results."""
    done: dict[int, Any] = cache.setdefault("points", {})
    todo = [p for p in to_verify(points, o.verify_n, o.max_kl, o.verify_at) if p.trial not in done]
    need_base = o.verify_baseline and cache.get("baseline") is None
    v_of: Verifier | None = make() if todo or need_base else None
    if need_base and v_of is not None:
        cache["baseline"] = v_of(desc="verify baseline", kl=False).as_dict()
        say(f"verified the unedited model: {worst_label(cache['baseline'])}")
    for p in todo:
        assert v_of is not None
        with applied_edit(lm, cands, p.edit):
            v = v_of(desc=f"verify trial {p.trial}").as_dict()
        done[p.trial] = v
        say(f"verified trial {p.trial}: {worst_label(v)}, KL {v['kl']['mean']:.4f} ({v['seconds']:.0f} s)")


def verify_cache(
    layout: RunLayout,
    setups: Sequence[ChatSetup],
    harmful_sets: dict[str, list[str]],
    harmless: list[str],
    o: OptimizeOptions,
) -> dict[str, Any]:
    """Earlier verification results of this run, if they were made on the same held-out prompts, chat
    setups and generation length."""
    parts = [harmful_sets, harmless, o.verify_max_new_tokens, [s.as_dict() for s in setups]]
    fp = sha256_text(json.dumps(parts, sort_keys=True))[:16]
    old = read_json(layout.front) if layout.front.is_file() else {}
    if old.get("verify_fingerprint") != fp:
        return {"fingerprint": fp, "points": {}, "baseline": None}
    points = {p["trial"]: p["verified"] for p in old.get("points", []) if p.get("verified")}
    return {"fingerprint": fp, "points": points, "baseline": old.get("baseline")}


__all__ = ["to_verify", "verifier", "verify_cache", "verify_points"]
