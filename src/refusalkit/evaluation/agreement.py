"""How far a judge agrees with hand labels, and where judges disagree with each other (counts only).

A keyword judge answers refusal or not, so it is scored on refusal versus not only (gold partial,
compliance and degenerate all count as "not"); a model judge is scored on the four classes as well.
Numbers: accuracy, balanced accuracy of refusal versus not (the mean of the two recalls, so a set
that is mostly refusals cannot flatter a judge that says "refusal" to everything), per-class precision
and recall, Cohen's kappa, and the confusion matrix (gold rows, verdict columns).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from refusalkit.evaluation.verdicts import BINARY, CLASSES, INVALID, NOT_REFUSAL, Verdict, refusal_vs_not


def cohen_kappa(gold: Sequence[str], predicted: Sequence[str]) -> float | None:
    """Cohen's kappa of two labelings (None when chance agreement is total: one label everywhere)."""
    n = len(gold)
    if n == 0:
        return None
    labels = sorted(set(gold) | set(predicted))
    observed = sum(g == p for g, p in zip(gold, predicted, strict=True)) / n
    chance = sum((gold.count(c) / n) * (list(predicted).count(c) / n) for c in labels)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def confusion(
    gold: Sequence[str], predicted: Sequence[str], rows: Sequence[str], cols: Sequence[str]
) -> dict[str, dict[str, int]]:
    cols = [*cols, *sorted(set(predicted) - set(cols))]  # an invalid column only when there is one
    return {
        g: {p: sum(1 for a, b in zip(gold, predicted, strict=True) if a == g and b == p) for p in cols}
        for g in rows
    }


def per_class(
    gold: Sequence[str], predicted: Sequence[str], classes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    out = {}
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, predicted, strict=True))
        said = sum(p == c for p in predicted)
        support = sum(g == c for g in gold)
        out[c] = {
            "precision": tp / said if said else None,
            "recall": tp / support if support else None,
            "support": support,
        }
    return out


def score(gold: Sequence[str], verdicts: Sequence[Verdict], classes: Sequence[str]) -> dict[str, Any]:
    """A judge's verdicts against gold four-class labels; ``classes``: the labels the judge can give."""
    if len(gold) != len(verdicts):
        raise ValueError(f"{len(gold)} gold labels for {len(verdicts)} verdicts")
    predicted = [v.label for v in verdicts]
    gold_bin = [refusal_vs_not(g) for g in gold]
    pred_bin = [refusal_vs_not(p) for p in predicted]
    recalls = per_class(gold_bin, pred_bin, BINARY)
    present = [recalls[c]["recall"] for c in BINARY if recalls[c]["recall"] is not None]
    out: dict[str, Any] = {
        "n": len(gold),
        "refusal_vs_not": {
            "accuracy": _accuracy(gold_bin, pred_bin),
            "balanced_accuracy": sum(present) / len(present) if present else None,
            "kappa": cohen_kappa(gold_bin, pred_bin),
            "per_class": recalls,
            "confusion": confusion(gold_bin, pred_bin, BINARY, BINARY),
        },
        "invalid": predicted.count(INVALID),
        # echo verdicts (refusals resting only on the request's own words) and how many were not refusals
        "echo": {
            "n": sum(v.echo for v in verdicts),
            "wrong": sum(v.echo and g != "refusal" for v, g in zip(verdicts, gold, strict=True)),
        },
    }
    if tuple(classes) == CLASSES:
        out["classes"] = {
            "accuracy": _accuracy(gold, predicted),
            "kappa": cohen_kappa(gold, predicted),
            "per_class": per_class(gold, predicted, CLASSES),
            "confusion": confusion(gold, predicted, CLASSES, CLASSES),
        }
    return out


def _accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float | None:
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold) if gold else None


def disagreements(
    verdicts: Mapping[str, Sequence[Verdict]], classes: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """Counts only, never text: each judge's verdicts by label, and for each pair of judges how often
    they differ, by kind ("refusal -> compliance": the first judge said refusal, the second compliance).
    Two four-class judges are compared on the four classes; a keyword judge on refusal versus not."""
    out: dict[str, Any] = {"counts": {}, "pairs": {}}
    for name, vs in verdicts.items():
        labels = [v.label for v in vs]
        out["counts"][name] = {
            c: labels.count(c) for c in [*classes[name], *sorted(set(labels) - set(classes[name]))]
        }
        echo = sum(v.echo for v in vs)
        if echo:
            out["counts"][name]["echo"] = echo
    for a, b in itertools.combinations(verdicts, 2):
        both_full = tuple(classes[a]) == CLASSES and tuple(classes[b]) == CLASSES
        kinds: dict[str, int] = {}
        for va, vb in zip(verdicts[a], verdicts[b], strict=True):
            la, lb = (
                (va.label, vb.label) if both_full else (refusal_vs_not(va.label), refusal_vs_not(vb.label))
            )
            if la != lb:
                shown_b = vb.label if not both_full and lb == NOT_REFUSAL else lb
                key = f"{la} -> {shown_b}"
                kinds[key] = kinds.get(key, 0) + 1
        out["pairs"][f"{a} vs {b}"] = {"differ": sum(kinds.values()), "n": len(verdicts[a]), "kinds": kinds}
    return out


__all__ = ["cohen_kappa", "confusion", "disagreements", "per_class", "score"]
