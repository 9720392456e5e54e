"""The report's figures draw whatever numbers a run folder holds: rates of exactly 0 and 1, missing
rates, flat or empty grids."""

from __future__ import annotations


def _decodes_to_png(b64: str) -> bool:
    import base64

    return base64.b64decode(b64).startswith(b"\x89PNG")


def test_every_report_figure_draws_rates_of_exactly_0_and_1() -> None:
    """Rates of exactly 0 and 1 with their intervals as JSON gives them back (a hair inside the rate,
    as the Wilson bound used to come out), a missing rate, and flat or empty grids."""
    from refusalkit.report import plots as P

    one, zero = [0.61, 0.9999999999999999], [2.7755575615628914e-17, 0.39]
    groups = [
        ("refusal rate (paper list)", [("baseline · harmful", 1.0, one), ("ablation · harmful", 0.0, zero)]),
        (
            "safety rate (judge)",
            [("baseline · harmful", 0.0, zero), ("actadd · harmful", None, [None, None])],
        ),
        ("all refused", [("orthogonalized · harmful", 1.0, [1.0, 1.0])]),
    ]
    assert _decodes_to_png(P.rate_bars(groups))
    scores = [
        {"position": -1, "layer": 0, "bypass": 0.0, "induce": 1.0, "kl": 0.0, "kept": True},
        {"position": -2, "layer": 1, "bypass": None, "induce": None, "kl": None, "reason": "pruned"},
    ]
    assert _decodes_to_png(P.score_heatmaps(scores, 2, 2, (-1, 0), ["a", "b"], cutoff=1))
    assert _decodes_to_png(P.score_heatmaps([], 2, 2, None))
    assert _decodes_to_png(
        P.norms_and_cosine([[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], -1, (-1, 1))
    )
    assert _decodes_to_png(
        P.projections([0.0, 0.0], [1.0, 1.0], 1, {"harmful": [[0.0, 1.0]], "harmless": []})
    )
