"""The compute dtype: ``--dtype auto`` resolved to float32 or bfloat16 by what the device runs fast.

- CUDA: bfloat16 where the GPU supports it (it runs it natively), else float32.
- CPU: a probe of about a second times one matrix product of the model's MLP shape (``PROBE_ROWS``
  rows, its hidden size by its intermediate size) in float32 and in bfloat16 and picks bfloat16 when it
  is at least ``MIN_SPEEDUP`` times faster. CPUs differ a lot here: with AMX (amx_bf16) bfloat16 runs
  3-6x faster, with avx512_bf16 alone 2-3x, and without either torch emulates it, slower than float32.
  The result is cached per machine (CPU model, its flags, torch version, threads, shape) in the
  refusalkit cache folder, so only the first run on a machine pays for it.
- anything else (MPS, other devices): float32.

Explicit dtypes are used as given. The choice (and the probe's numbers) is recorded in the manifest, and
the resolved dtype, never "auto", is what the stages fingerprint: a float32 run never resumes artifacts
computed in bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from refusalkit.errors import RefusalkitError
from refusalkit.models.registry import cache_dir
from refusalkit.utils import write_json

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
PROBE_ROWS = 128  # a selection pass of a few prompts, or a decoding step of a full generation batch
PROBE_SECONDS = 1.0
MIN_SPEEDUP = 1.15  # below this a bfloat16 win is within the noise of a shared machine: keep float32
# The default model's MLP (Qwen2.5 1.5B): the probe's shape when the model's config is not at hand.
DEFAULT_SHAPE = (1536, 8960)
CACHE_FILE = "dtype-probe.json"


@dataclass
class DtypeChoice:
    """The compute dtype of a run and why: ``requested`` as set, ``dtype`` as resolved, ``reason`` in
    words, ``probe`` the CPU probe's numbers (None when no probe ran)."""

    requested: str
    dtype: str
    reason: str
    probe: dict[str, Any] | None = field(default=None)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved name (float32, bfloat16, float16)."""
    if name not in DTYPES[1:]:
        raise RefusalkitError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
    out: torch.dtype = getattr(torch, name)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the settings' spelling)."""
    return str(dtype).removeprefix("torch.")


def replay_tolerance(dtype: torch.dtype) -> float:
    """The largest relative logit difference a restart at a layer (``refusalkit.restart``) may show
    against the recorded pass before it is taken as wrong: 1e-4 in float32 (the order of operations),
    four roundings of a half-precision dtype (bfloat16: 0.031; measured 0 on the test models, where a
    wrong replay is off by 0.38 or more), so a bfloat16 run keeps its restarts."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def mlp_shape(config: dict[str, Any] | None) -> tuple[int, int]:
    """(hidden size, intermediate size) of a transformers config (a dict), else the default model's."""
    if not config:
        return DEFAULT_SHAPE
    text = config.get("text_config") or {}  # multimodal configs nest the language model's
    d = config.get("hidden_size") or text.get("hidden_size") or config.get("n_embd")
    ff = config.get("intermediate_size") or text.get("intermediate_size") or config.get("n_inner")
    if not isinstance(d, int) or d <= 0:
        return DEFAULT_SHAPE
    return d, ff if isinstance(ff, int) and ff > 0 else 4 * d


def choose_dtype(
    requested: str, device: str, shape: tuple[int, int] = DEFAULT_SHAPE, *, cache: Path | None = None
) -> DtypeChoice:
    """Resolve ``requested`` (auto, float32, bfloat16, float16) for ``device`` (cpu, cuda, cuda:N, ...).

    ``shape``: the model's (hidden size, intermediate size), the CPU probe's matrix product. ``cache``:
    the probe cache file (default: ``CACHE_FILE`` in the refusalkit cache folder).
    """
    if requested != "auto":
        torch_dtype(requested)  # an unknown name fails here, with the known ones
        return DtypeChoice(requested, requested, "set explicitly")
    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return DtypeChoice(requested, "bfloat16", "CUDA device with bfloat16 support")
        return DtypeChoice(requested, "float32", "CUDA device without bfloat16 support")
    if device != "cpu":
        return DtypeChoice(requested, "float32", f"device {device}: float32 (no probe for it)")
    probe = cached_probe(shape, cache)
    fast = probe["speedup"] >= MIN_SPEEDUP
    reason = (
        f"CPU probe: bfloat16 {probe['speedup']:.2f}x float32's speed on a {PROBE_ROWS}x{shape[0]}x{shape[1]} "
        f"matrix product ({'>=' if fast else '<'} {MIN_SPEEDUP})"
    )
    return DtypeChoice(requested, "bfloat16" if fast else "float32", reason, probe)


def cpu_identity() -> dict[str, Any]:
    """What the probe's result depends on: the CPU (model name and flags), torch, the thread count."""
    name, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and not name:
                name = value
            elif key in ("flags", "Features") and not flags:
                flags = value
    except OSError:
        pass  # not Linux: the processor's name alone
    name = name or platform.processor() or platform.machine()
    bf16_flags = sorted(f for f in flags.split() if "bf16" in f or f.startswith("amx"))
    return {
        "cpu": name,
        "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "bf16_flags": bf16_flags,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def cache_file() -> Path:
    return cache_dir() / CACHE_FILE


def cached_probe(shape: tuple[int, int], cache: Path | None = None) -> dict[str, Any]:
    """``probe_cpu(shape)``, read from the cache when this machine measured it before."""
    path = cache if cache is not None else cache_file()
    ident = cpu_identity()
    key = json.dumps({**ident, "shape": list(shape), "rows": PROBE_ROWS}, sort_keys=True)
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        saved = {}  # a damaged cache is measured again and rewritten
    if key in saved:
        return {**saved[key], "cached": True}
    result = {**probe_cpu(shape), **ident}
    try:
        write_json(path, {**saved, key: result})
    except OSError as exc:  # a read-only cache folder costs a probe per run, nothing else
        log.warning("could not cache the dtype probe in %s: %s", path, exc)
    return {**result, "cached": False}


@torch.inference_mode()
def probe_cpu(
    shape: tuple[int, int], seconds: float = PROBE_SECONDS, rows: int = PROBE_ROWS
) -> dict[str, Any]:
    """Time ``x @ w.T`` ([rows, d] x [ff, d]) in float32 and bfloat16, alternating, for about
    ``seconds``; the best time of each (the least disturbed by other work on the machine)."""
    d, ff = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen)
    w = torch.randn(ff, d, generator=gen)
    pairs = {"float32": (x, w), "bfloat16": (x.bfloat16(), w.bfloat16())}
    for a, b in pairs.values():  # warm-up outside the clock: oneDNN picks, compiles and packs its kernels
        torch.nn.functional.linear(a, b)
    best = {name: float("inf") for name in pairs}
    t_end = time.perf_counter() + seconds
    rounds = 0
    while rounds < 2 or (time.perf_counter() < t_end and rounds < 50):
        for name, (a, b) in pairs.items():
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best[name] = min(best[name], time.perf_counter() - t0)
        rounds += 1
    flops = 2.0 * rows * d * ff
    return {
        "shape": [rows, d, ff],
        "rounds": rounds,
        "float32_ms": round(best["float32"] * 1e3, 3),
        "bfloat16_ms": round(best["bfloat16"] * 1e3, 3),
        "float32_gflops": round(flops / best["float32"] / 1e9, 1),
        "bfloat16_gflops": round(flops / best["bfloat16"] / 1e9, 1),
        "speedup": round(best["float32"] / best["bfloat16"], 3),
    }
