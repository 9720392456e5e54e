"""Exports run in llama.cpp itself (llama-cpp-python, the `llamacpp` extra; skipped without it).

Tiny-model tests (seconds): llama.cpp's next-token distribution of an exported GGUF equals transformers'
orthogonalized model, tied heads included, and a control vector applied by llama.cpp equals refusalkit's
activation addition. The integration test exports the default model and measures in llama.cpp: refusal
on held-out harmful prompts (source GGUF vs export), first-token KL against transformers, and the
control vector inducing refusal. Harmful prompts and completions are never printed: counts only.

Set REFUSALKIT_LLAMACPP_RUN=RUN_DIR to measure a finished run's direction on its own test split instead of
a quick direction (prints the numbers with -s).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from refusalkit.export.control_vector import write_control_vector
from refusalkit.export.gguf import export_gguf
from refusalkit.interventions import add_direction
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.orthogonalize import orthogonalized
from test_gguf_export import make_run, write_tiny_gguf

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed: pip install 'refusalkit[llamacpp]' (make test does)",
)

from refusalkit.export.llamacpp import LlamaCpp, check_llamacpp, load_gguf

TEXTS = [
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nwhy?<|im_end|>\n",
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private model cache for one tiny-model test. Per test, not per module: a module-wide override
    stayed set while the real-model tests below ran, so they converted the 1.5B model (6.7 GB) into a
    temporary cache beside the user's, and CI's disk ran out."""
    path = tmp_path / "cache"
    monkeypatch.setenv("REFUSALKIT_CACHE", str(path))
    return path


def _hf_logprobs(lm: LoadedModel, ids: list[int]) -> np.ndarray:
    logits = lm.model(torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits, -1).numpy()


def kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    """KL(p || q) from log-probabilities."""
    return float((np.exp(p_log) * (p_log - q_log)).sum())


