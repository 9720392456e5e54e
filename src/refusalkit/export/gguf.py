"""GGUF export: the source GGUF with only the edited tensors replaced by the model's current weights.

The exporter never edits anything itself: it writes "the residual-writing tensors of whatever weights
``lm`` has now", so it works inside ``orthogonalized(lm, direction)`` and inside any other edit context
(for example a searched edit). Everything else in the source file (metadata, tokenizer, every other
tensor) is copied byte for byte.

Which GGUF tensors hold the edited weights is declared as data (``EDITED``), from the canonical names of
``models/adapters.py`` to llama.cpp's tensor kinds. llama.cpp stores a matrix with the same row-major
layout as transformers' ``nn.Linear.weight`` / ``nn.Embedding.weight`` ([d_out, d_in] and
[n_vocab, d_model]); only attention Q/K of some families are permuted by llama.cpp's converter, and
those are never edited here.

Tied heads: a source without ``output.weight`` computes its logits with ``token_embd``. Editing the
embedding would then edit the head too, which the paper does not do, so the export adds an
``output.weight`` holding the source's original embedding bytes (the same untying as the safetensors
export).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from refusalkit.errors import RefusalkitError
from refusalkit.models.loading import LoadedModel
from refusalkit.models.registry import BUILTIN_MODELS, builtin_gguf
from refusalkit.utils import atomic_path

log = logging.getLogger(__name__)

TensorType = Literal["q8_0", "f16", "f32"]
QTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "f16": gguf.GGMLQuantizationType.F16,
    "f32": gguf.GGMLQuantizationType.F32,
}
META_PREFIX = "refusalkit."

# Canonical module (models/adapters.py) -> llama.cpp tensor kind. Per-block kinds take the block index.
EDITED: tuple[tuple[str, gguf.MODEL_TENSOR], ...] = (
    ("embed", gguf.MODEL_TENSOR.TOKEN_EMBD),
    ("pos_embed", gguf.MODEL_TENSOR.POS_EMBD),
    ("attn_write", gguf.MODEL_TENSOR.ATTN_OUT),
    ("mlp_write", gguf.MODEL_TENSOR.FFN_DOWN),
)
OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
TOKEN_EMBD = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"


@dataclass
class GGUFExport:
    """What an export wrote: the file, which tensors it replaced or added, its size and duration."""

    path: Path
    architecture: str
    replaced: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    copied: int = 0
    size_bytes: int = 0
    seconds: float = 0.0


def gguf_architecture(reader: gguf.GGUFReader, source: Path) -> gguf.MODEL_ARCH:
    """The source's llama.cpp architecture; an error if gguf-py does not know it."""
    field_ = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    name = str(field_.contents()) if field_ is not None else None
    known = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if name not in known:
        raise RefusalkitError(
            f"{source}: GGUF architecture {name!r} is unknown to gguf-py {_gguf_version()}, so refusalkit "
            "cannot tell which tensors hold the edited weights; upgrade gguf (`pip install -U gguf`), or "
            "export safetensors (--format safetensors) and convert with llama.cpp"
        )
    return known[name]


def _gguf_version() -> str:
    from importlib import metadata

    return metadata.version("gguf")


def _weights(mod: torch.nn.Module, name: str) -> list[tuple[str, torch.Tensor]]:
    out = []
    for suffix in ("weight", "bias"):
        t = getattr(mod, suffix, None)
        if isinstance(t, torch.Tensor):
            out.append((f"{name}.{suffix}", t))
    return out


def edited_tensors(
    lm: LoadedModel, arch: gguf.MODEL_ARCH, modules: Sequence[torch.nn.Module] | None = None
) -> dict[str, torch.Tensor]:
    """The residual-writing tensors of ``lm`` as they are now, keyed by their GGUF tensor names; only
    those of ``modules`` if given (an edit that changes some writes, e.g. a searched edit's targets)."""
    allowed = set(gguf.MODEL_TENSORS[arch])
    only = None if modules is None else {id(m) for m in modules}
    out: dict[str, torch.Tensor] = {}
    for canonical, kind in EDITED:
        mods: Any = getattr(lm.arch, canonical)
        if mods is None:
            continue
        if kind not in allowed:
            raise RefusalkitError(
                f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]!r} architecture has no {gguf.TENSOR_NAMES[kind]!r} "
                "tensor, so the edited weights cannot be placed; export --format safetensors instead"
            )
        for i, mod in enumerate(mods if isinstance(mods, list) else [mods]):
            if only is None or id(mod) in only:
                out.update(_weights(mod, gguf.TENSOR_NAMES[kind].format(bid=i)))
    return out


