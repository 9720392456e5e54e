"""GCG search on tiny random models: the loop lowers the loss, the cache and one-hot paths are exact."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from refusalkit.analysis.gcg import GCGConfig, SuffixObjective, run_gcg, sample_candidates
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError

PROMPTS = ["Name a fruit.", "Tell me a short joke"]


INIT = " ! ! ! !"


def _direction(lm: Any, layer: int = 2) -> Direction:
    gen = torch.Generator().manual_seed(1)
    return Direction(torch.randn(lm.arch.embed.weight.shape[1], generator=gen), layer=layer, position=-1)


def test_search_lowers_the_loss(make_lm: Any, tmp_path: Any) -> None:
    lm = make_lm("qwen2")
    config = GCGConfig(n_steps=6, search_width=24, topk=16, init=INIT, target="Sure", seed=0)
    result = run_gcg(lm, PROMPTS[:1], config, progress=False, meta={"prompt_indices": [0]})
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 7
    assert result.best_loss < losses[0] - 0.05
    assert result.best_loss == min(losses)
    assert len(result.best_ids) == len(lm.tokenizer.encode(INIT, add_special_tokens=False))
    assert lm.tokenizer.decode(result.best_ids) == result.best_suffix
    result.save(tmp_path / "search.json")
    saved = json.loads((tmp_path / "search.json").read_text())
    assert {"best", "history", "config", "meta", "stopped", "seconds_per_step"} <= set(saved)
    assert saved["best"]["suffix"] == result.best_suffix and saved["meta"]["prompt_indices"] == [0]


def test_search_is_seeded(make_lm: Any) -> None:
    lm = make_lm("llama")
    config = GCGConfig(n_steps=2, search_width=16, topk=8, init=INIT, target="Sure", seed=3)
    a, b = (run_gcg(lm, PROMPTS[:1], config, progress=False) for _ in range(2))
    assert a.best_ids == b.best_ids and [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_prefix_cache_and_one_hot_are_exact(make_lm: Any, family: str) -> None:
    """Cached prefix == full recompute, and the one-hot (gradient) path scores what the ids path does;
    gemma2 scales its embeddings by sqrt(d_model), which the one-hot path must reproduce."""
    lm = make_lm(family)
    d = _direction(lm)
    objs = [
        SuffixObjective(lm, PROMPTS, GCGConfig(init=INIT, objective="both", prefix_cache=c), d)
        for c in (True, False)
    ]
    ids = objs[0].initial_ids()
    cands = torch.stack([ids, ids.flip(0)])
    s_cached, s_full = objs[0].scores(cands), objs[1].scores(cands)
    torch.testing.assert_close(s_cached.target, s_full.target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_cached.projection, s_full.projection, atol=1e-4, rtol=1e-5)
    g_cached, loss_cached = objs[0].gradient(ids)
    g_full, loss_full = objs[1].gradient(ids)
    torch.testing.assert_close(g_cached, g_full, atol=1e-4, rtol=1e-3)
    assert loss_cached == pytest.approx(float(objs[0].combine(s_cached)[0]), abs=1e-4)
    assert loss_full == pytest.approx(loss_cached, abs=1e-4)


def test_candidates_swap_allowed_tokens(make_lm: Any) -> None:
    lm = make_lm("qwen2")
    obj = SuffixObjective(lm, PROMPTS[:1], GCGConfig(init=INIT, n_replace=2, search_width=40))
    ids = obj.initial_ids()
    grad, _ = obj.gradient(ids)
    cands = sample_candidates(ids, grad, obj.allowed, obj.config, torch.Generator().manual_seed(0))
    assert cands.shape[1] == ids.shape[0] and len(cands) <= 40
    changed = cands != ids
    assert (changed.sum(1) <= 2).all()
    assert obj.allowed[cands[changed]].all()
    assert len(torch.unique(cands, dim=0)) == len(cands)


def test_direction_objective_lowers_projection(make_lm: Any) -> None:
    lm = make_lm("qwen2")
    config = GCGConfig(
        n_steps=3, search_width=24, topk=16, init=INIT, objective="direction", direction_layers="at"
    )
    result = run_gcg(lm, PROMPTS, config, direction=_direction(lm), progress=False)
    assert result.config["layers"] == [2]
    assert result.best_loss <= result.history[0]["loss"]
    assert result.best_loss == pytest.approx(min(r["projection"] for r in result.history))


def test_loss_threshold_stops_early(make_lm: Any) -> None:
    lm = make_lm("qwen2")
    config = GCGConfig(n_steps=50, search_width=8, topk=8, init=INIT, target="Sure", loss_threshold=1e6)
    result = run_gcg(lm, PROMPTS[:1], config, progress=False)
    assert result.stopped == "loss_threshold" and len(result.history) == 2


def test_errors_are_reported(make_lm: Any) -> None:
    with pytest.raises(RefusalkitError) as err:
        GCGConfig(n_steps=0, topk=0, objective="x").validate()  # type: ignore[arg-type]
    assert "n_steps" in str(err.value) and "topk" in str(err.value) and "objective" in str(err.value)
    lm = make_lm("qwen2")
    with pytest.raises(RefusalkitError, match="needs a refusal direction"):
        SuffixObjective(lm, PROMPTS, GCGConfig(objective="direction"))


def test_search_checkpoints_and_resumes(make_lm: Any) -> None:
    import json

    lm = make_lm("qwen2")
    config = GCGConfig(
        n_steps=4, search_width=16, topk=8, init=INIT, target="Sure", seed=1, stop_on_match=False
    )
    partials: list[dict[str, Any]] = []
    full = run_gcg(
        lm,
        PROMPTS[:1],
        config,
        progress=False,
        checkpoint=lambda r: partials.append(r.to_json()),
        checkpoint_every=2,
    )
    assert [p["history"][-1]["step"] for p in partials] == [2, 4]
    assert all(p["stopped"] == "running" and "current_ids" in p["meta"] for p in partials)
    # Resume from the step-2 checkpoint (as read back from its JSON file): steps 3 and 4 run, the
    # history and the best so far carry over, and the result is complete.
    saved = json.loads(json.dumps(partials[0]))
    resumed = run_gcg(lm, PROMPTS[:1], config, progress=False, resume=saved)
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3, 4]
    assert [(h["loss"], h["suffix"]) for h in resumed.history[:3]] == [
        (h["loss"], h["suffix"]) for h in full.history[:3]
    ]
    assert resumed.best_loss <= saved["best"]["loss"] and resumed.stopped == "n_steps"
