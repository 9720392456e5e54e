"""The edit search on a real model (smollm2-135m-instruct: a real architecture, tied embeddings, real
tokenizer and template). Checks plumbing, not refusal: a searched edit equals its hooks on the real
model, the study runs, and the weights come back bit for bit. Prompts are the built-in harmless set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusalkit.activations import logits_for_prompts, mean_activations
from refusalkit.data import carve
from refusalkit.directions import Candidates
from refusalkit.layout import RunLayout
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.models.registry import status
from refusalkit.prompts import format_prompts
from refusalkit.search.edit import EditParams, Kernel, applied_edit, hooked_edit
from refusalkit.utils import write_json

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    if status(MODEL) == "missing":
        pytest.skip(f"{MODEL} weights not installed (make models)")
    return load_model(MODEL, dtype="float32", device="cpu")


def _candidates(lm: LoadedModel, a: list[str], b: list[str]) -> Candidates:
    """Two halves of a harmless set stand in for the two classes: enough for a non-zero direction."""
    ma = mean_activations(lm, format_prompts(lm.tokenizer, a), 2, batch_size=8).mean
    mb = mean_activations(lm, format_prompts(lm.tokenizer, b), 2, batch_size=8).mean
    return Candidates(ma, mb, ["x", "y"])


def test_searched_edit_equals_hooks_and_search_runs(smol: LoadedModel, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from refusalkit.search.optimize import OptimizeOptions, optimize

    sets = carve(
        {"a": ("builtin:harmless", 8), "b": ("builtin:harmless", 8), "k": ("builtin:harmless", 8)}, seed=3
    )
    cands = _candidates(smol, sets["a"], sets["b"])
    prompts = format_prompts(smol.tokenizer, sets["k"])
    state = {k: v.clone() for k, v in smol.model.state_dict().items()}
    n = smol.arch.n_layers
    params = EditParams(
        source="interpolated", layer=n / 2 + 0.3, position=-1, projected=True, embed=0.5,
        attn=Kernel(peak=1.2, position=n * 0.7, minimum=0.3, width=n / 3), mlp=Kernel(peak=0.9),
    )  # fmt: skip
    base = logits_for_prompts(smol, prompts, 8)
    with hooked_edit(smol, cands, params):
        hooked = logits_for_prompts(smol, prompts, 8)
    with applied_edit(smol, cands, params):
        edited = logits_for_prompts(smol, prompts, 8)
    assert (hooked - base).abs().max() > 1e-2
    torch.testing.assert_close(edited, hooked, rtol=0, atol=1e-4 * float(hooked.abs().max()))
    assert all(torch.equal(v, state[k]) for k, v in smol.model.state_dict().items())

    layout = RunLayout(tmp_path / "run")
    cands.save(layout.candidates)
    splits = {"harmful_val": sets["a"], "harmful_test": sets["a"][:2], "harmless_train": sets["k"]}
    splits |= {"harmless_val": sets["b"], "harmless_test": sets["b"][:4]}
    write_json(layout.splits, {"fingerprint": "x", "splits": splits})
    write_json(layout.manifest, {"settings": {"model": MODEL, "data_dir": str(tmp_path / "none")}})
    opts = OptimizeOptions(
        trials=3, minutes=None, kl_n=8, verify_n=1, verify_max_new_tokens=4, startup_trials=2
    )
    front = optimize(layout, opts, lm=smol, say=lambda _m: None)
    assert len(front["trials"]) == 3 and front["points"] and layout.chosen.is_file()
    assert all(torch.equal(v, state[k]) for k, v in smol.model.state_dict().items())
