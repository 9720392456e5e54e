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


@pytest.mark.parametrize(("family", "attn"), [("qwen2", "eager"), ("gemma2", "eager"), ("llama", "sdpa")])
def test_prefix_cache_and_one_hot_are_exact(make_lm: Any, family: str, attn: str) -> None:
    """Cached prefix == full recompute, and the one-hot (gradient) path scores what the ids path does;
    gemma2 scales its embeddings by sqrt(d_model), which the one-hot path must reproduce."""
    lm = make_lm(family, attn=attn)
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
    """A search resumed from a checkpoint continues from the saved suffix exactly as the uninterrupted
    search went on: every later step picks the same suffix with the same loss."""
    lm = make_lm("qwen2")
    config = GCGConfig(
        n_steps=5, search_width=16, topk=8, init=INIT, target="Sure", seed=1, stop_on_match=False
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
    assert all(p["stopped"] == "running" for p in partials)
    saved = json.loads(json.dumps(partials[0]))  # as read back from its JSON file
    assert saved["meta"]["current_ids"] != lm.tokenizer.encode(INIT, add_special_tokens=False)
    resumed = run_gcg(lm, PROMPTS[:1], config, progress=False, resume=saved)

    def steps(r: Any) -> list[tuple[int, float, str]]:
        return [(h["step"], h["loss"], h["suffix"]) for h in r.history]

    assert steps(resumed) == steps(full)
    assert (resumed.best_ids, resumed.best_loss, resumed.best_step) == (
        full.best_ids,
        full.best_loss,
        full.best_step,
    )
    assert resumed.stopped == "n_steps"


def test_scoring_never_extends_the_prefix_caches(make_lm: Any) -> None:
    """Each batch runs on a copy of a prompt's prefix cache; the shared caches keep their length."""
    lm = make_lm("llama")
    obj = SuffixObjective(
        lm, PROMPTS, GCGConfig(init=INIT, objective="both", prefix_cache=True), _direction(lm)
    )
    assert obj.caches is not None
    lengths = [c.get_seq_length() for c in obj.caches]
    ids = obj.initial_ids()
    first = obj.scores(ids[None])
    obj.gradient(ids)
    obj.scores(torch.stack([ids, ids]))
    assert [c.get_seq_length() for c in obj.caches] == lengths == [len(b) for b in obj.before]
    torch.testing.assert_close(obj.scores(ids[None]).target, first.target, rtol=0, atol=0)