def _numpy_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first


def _target_type(shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Vectors stay float32 (as llama.cpp's converter keeps them); a row that does not fill whole
    quantization blocks falls back to float16."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _encoded_info(
    shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType
) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape, numpy dtype, bytes) of a tensor encoded as ``qtype``, as GGUFWriter.add_tensor_info takes them:
    float types by element shape, quantized types by their byte shape (uint8)."""
    floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    if qtype in floats:
        dtype = np.dtype(floats[qtype])
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return arr
    if qtype == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, extra: Mapping[str, Any]) -> None:
    """Every key of the source except those the writer sets itself and old refusalkit records."""
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith(("GGUF.", META_PREFIX)):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for key, value in extra.items():
        writer.add_key_value(
            META_PREFIX + key, value, gguf.GGUFValueType.get_type(value), sub_type=_sub_type(value)
        )


def _sub_type(value: Any) -> gguf.GGUFValueType | None:
    return gguf.GGUFValueType.get_type(value[0]) if isinstance(value, list) and value else None


def rewrite_gguf(
    source: str | Path,
    out: str | Path,
    replace: Mapping[str, torch.Tensor],
    *,
    tensor_type: TensorType = "q8_0",
    metadata: Mapping[str, Any] | None = None,
    untie_head: bool = True,
) -> GGUFExport:
    """Copy ``source`` to ``out``, replacing the tensors named in ``replace`` (float tensors in
    transformers' layout, encoded as ``tensor_type``) and adding ``refusalkit.*`` metadata.

    Streams: each replaced tensor is encoded only when it is written, and copied tensors go from the
    source's memory map straight to the file. ``out`` appears only when complete.
    """
    t0 = time.perf_counter()
    source, out = Path(source), Path(out)
    reader = gguf.GGUFReader(source)
    arch = gguf_architecture(reader, source)
    by_name = {t.name: t for t in reader.tensors}
    missing = sorted(set(replace) - set(by_name))
    if missing:
        raise RefusalkitError(
            f"{source} has no tensor(s) {', '.join(missing[:4])}; this GGUF is not the model whose weights "
            "were edited (check the run's --model)"
        )
    wanted = QTYPES[tensor_type]
    plan: list[tuple[str, gguf.ReaderTensor | torch.Tensor, gguf.GGMLQuantizationType]] = []
    result = GGUFExport(out, gguf.MODEL_ARCH_NAMES[arch])
    for t in reader.tensors:
        if t.name in replace:
            new = replace[t.name]
            if tuple(new.shape) != _numpy_shape(t):
                raise RefusalkitError(
                    f"{t.name}: the model's tensor has shape {tuple(new.shape)} but {source} holds "
                    f"{_numpy_shape(t)}; this GGUF is not the model whose weights were edited"
                )
            plan.append((t.name, new, _target_type(tuple(new.shape), wanted)))
            result.replaced.append(t.name)
        else:
            plan.append((t.name, t, t.tensor_type))
            result.copied += 1
        if t.name == TOKEN_EMBD and untie_head and OUTPUT not in by_name and TOKEN_EMBD in replace:
            plan.append((OUTPUT, t, t.tensor_type))  # the original embedding, as the head
            result.added.append(OUTPUT)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch], endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        _copy_metadata(reader, writer, metadata or {})
        for name, src, qtype in plan:
            if isinstance(src, torch.Tensor):
                writer.add_tensor_info(name, *_encoded_info(tuple(src.shape), qtype), raw_dtype=qtype)
            else:
                writer.add_tensor_info(name, src.data.shape, src.data.dtype, src.data.nbytes, src.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _name, src, qtype in plan:
            if isinstance(src, torch.Tensor):
                writer.write_tensor_data(_encode(src, qtype))
            else:
                writer.write_tensor_data(src.data, tensor_endianess=reader.endianess)
        writer.close()
    result.size_bytes = out.stat().st_size
    result.seconds = time.perf_counter() - t0
    return result


def export_gguf(
    lm: LoadedModel,
    source: str | Path,
    out: str | Path,
    *,
    tensor_type: TensorType = "q8_0",
    metadata: Mapping[str, Any] | None = None,
    modules: Sequence[torch.nn.Module] | None = None,
) -> GGUFExport:
    """Write ``source`` with its residual-writing tensors replaced by ``lm``'s current weights.

    Call it inside an edit context (``orthogonalized(lm, direction)``); the edited tensors are the
    token embedding (and learned position embedding), every attention output and every MLP output, or
    only those of ``modules`` (the rest keep the source's bytes).
    """
    reader = gguf.GGUFReader(source)
    arch = gguf_architecture(reader, Path(source))
    replace = edited_tensors(lm, arch, modules)
    info = {
        **(metadata or {}),
        "edited_tensors": sorted(replace),
        "edited_tensor_type": tensor_type,
    }
    return rewrite_gguf(source, out, replace, tensor_type=tensor_type, metadata=info)


# ---- where the source GGUF comes from -------------------------------------------------------------------


def source_gguf(spec: str) -> Path | None:
    """The GGUF file a model spec was loaded from: a built-in model's (assembled once into the cache),
    a user's ``.gguf`` file, or None for a transformers folder or hub id."""
    if spec in BUILTIN_MODELS:
        return builtin_gguf(spec)
    path = Path(spec).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


# ---- models without a GGUF source: llama.cpp's own converter ------------------------------------------

CONVERTER = "convert_hf_to_gguf.py"


def llama_cpp_converter(llama_cpp: Path | None, model: str) -> Path:
    """The converter script of the user's llama.cpp checkout, or an error saying what to install."""
    if llama_cpp is None:
        raise RefusalkitError(
            f"model {model!r} was not loaded from a GGUF file, so there is no GGUF to copy the untouched "
            "tensors from; GGUF export then needs llama.cpp's converter: `git clone "
            "https://github.com/ggml-org/llama.cpp`, `pip install -r llama.cpp/requirements/"
            "requirements-convert_hf_to_gguf.txt`, and pass --llama-cpp PATH/TO/llama.cpp "
            "(or export --format safetensors)"
        )
    script = Path(llama_cpp).expanduser() / CONVERTER
    if not script.is_file():
        raise RefusalkitError(
            f"{llama_cpp} has no {CONVERTER}; pass --llama-cpp the root of a llama.cpp checkout "
            "(git clone https://github.com/ggml-org/llama.cpp)"
        )
    return script


def convert_with_llama_cpp(
    lm: LoadedModel,
    edit: Callable[[LoadedModel], AbstractContextManager[Any]],
    script: Path,
    out: Path,
    tensor_type: TensorType,
    metadata: Mapping[str, Any],
) -> None:
    """Save ``lm`` under ``edit(lm)`` as a transformers folder, convert it with llama.cpp's ``script``
    (every tensor encoded as ``tensor_type``), and add the ``refusalkit.*`` metadata."""
    import subprocess
    import sys
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".refusalkit-convert-", dir=out.parent) as tmp:
        folder, converted = Path(tmp) / "hf", Path(tmp) / "converted.gguf"
        with edit(lm):
            lm.model.save_pretrained(folder)
            lm.tokenizer.save_pretrained(folder)
        cmd = [
            sys.executable,
            str(script),
            str(folder),
            "--outfile",
            str(converted),
            "--outtype",
            tensor_type,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not converted.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise RefusalkitError(
                f"llama.cpp's converter failed (exit {proc.returncode}):\n{tail}\nIts Python requirements are in "
                f"{script.parent}/requirements/requirements-convert_hf_to_gguf.txt"
            )
        rewrite_gguf(converted, out, {}, tensor_type=tensor_type, metadata=dict(metadata))
