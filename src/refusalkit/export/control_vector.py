"""The refusal direction as a llama.cpp control vector: add or subtract refusal at run time.

llama.cpp's format (tools/cvector-generator, read by common_control_vector_load in common/common.cpp):
a GGUF whose ``general.architecture`` is ``controlvector``, with ``controlvector.model_hint`` (the
model's architecture) and ``controlvector.layer_count`` (how many direction tensors the file holds),
and one float32 vector ``direction.N`` [n_embd] per layer N >= 1. llama.cpp adds ``direction.N`` times
the user's scale to the *output* of block N (``l_out``, after the MLP's residual add), at every
position. refusalkit's direction lives at resid_pre[layer], the input of block ``layer``, which is the
output of block ``layer - 1``; so it is written as ``direction.{layer - 1}``. llama.cpp never applies a
vector at N = 0, so a direction read at layer 0 or 1 has no control-vector form.

The vector is written unnormalized, exactly as refusalkit's activation addition uses it: scale +1 adds
refusal (``--control-vector-scaled FILE 1``), scale -1 subtracts it.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from refusalkit.errors import RefusalkitError
from refusalkit.utils import atomic_path

ARCH = "controlvector"
TENSOR_PREFIX = "direction."


def cvec_layer(layer: int) -> int:
    """The llama.cpp control-vector index N (added to block N's output) for resid_pre[layer]."""
    if layer < 2:
        raise RefusalkitError(
            f"the direction sits at resid_pre[{layer}]; llama.cpp adds control vectors to the output of "
            "block N >= 1 (= resid_pre[N + 1]), so only directions at layer >= 2 have a control-vector form. "
            "Export the edited weights (--format gguf) instead"
        )
    return layer - 1


def write_control_vector(
    vector: torch.Tensor, layer: int, out: str | Path, *, model_hint: str, n_layers: int | None = None
) -> Path:
    """Write ``vector`` [d_model] (added at resid_pre[layer]) as a llama.cpp control vector GGUF."""
    n = cvec_layer(layer)
    if n_layers is not None and n >= n_layers:
        raise RefusalkitError(
            f"layer {layer} is past the model's {n_layers} blocks; is this the right direction?"
        )
    out = Path(out)
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy()
    if data.ndim != 1:
        raise RefusalkitError(f"a control vector is one vector [d_model]; got shape {tuple(data.shape)}")
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint)
        writer.add_int32(f"{ARCH}.layer_count", 1)
        writer.add_tensor(f"{TENSOR_PREFIX}{n}", data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def read_control_vector(path: str | Path) -> dict[int, np.ndarray]:
    """The file's vectors by llama.cpp layer index N, checked with llama.cpp's loader's rules
    (``direction.N`` names with N >= 1, float32, one dimension, one common length)."""
    reader = gguf.GGUFReader(path)
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        if prefix + "." != TENSOR_PREFIX or not index.isdigit() or int(index) == 0:
            raise RefusalkitError(
                f"{path}: {t.name!r} is not a llama.cpp control-vector tensor (direction.N, N >= 1)"
            )
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise RefusalkitError(f"{path}: {t.name} must be a float32 vector")
        out[int(index)] = np.array(t.data, dtype=np.float32)
    if len({v.shape for v in out.values()}) > 1:
        raise RefusalkitError(f"{path}: direction tensors differ in length")
    return out


def cvec_buffer(vectors: dict[int, np.ndarray], n_embd: int, n_layers: int, scale: float = 1.0) -> np.ndarray:
    """The flat buffer ``llama_set_adapter_cvec`` takes: n_embd floats per layer, starting at layer 1
    (layer N at offset n_embd * (N - 1)), as common_control_vector_load builds it."""
    buf = np.zeros(n_embd * (n_layers - 1), dtype=np.float32)
    for n, v in vectors.items():
        if v.shape != (n_embd,) or not 1 <= n < n_layers:
            raise RefusalkitError(f"control vector direction.{n} {v.shape} does not fit this model")
        buf[n_embd * (n - 1) : n_embd * n] += scale * v
    return buf