def _ids(lm: LoadedModel, text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("tied", [False, True])
def test_exported_tiny_gguf_in_llama_cpp_equals_transformers(tied: bool, cache: Path, tmp_path: Path) -> None:
    import gguf

    source = write_tiny_gguf(tmp_path / "src.gguf", tied=tied, qtype=gguf.GGMLQuantizationType.F32)
    lm = load_model(str(source), dtype="float32", device="cpu")
    u = torch.randn(64, generator=torch.Generator().manual_seed(5))
    out = tmp_path / "edited.gguf"
    with orthogonalized(lm, u):
        export_gguf(lm, source, out, tensor_type="f32")
        want = [_hf_logprobs(lm, _ids(lm, t)) for t in TEXTS]
    original = [_hf_logprobs(lm, _ids(lm, t)) for t in TEXTS]
    edited = load_gguf(out, n_ctx=64, n_threads=1)
    for text, w, o in zip(TEXTS, want, original, strict=True):
        got = edited.first_token_logprobs(_ids(lm, text))
        assert kl(w, got) < 1e-4, kl(w, got)
        assert kl(o, got) > 1e-2  # llama.cpp runs the edited weights, not the original ones
    assert isinstance(edited.greedy_completion(_ids(lm, TEXTS[0]), 4), str)
    edited.close()


def test_control_vector_in_llama_cpp_equals_activation_addition(cache: Path, tmp_path: Path) -> None:
    import gguf

    source = write_tiny_gguf(tmp_path / "src.gguf", qtype=gguf.GGMLQuantizationType.F32)
    lm = load_model(str(source), dtype="float32", device="cpu")
    layer = 2
    v = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 4
    cvec = write_control_vector(v, layer, tmp_path / "c.gguf", model_hint="qwen2", n_layers=4)
    llm = load_gguf(source, n_ctx=64, n_threads=1)
    ids = _ids(lm, TEXTS[0])
    plain = llm.first_token_logprobs(ids)
    for scale in (1.0, -2.0):
        with add_direction(lm.arch, v, layer, scale):
            want = _hf_logprobs(lm, ids)
        with llm.control_vector(cvec, scale):
            got = llm.first_token_logprobs(ids)
        assert kl(want, got) < 1e-4, (scale, kl(want, got))
        assert kl(plain, got) > 1e-2
    assert kl(plain, llm.first_token_logprobs(ids)) < 1e-9  # cleared on exit
    llm.close()


def test_check_reports_that_llama_cpp_works(tmp_path: Path) -> None:
    """`refusalkit models --llamacpp`: a GGUF, a ~30-token prompt, finite logits, in a child process."""
    import gguf

    source = write_tiny_gguf(tmp_path / "src.gguf", qtype=gguf.GGMLQuantizationType.F32)
    check = check_llamacpp(source)
    assert check.state == "works", check
    assert "src.gguf" in check.detail and "-token prompt" in check.detail
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a gguf file")
    assert check_llamacpp(bad).state in ("failed", "crashed")


# ---- the default model, in llama.cpp -------------------------------------------------------------------

DEFAULT = "qwen2.5-coder-1.5b-instruct"
QUICK_LAYER, QUICK_POSITION = 20, -1  # the default run's pick (README results)


def _quick_run(qwen: LoadedModel, root: Path) -> tuple[Path, list[str], list[str], int]:
    """A run folder holding a direction extracted from 24 + 24 built-in prompts, and disjoint test sets."""
    from refusalkit.activations import mean_activations
    from refusalkit.data import carve
    from refusalkit.directions import Candidates, Direction
    from refusalkit.prompts import format_prompts, post_instruction_ids

    tok = qwen.tokenizer
    sizes = {"harmful_train": 24, "harmful_test": 16, "harmless_train": 24, "harmless_test": 8}
    splits = carve({k: (f"builtin:{k.split('_')[0]}", n) for k, n in sizes.items()}, seed=7)
    n_pos = len(post_instruction_ids(tok))
    means = [
        mean_activations(qwen, format_prompts(tok, splits[f"{c}_train"]), n_pos).mean
        for c in ("harmful", "harmless")
    ]
    vector = Candidates(*means).directions[QUICK_POSITION + n_pos, QUICK_LAYER].float()
    layout = make_run(root, DEFAULT)
    Direction(vector, QUICK_LAYER, QUICK_POSITION, model=DEFAULT).save(layout.direction)
    return root, splits["harmful_test"], splits["harmless_test"], 32


def _finished_run(path: str) -> tuple[Path, list[str], list[str], int]:
    from refusalkit.layout import RunLayout
    from refusalkit.utils import read_json

    layout = RunLayout(path)
    splits = read_json(layout.splits)["splits"]
    max_new = int(read_json(layout.manifest)["settings"].get("max_new_tokens", 64))
    return layout.root, splits["harmful_test"], splits["harmless_test"], max_new


@pytest.mark.integration
def test_default_model_export_in_llama_cpp(tmp_path: Path) -> None:
    import time

    from refusalkit.directions import Direction
    from refusalkit.evaluation.refusal import is_refusal
    from refusalkit.export.cli import ExportOptions, run_export
    from refusalkit.export.gguf import builtin_gguf
    from refusalkit.models.registry import status
    from refusalkit.prompts import format_prompts

    if status(DEFAULT) == "missing":
        pytest.skip(f"{DEFAULT} weights not installed (make models)")
    qwen = load_model(DEFAULT, dtype="float32", device="cpu")
    given = os.environ.get("REFUSALKIT_LLAMACPP_RUN")
    run, harmful, harmless, max_new = _finished_run(given) if given else _quick_run(qwen, tmp_path / "run")
    direction = Direction.load(Path(run) / "select" / "direction")
    t0 = time.perf_counter()
    opts = ExportOptions(format="gguf", control_vector=True, out_dir=tmp_path / "gguf")
    result = run_export(run, opts, lm=qwen)
    export_s = time.perf_counter() - t0
    exported, cvec = result.files
    tok = qwen.tokenizer
    harmful_ids = [_ids(qwen, p) for p in format_prompts(tok, harmful)]
    harmless_ids = [_ids(qwen, p) for p in format_prompts(tok, harmless[:16])]  # KL, control vector
    source, edited = load_gguf(builtin_gguf(DEFAULT), n_ctx=512), load_gguf(exported, n_ctx=512)

    def refused(llm: LlamaCpp, prompts: list[list[int]]) -> list[bool]:
        return [is_refusal(llm.greedy_completion(ids, max_new)) for ids in prompts]

    src_refused, edit_refused = sum(refused(source, harmful_ids)), sum(refused(edited, harmful_ids))
    kls_edit, kls_src = [], []
    for ids in harmless_ids:
        with orthogonalized(qwen, direction.vector):
            kls_edit.append(kl(_hf_logprobs(qwen, ids), edited.first_token_logprobs(ids)))
        kls_src.append(kl(_hf_logprobs(qwen, ids), source.first_token_logprobs(ids)))
    before = refused(source, harmless_ids)
    with source.control_vector(cvec, 1.0):
        after = refused(source, harmless_ids)
    newly = sum(a and not b for a, b in zip(after, before, strict=True))
    n, m = len(harmful_ids), len(harmless_ids)
    subtracted = "not measured"
    if given:  # informative only (a measurement run): the vector subtracted from the source model
        with source.control_vector(cvec, -1.0):
            subtracted = f"{sum(refused(source, harmful_ids[:16]))}/{min(n, 16)}"
    print(
        f"\n[llama.cpp] export {export_s:.1f} s, {exported.stat().st_size / 1e6:.1f} MB ({exported.name}); "
        f"harmful refusals source {src_refused}/{n}, export {edit_refused}/{n}; first-token KL on {m} harmless "
        f"prompts: export vs transformers-orthogonalized mean {np.mean(kls_edit):.4f} (max {max(kls_edit):.4f}), "
        f"source vs transformers-original mean {np.mean(kls_src):.4f}; control vector +1 on the source: harmless "
        f"refusals {sum(before)}/{m} -> {sum(after)}/{m} (newly refused {newly}); control vector -1 on the "
        f"source: harmful refusals {subtracted}"
    )
    assert (src_refused - edit_refused) / n >= 0.75, (src_refused, edit_refused, n)
    assert np.mean(kls_edit) < 0.1, kls_edit
    assert newly >= m / 2, (before, after)


@pytest.mark.integration
def test_smollm2_tied_export_in_llama_cpp(tmp_path: Path) -> None:
    """A real llama-architecture GGUF with a tied head (Q4_1): the export adds the original embedding as
    output.weight, and llama.cpp's next-token distribution follows transformers' orthogonalized model."""
    from refusalkit.data import carve
    from refusalkit.export.gguf import OUTPUT, builtin_gguf
    from refusalkit.models.registry import status
    from refusalkit.prompts import format_prompts

    name = "smollm2-135m-instruct"
    if status(name) == "missing":
        pytest.skip(f"{name} weights not installed (make models)")
    smol = load_model(name, dtype="float32", device="cpu")
    source = builtin_gguf(name)
    u = torch.randn(smol.arch.embed.weight.shape[1], generator=torch.Generator().manual_seed(0))
    prompts = format_prompts(smol.tokenizer, carve({"x": ("builtin:harmless", 6)}, seed=1)["x"])
    ids = [_ids(smol, p) for p in prompts]
    with orthogonalized(smol, u):
        info = export_gguf(smol, source, tmp_path / "smol.gguf")
        want = [_hf_logprobs(smol, x) for x in ids]
    original = [_hf_logprobs(smol, x) for x in ids]
    assert info.added == [OUTPUT]
    llm = load_gguf(tmp_path / "smol.gguf", n_ctx=256)
    got = [llm.first_token_logprobs(x) for x in ids]
    kl_edit = [kl(w, g) for w, g in zip(want, got, strict=True)]
    kl_orig = [kl(o, g) for o, g in zip(original, got, strict=True)]
    print(
        f"\n[llama.cpp] smollm2 export: KL vs transformers-orthogonalized mean {np.mean(kl_edit):.4f}, "
        f"vs the unedited model {np.mean(kl_orig):.4f}"
    )
    assert np.mean(kl_edit) < 0.05 and np.mean(kl_edit) < np.mean(kl_orig) / 5
