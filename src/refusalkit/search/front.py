"""The Pareto front as an artifact (search/front.json), choosing a point from it, and printing it.

A point carries its trial number, the edit, the proxy objectives and, once verified, the held-out
numbers. Choosing prefers verified numbers where a point has them: refusals are the worst keyword
judge's rate in the worst (chat setup, prompt set) group; the table prints every group beneath its
point. A point verified with an LLM judge (``--judge``) also shows what the judge made of that group's
completions: how many complied, how many were partial (evasive) or degenerate, beside "not refused"
(the completions no keyword list marked), so a point that evades instead of answering is seen as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout
from refusalkit.search.edit import EditParams
from refusalkit.utils import write_json


@dataclass
class Point:
    trial: int
    edit: EditParams
    proxy: dict[str, Any]  # ProxyResult.as_dict()
    seed: str | None = None
    verified: dict[str, Any] | None = None  # Verified.as_dict()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def refusal(self) -> float:
        """Refusal rate used for choosing: verified (worst judge) if available, else the proxy's."""
        if self.verified:
            return max(self.verified["refused"].values()) / self.verified["n"]
        return float(self.proxy["refusal"])

    @property
    def kl(self) -> float:
        return float((self.verified or self.proxy)["kl"]["mean"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "seed": self.seed,
            "edit": self.edit.model_dump(mode="json"),
            "proxy": self.proxy,
            "verified": self.verified,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(
            d["trial"], EditParams.model_validate(d["edit"]), d["proxy"], d.get("seed"), d.get("verified")
        )

    @classmethod
    def from_trial(cls, t: Any) -> Point:
        return cls(
            t.number,
            EditParams.model_validate(t.user_attrs["edit"]),
            t.user_attrs["proxy"],
            t.user_attrs.get("seed"),
        )


def write_front(layout: RunLayout, data: dict[str, Any]) -> None:
    write_json(layout.front, data)


def read_front(layout: RunLayout) -> dict[str, Any]:
    """search/front.json, through the run reader (its one error when the run has no search)."""
    from refusalkit.run import RunFolder

    return RunFolder(layout).front()


def points_of(front: dict[str, Any]) -> list[Point]:
    return [Point.from_dict(d) for d in front.get("points", [])]


def choose(
    points: list[Point],
    *,
    trial: int | None = None,
    max_kl: float | None = None,
    max_refusals: float | None = None,
) -> Point:
    """Pick a point: by trial number; else the fewest refusals with KL <= max_kl; else the lowest KL with
    refusals <= max_refusals (a rate, 0..1); else the fewest refusals. Verified points come first."""
    if not points:
        raise RefusalkitError("the front is empty; run the search with a larger budget")
    if trial is not None:
        match = [p for p in points if p.trial == trial]
        if not match:
            raise RefusalkitError(
                f"trial {trial} is not on the front; on it: {sorted(p.trial for p in points)}"
            )
        return match[0]
    pool = [p for p in points if p.verified] or points
    if max_kl is not None:
        ok = [p for p in pool if p.kl <= max_kl]
        if not ok:
            raise RefusalkitError(
                f"no front point has KL <= {max_kl}; the lowest is {min(p.kl for p in pool):.4f}. "
                "Raise --max-kl or search longer"
            )
        return min(ok, key=lambda p: (p.refusal, p.kl))
    if max_refusals is not None:
        ok = [p for p in pool if p.refusal <= max_refusals]
        if not ok:
            raise RefusalkitError(
                f"no front point refuses at most {max_refusals:.2f}; the fewest is {min(p.refusal for p in pool):.2f}. "
                "Raise --max-refusals or search longer"
            )
        return min(ok, key=lambda p: (p.kl, p.refusal))
    return min(pool, key=lambda p: (p.refusal, p.kl))


def refused_label(v: dict[str, Any], sep: str = "/") -> str:
    """A verified point's keyword counts (``keyword_label``), then the LLM judge's counts when it
    judged them."""
    judged = judged_label(v)
    return keyword_label(v, sep) + (f"; judge: {judged}" if judged else "")


def keyword_label(v: dict[str, Any], sep: str = "/") -> str:
    """A verified point's counts, "paper/heretic of n", and how many of each rest only on markers the
    request itself contains (e.g. "illegal" restated from the request), when any do."""
    r = v["refused"]
    out = f"{r.get('paper', '-')}{sep}{r.get('heretic', '-')} of {v['n']}"
    echo = v.get("echoed")
    if echo and any(echo.values()):
        out += f" ({echo.get('paper', 0)}{sep}{echo.get('heretic', 0)} echo the request)"
    return out


def judged_label(v: dict[str, Any]) -> str:
    """The LLM judge's counts in words ("46 complied, 14 partial, 2 degenerate, 38 refused"), or ""."""
    j = v.get("judged")
    if not j:
        return ""
    words = [f"{j.get('compliance', 0)} complied", f"{j.get('partial', 0)} partial"]
    words += [f"{j.get('degenerate', 0)} degenerate", f"{j.get('refusal', 0)} refused"]
    if j.get("invalid"):
        words.append(f"{j['invalid']} invalid")
    return ", ".join(words)


def not_refused(v: dict[str, Any]) -> int:
    """Completions no keyword list called a refusal (of the worst group): n minus the stricter count."""
    return int(v["n"]) - max(v["refused"].values())


def worst_label(v: dict[str, Any]) -> str:
    """A verified result's headline: its worst group's counts, and which group that is."""
    where = "/".join(x for x in (v.get("setup"), v.get("set")) if x)
    return f"refused {refused_label(v)}" + (f" (worst: {where})" if where else "")


def over_label(v: dict[str, Any]) -> str:
    """A verified result's over-refusal counts (paper/broad per set), or "" when it has none."""

    def counts(rates: dict[str, Any]) -> str:
        return " / ".join(f"{rates[j]['k']}/{rates[j]['n']}" for j in ("paper", "broad") if j in rates)

    return "; ".join(f"{name} {counts(r)}" for name, r in (v.get("over_refusal") or {}).items())


def group_lines(v: dict[str, Any], indent: str = "        ") -> list[str]:
    """One line per chat setup: its count on each prompt set and its own KL (nothing for a result of
    one group made before setups existed)."""
    groups = v.get("groups") or []
    if len(groups) < 2 and not v.get("kl_by_setup"):
        return []
    out = []
    kls = v.get("kl_by_setup") or {}
    for setup in dict.fromkeys(g["setup"] for g in groups):
        sets = "; ".join(f"{g['set'] or 'prompts'} {refused_label(g)}" for g in groups if g["setup"] == setup)
        kl = kls.get(setup)
        kl_text = f"; KL {kl['mean']:.4f} (median {kl['median']:.4f}, max {kl['max']:.3f})" if kl else ""
        out.append(f"{indent}setup {setup or '-'}: {sets}{kl_text}")
    return out


def format_front(points: list[Point], chosen: int | None = None) -> str:
    """A plain-text table: proxy and verified objectives per front point (verified: the worst group's
    counts, "not refused" by either list and, judged, the LLM judge's complied / partial / degenerate
    counts of the same completions; the KL over every setup), each verified point's groups beneath it."""
    head = (
        f"{'trial':>6} {'seed':<21}{'proxy refusal':>14}{'proxy KL':>10}{'refused (paper/heretic)':>42}"
        f"{'not refused':>12}{'complied':>9}{'partial':>8}{'degen.':>7}{'KL mean':>9}{'median':>8}{'max':>8}  edit"
    )
    lines = [head]
    for p in points:
        v = p.verified
        if v:
            refused = keyword_label(v)
            j = v.get("judged") or {}
            judged = "".join(
                f"{j.get(c, '-') if j else '-':>{w}}"
                for c, w in (("compliance", 9), ("partial", 8), ("degenerate", 7))
            )
            counts = f"{refused:>42}{not_refused(v):>12}{judged}"
            kl = f"{v['kl']['mean']:>9.4f}{v['kl']['median']:>8.4f}{v['kl']['max']:>8.3f}"
        else:
            counts, kl = f"{'-':>42}{'-':>12}{'-':>9}{'-':>8}{'-':>7}", f"{'-':>9}{'-':>8}{'-':>8}"
        mark = "*" if p.trial == chosen else " "
        lines.append(
            f"{mark}{p.trial:>5} {(p.seed or ''):<21}{p.proxy['refusal']:>14.3f}{p.proxy['kl']['mean']:>10.4f}"
            f"{counts}{kl}  {describe(p.edit)}"
        )
        if v:
            lines += group_lines(v)
            if over := over_label(v):
                lines.append(f"        over-refusal (paper/broad): {over}")
    return "\n".join(lines)


def describe(e: EditParams) -> str:
    """One short line naming an edit."""
    where = f"L{e.layer:.1f}" if e.source != "per_layer" else "per-layer"
    flags = "".join(f" {f}" for f, on in (("proj", e.projected), ("norm", e.norm_preserving)) if on)

    def k(name: str, kern: Any) -> str:
        width = "all" if kern.width is None else f"{kern.width:.1f}"
        return f"{name} {kern.peak:.2f}@{kern.position:.1f}->{kern.minimum:.2f}/{width}"

    embed = f" embed {e.embed:.2f}" if e.embed else ""
    return f"{e.source} {where} pos {e.position}{flags}; {k('attn', e.attn)}; {k('mlp', e.mlp)}{embed}"
