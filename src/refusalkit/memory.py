"""Give freed host memory back to the operating system between the big steps of a run.

glibc's malloc keeps freed blocks in its heaps for reuse. A generation batch frees gigabytes in pieces
of a few MB (each decoding step grows every layer's KV cache by a copy), and what it frees stays
resident: measured on the default model in bfloat16, a 256-row generation left 1.9 GiB of free heap
resident after it returned, and the evaluate stage left 0.8 GiB (float32: 2.0 GiB) that every later
stage then stacked its own peak on (bench/dtype.py's peak memory, issue 20). ``release`` asks malloc
to return free heap pages (``malloc_trim(0)``; a few milliseconds on a heap of a few GiB) and is
called where such a step ends: after a generation batch, around a weight edit's saved copies, after
every stage and measurement. Elsewhere than glibc (macOS, musl, Windows) it does nothing.

Written by hand: the one libc call has no library of its own; ctypes loads the C library once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


@cache
def _trim() -> object | None:
    """glibc's ``malloc_trim``, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # musl has no malloc_trim
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release() -> bool:
    """Return free heap memory to the operating system; True if malloc gave any back."""
    fn = _trim()
    return bool(fn(0)) if fn is not None else False  # type: ignore[operator]
