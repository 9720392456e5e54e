"""A bfloat16 (or float16) copy of a folder of float32 safetensors weights, written once into the cache.

Why: transformers loads float32 weights into a bfloat16 model by reading every float32 tensor (the
memory-mapped file's pages stay resident until the load ends) and casting it, so the load peaks at the
float32 model plus the bfloat16 one: 1.5x a float32 load, where the point of bfloat16 is half. The
built-in models are float32 folders (dequantized from GGUF). The copy is written tensor by tensor in
chunks of ``CHUNK_BYTES`` through plain file reads (no memory map), so writing it never holds more than
a chunk, and loading it maps half the bytes. Folders without float32 tensors need no copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # float32 bytes read, cast and written at a time
SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16"}
MARKER = "refusalkit-cast.json"  # written last: a copy without it is incomplete


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
    return header, 8 + n


def needs_cast(folder: Path) -> bool:
    """True when the folder's weights are safetensors and some of them are float32."""
    files = sorted(folder.glob("*.safetensors"))
    return bool(files) and any(
        isinstance(info, dict) and info.get("dtype") == "F32"
        for f in files
        for info in read_header(f)[0].values()
    )


def cast_file(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """``src`` with every F32 tensor stored as ``dtype`` (other tensors byte for byte), into ``dst``."""
    header, start = read_header(src)
    tensors = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
    )
    new: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    offset = 0
    for name, info in tensors:
        size = info["data_offsets"][1] - info["data_offsets"][0]
        if info["dtype"] == "F32":
            size //= 2
        new[name] = {**info, "dtype": SAFETENSORS_DTYPE[dtype] if info["dtype"] == "F32" else info["dtype"]}
        new[name]["data_offsets"] = [offset, offset + size]
        offset += size
    blob = json.dumps(new, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    buf = bytearray(CHUNK_BYTES)  # one buffer for every read: the copy holds a chunk, never a tensor
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(blob)))
        fout.write(blob)
        for name, info in tensors:
            a, b = info["data_offsets"]
            fin.seek(start + a)
            left = b - a
            while left:
                view = memoryview(buf)[: min(left, CHUNK_BYTES)]
                n = fin.readinto(view)
                if not n:
                    raise OSError(f"{src} ends inside tensor {name}")
                left -= n
                if info["dtype"] == "F32":
                    half = torch.frombuffer(view[:n], dtype=torch.float32).to(dtype)
                    fout.write(half.view(torch.uint8).numpy().data)
                else:
                    fout.write(view[:n])


def cast_copy(folder: str | Path, dtype: torch.dtype, root: Path, key: str) -> Path | None:
    """The folder ``root/key-dtype``: ``folder`` with its float32 safetensors weights stored as ``dtype``
    (written on first use; ``key`` names the weights' content), or None when there is nothing to cast
    (no float32 safetensors, or a dtype other than bfloat16/float16)."""
    folder = Path(folder)
    if dtype not in SAFETENSORS_DTYPE or not needs_cast(folder):
        return None
    out = root / f"{key.replace(':', '-')}-{str(dtype).removeprefix('torch.')}"
    if (out / MARKER).is_file():
        return out
    gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 / 1e9
    log.info("writing a %s copy of the float32 weights of %s (%.1f GB, once) into %s", dtype, folder, gb, out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in folder.iterdir():
            if f.suffix == ".safetensors":
                cast_file(f, tmp / f.name, dtype)
            elif f.is_file():
                shutil.copy2(f, tmp / f.name)  # config, tokenizer, template, index: small
        (tmp / MARKER).write_text(json.dumps({"source": str(folder), "key": key}))
        if not (out / MARKER).is_file():  # another process may have finished the same copy meanwhile
            shutil.rmtree(out, ignore_errors=True)  # a leftover without its marker is never read
            try:
                os.replace(tmp, out)
            except OSError:
                if not (out / MARKER).is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
