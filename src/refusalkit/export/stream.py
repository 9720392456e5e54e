"""A transformers export written by streaming the source's safetensors files, tensor by tensor.

Why: a run that computes in bfloat16 from a float32 folder (every built-in model) exports in the
source's dtype. Loading a second, float32 model for that held both models at once: a whole bfloat16
run of the default 1.5B model peaked at 13.1 GiB, above the float32 run's 10.1 GiB. Here every tensor
the edit leaves alone is copied from the source files byte for byte, in chunks of plain reads (no
memory map, whose pages would stay resident); each tensor it changes is read in the source's
dtype, edited by the edit core's own ``edits.project`` (the operation ``edits.apply`` runs, on the same
float64 unit vectors), and written. The checkpoint equals the second load's bit for bit (tested), and
the export holds one edited tensor beyond the computing model. A tied output head the edit unties
gets the source's original embedding bytes, as ``edits.untie_head`` keeps them.

``stream_plan`` maps every edited parameter of the loaded model to its tensor in the source files
(names as transformers saves them, with or without the base model's prefix, shapes and dtypes checked)
and returns the reason when one cannot be mapped; the caller then loads the second copy, as before,
so an edited tensor is never written unedited.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusalkit.edits import Target, check_orthogonalizable, project
from refusalkit.models.cast import read_header
from refusalkit.models.loading import LoadedModel

SHARD_BYTES = 2 * 10**9  # bytes of tensors per output shard (a tensor larger than this gets its own)
ALIGN = 64  # bytes: the widest vector loads (AVX-512) BLAS aligns to
CHUNK_BYTES = 4 << 20  # bytes copied at a time for a tensor the edit leaves alone
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
FLOATS = ("F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Edit:
    """One projection of a tensor: ``edits.project`` on its rows (a Linear weight's columns)."""

    unit: torch.Tensor
    scale: float
    keep_norm: bool
    transpose: bool
    device: torch.device  # the loaded parameter's: the edit core edits each tensor on its own device


@dataclass
class Entry:
    """One output tensor: ``key`` of ``file`` (bytes ``start``..``start + nbytes``), written as ``name``
    after ``edits`` (none: copied byte for byte)."""

    name: str
    file: Path
    key: str
    dtype: str
    shape: list[int]
    start: int
    nbytes: int
    edits: list[Edit] = field(default_factory=list)


@dataclass
class StreamPlan:
    """Every tensor of the export, in source order, and whether the output head is untied."""

    entries: list[Entry]
    untie: bool

    @property
    def edited(self) -> list[str]:
        return [e.name for e in self.entries if e.edits]


def source_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (its index's, else model.safetensors, else all)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def file_key(name: str, keys: set[str] | dict[str, Any], prefix: str) -> str | None:
    """The source's name of parameter ``name``: itself, or itself with or without the base model's
    ``prefix`` (a checkpoint saved from the base model); None when absent or ambiguous."""
    names = [name]
    if prefix:
        p = prefix + "."
        names.append(name.removeprefix(p) if name.startswith(p) else p + name)
    hits = [n for n in names if n in keys]
    return hits[0] if len(hits) == 1 else None


def stream_plan(lm: LoadedModel, targets: list[Target], keep: str) -> StreamPlan | str:
    """The export of ``targets`` applied to ``lm``'s source folder in its dtype ``keep``, or why it
    cannot be streamed (the caller loads a second copy instead)."""
    check_orthogonalizable(lm.arch)  # the same refusal as applying the edit to a loaded model
    files = source_files(Path(lm.source))
    if not files:
        return f"{lm.source} has no safetensors weights"
    tensors: dict[str, Entry] = {}
    for f in files:
        header, start = read_header(f)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if key in tensors:
                return f"tensor {key} is stored twice ({tensors[key].file.name} and {f.name})"
            a, b = info["data_offsets"]
            tensors[key] = Entry(key, f, key, info["dtype"], list(info["shape"]), start + a, b - a)
    code = CODES[keep]
    odd = [e for e in tensors.values() if e.dtype in FLOATS and e.dtype != code]
    if odd:  # the second load writes every weight in ``keep``; a copy would keep the other dtype
        return f"tensor {odd[0].key} is stored as {odd[0].dtype}, not {code} as the config says"
    names = {id(m): n for n, m in lm.model.named_modules()}
    prefix = str(getattr(lm.model, "base_model_prefix", "") or "")
    for t in targets:
        module = names.get(id(t.module))
        if module is None:
            return f"the edited module {t.name or type(t.module).__name__} is not a module of the model"
        for pname, p in zip(("weight", "bias"), t.parameters(), strict=False):
            param = f"{module}.{pname}"
            found = file_key(param, tensors, prefix)
            if found is None:
                return f"the edited parameter {param} has no tensor of that name in {lm.source}"
            e = tensors[found]
            if e.shape != list(p.shape) or e.dtype not in DTYPES:
                return f"the edited parameter {param} is {list(p.shape)}, but {found} is {e.dtype} {e.shape}"
            e.edits.append(Edit(t.unit, t.scale, t.keep_norm, t.kind == "linear" and p.ndim == 2, p.device))
    entries = sorted(tensors.values(), key=lambda e: (files.index(e.file), e.start))
    head = getattr(lm.arch.unembed, "weight", None)
    untie = head is getattr(lm.arch.embed, "weight", None) and any(t.kind == "embedding" for t in targets)
    if untie:  # as edits.untie_head: the head keeps the original embedding, in a tensor of its own
        embed, out = f"{names[id(lm.arch.embed)]}.weight", f"{names[id(lm.arch.unembed)]}.weight"
        if embed not in tensors:
            return f"the tied head needs its own tensor, but {lm.source} stores no {embed}"
        src = tensors[embed]
        entries = [e for e in entries if e.name != out]
        entries.append(Entry(out, src.file, src.key, src.dtype, src.shape, src.start, src.nbytes))
    return StreamPlan(entries, untie)


def shards(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """Entries in order, cut into shards of at most ``limit`` bytes (a larger tensor alone)."""
    out: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if out[-1] and size + e.nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(e)
        size += e.nbytes
    return out


def _edited_bytes(e: Entry, f: Any) -> torch.Tensor:
    """The tensor ``e`` read from ``f`` and edited, as bytes (one tensor in memory)."""
    # At the address modulo 64 the loaded model's tensor has (transformers maps the file: the data's
    # file offset): BLAS kernels split vectors by alignment, and a float32 edit at another alignment
    # differs in the last bit of some elements (seen: 3130 of the tiny model's embedding, 1 ulp).
    room = torch.empty(e.nbytes + ALIGN, dtype=torch.uint8)
    skip = (e.start - room.data_ptr()) % ALIGN
    raw = room[skip : skip + e.nbytes]
    f.seek(e.start)
    if f.readinto(raw.numpy()) != e.nbytes:
        raise OSError(f"{e.file} ends inside tensor {e.key}")
    w = raw.view(DTYPES[e.dtype]).view(e.shape)
    for op in e.edits:
        on = w if op.device == w.device else w.to(op.device)
        project(on.T if op.transpose else on, op.unit, op.scale, keep_norm=op.keep_norm)
        if on is not w:
            w.copy_(on)
    return raw


def write_shard(path: Path, entries: list[Entry]) -> None:
    """One safetensors file of ``entries`` (header first; each tensor copied or edited in turn)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    buf = bytearray(CHUNK_BYTES)
    with open(path, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for e in entries:
            with open(e.file, "rb") as f:
                if e.edits:
                    out.write(_edited_bytes(e, f).numpy().data)
                    continue
                f.seek(e.start)
                left = e.nbytes
                while left:
                    n = f.readinto(memoryview(buf)[: min(left, CHUNK_BYTES)])
                    if not n:
                        raise OSError(f"{e.file} ends inside tensor {e.key}")
                    out.write(memoryview(buf)[:n])
                    left -= n


def write_weights(plan: StreamPlan, folder: Path) -> list[Path]:
    """The plan's tensors as model.safetensors, or as shards of ``SHARD_BYTES`` with the index
    transformers reads (model.safetensors.index.json)."""
    parts = shards(plan.entries, SHARD_BYTES)
    if len(parts) == 1:
        write_shard(folder / "model.safetensors", parts[0])
        return [folder / "model.safetensors"]
    paths = [folder / f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for path, part in zip(paths, parts, strict=True):
        write_shard(path, part)
    numel = sum(int(torch.Size(e.shape).numel()) for e in plan.entries)
    index = {
        "metadata": {"total_parameters": numel, "total_size": sum(e.nbytes for e in plan.entries)},
        "weight_map": {e.name: path.name for path, part in zip(paths, parts, strict=True) for e in part},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths


def write_config(lm: LoadedModel, folder: Path, keep: str, untie: bool) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them for the model loaded
    in ``keep`` with the edit applied: its dtype, and an untied head if the edit untied it."""
    config = copy.deepcopy(lm.model.config)  # the run's model keeps its own
    config.dtype = keep
    config.architectures = [type(lm.model).__name__]
    if untie:
        for c in (config, getattr(config, "text_config", None)):
            if c is not None and hasattr(c, "tie_word_embeddings"):
                c.tie_word_embeddings = False
    config.save_pretrained(folder)
    if lm.model.can_generate():
        lm.model.generation_config.save_pretrained(folder)


def stream_folder(
    lm: LoadedModel,
    plan: StreamPlan,
    out: Path,
    keep: str,
    *,
    extra: dict[str, str] | None = None,
    carry: Callable[[Path], bool] | None = None,
) -> Path:
    """Write the plan's checkpoint, config, generation config, tokenizer and ``extra`` files (name ->
    text) into a folder beside ``out`` and rename it into place, as ``orthogonalize.save_folder``
    does; files of an existing ``out`` for which ``carry`` is true (a control vector) are kept."""
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_weights(plan, tmp)
        write_config(lm, tmp, keep, plan.untie)
        lm.tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            for p in [p for p in out.iterdir() if carry is not None and carry(p)]:
                os.replace(p, tmp / p.name)
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
