"""The control-vector file: llama.cpp's format and layer convention (checked against refusalkit's own
activation addition on a tiny model)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from refusalkit.errors import RefusalkitError
from refusalkit.export.control_vector import (
    cvec_buffer,
    cvec_layer,
    read_control_vector,
    write_control_vector,
)
from refusalkit.interventions import add_direction
from refusalkit.models.loading import LoadedModel


def test_file_follows_llama_cpp_cvector_format(tmp_path: Path) -> None:
    v = torch.linspace(-1, 1, 64)
    path = write_control_vector(v, 5, tmp_path / "c.gguf", model_hint="qwen2", n_layers=28)
    r = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in r.fields.values()}
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "qwen2"
    assert fields["controlvector.layer_count"] == 1
    (t,) = r.tensors
    assert t.name == "direction.4"  # resid_pre[5] is the output of block 4
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1
    np.testing.assert_array_equal(np.array(t.data), v.numpy())
    assert list(read_control_vector(path)) == [4]


def test_layers_without_a_control_vector_form_are_refused(tmp_path: Path) -> None:
    for layer in (0, 1):
        with pytest.raises(RefusalkitError, match=r"layer >= 2"):
            cvec_layer(layer)
    with pytest.raises(RefusalkitError, match=r"past the model"):
        write_control_vector(torch.ones(8), 30, tmp_path / "c.gguf", model_hint="qwen2", n_layers=28)
    assert not (tmp_path / "c.gguf").exists()


def test_reader_applies_llama_cpp_loader_rules(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "bad.gguf", "controlvector")
    w.add_tensor("direction.0", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(RefusalkitError, match=r"not a llama.cpp control-vector tensor"):
        read_control_vector(tmp_path / "bad.gguf")


def test_buffer_layout_starts_at_layer_one() -> None:
    a, b = np.full(4, 2.0, np.float32), np.arange(4, dtype=np.float32)
    buf = cvec_buffer({1: a, 3: b}, n_embd=4, n_layers=5, scale=-0.5)
    assert buf.shape == (16,)  # layers 1..4
    np.testing.assert_array_equal(buf[0:4], -0.5 * a)
    np.testing.assert_array_equal(buf[4:8], 0)
    np.testing.assert_array_equal(buf[8:12], -0.5 * b)
    with pytest.raises(RefusalkitError, match=r"does not fit"):
        cvec_buffer({5: a}, n_embd=4, n_layers=5)


def test_block_output_addition_equals_refusalkit_actadd(lm: LoadedModel, tmp_path: Path) -> None:
    """llama.cpp adds direction.N to block N's output; that must equal refusalkit's addition at
    resid_pre[layer] for N = cvec_layer(layer)."""
    layer = 2
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 5
    path = write_control_vector(v, layer, tmp_path / "c.gguf", model_hint="qwen2")
    vectors = read_control_vector(path)
    ids = torch.tensor([[5, 17, 99, 42, 7]])
    with add_direction(lm.arch, v, layer, 1.0):
        want = lm.model(ids).logits

    def add_at_output(n: int):  # type: ignore[no-untyped-def]
        def hook(_m: torch.nn.Module, _args: object, out: object) -> object:
            delta = torch.from_numpy(vectors[n])
            if isinstance(out, tuple):
                return (out[0] + delta, *out[1:])
            assert isinstance(out, torch.Tensor)
            return out + delta

        return hook

    handles = [lm.arch.blocks[n].register_forward_hook(add_at_output(n)) for n in vectors]
    try:
        got = lm.model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, lm.model(ids).logits, atol=1e-2)
