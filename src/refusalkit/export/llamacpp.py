"""Running a GGUF in llama.cpp itself (through llama-cpp-python, the `llamacpp` extra), in a child process.

Used to check an export in the runtime people use: greedy completions, first-token log-probabilities
and control vectors. Prompts go in as token ids from the transformers tokenizer's chat template, so
llama.cpp and transformers see exactly the same tokens.

llama.cpp runs in a spawned child process (``refusalkit.child``): a crash in its native code (a native
build's AMX kernels die with SIGILL on some Xeons, issue 22) becomes a RefusalkitError naming the signal
and the rebuild command, never the death of the caller (a long command, or the test suite).
``check_llamacpp`` is `refusalkit models --llamacpp`: a built-in GGUF, a 30-token prompt, its logits.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refusalkit.child import Child, ChildCrashed
from refusalkit.errors import RefusalkitError
from refusalkit.export.llamacpp_build import rebuild_hint

INSTALL_HINT = (
    "running GGUF files needs llama-cpp-python: `make llamacpp` in a refusalkit checkout, or "
    "`pip install 'refusalkit[llamacpp]'` (it compiles llama.cpp; needs cmake and a C++ compiler, a few "
    "minutes once; docs/export.md says how to build it for a CPU with AMX)"
)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise RefusalkitError(INSTALL_HINT) from None
    return llama_cpp


def crash_hint(exitcode: int | None) -> str:
    """What to do when llama.cpp's process died: an illegal instruction is the build (rebuild it)."""
    if exitcode == -signal.SIGILL:
        return rebuild_hint()
    return f"if it recurs on other files, {rebuild_hint()}"


# ---- what runs in the child (module-level functions: spawn pickles them by name) ---------------------


def _open(path: str, n_ctx: int, n_threads: int) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` that keeps the logits of every position (for log-probs)."""
    return _llama_cpp().Llama(
        model_path=path, n_ctx=n_ctx, n_threads=n_threads, logits_all=True, verbose=False
    )


def _logprobs(llm: Any, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    m = logits.max()
    return logits - (m + np.log(np.exp(logits - m).sum()))


def _greedy(llm: Any, tokens: list[int], max_tokens: int) -> str:
    llm.reset()
    out = llm.create_completion(
        prompt=tokens, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0
    )
    return str(out["choices"][0]["text"])


def _tokenize(llm: Any, text: str) -> list[int]:
    return list(llm.tokenize(text.encode(), add_bos=True, special=True))


def _system_info(_llm: Any) -> str:
    return str(_llama_cpp().llama_print_system_info().decode()).strip()


def _set_cvec(llm: Any, path: str, scale: float) -> None:
    """A control-vector file applied with the buffer layout of llama.cpp's own loader."""
    from refusalkit.export.control_vector import cvec_buffer, read_control_vector

    llama_cpp = _llama_cpp()
    n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
    n_layers = int(llama_cpp.llama_model_n_layer(llm.model))
    buf = cvec_buffer(read_control_vector(path), n_embd, n_layers, scale)
    ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, buf.size, n_embd, 1, n_layers - 1) != 0:
        raise RefusalkitError(f"llama.cpp rejected the control vector {path}")


def _clear_cvec(llm: Any) -> None:
    llama_cpp = _llama_cpp()
    llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, int(llama_cpp.llama_model_n_embd(llm.model)), 0, 0)


# ---- the caller's side -----------------------------------------------------------------------------


class LlamaCpp:
    """A GGUF file loaded in llama.cpp in a child process. Close it (or use ``with``) when done."""

    def __init__(self, path: str | Path, *, n_ctx: int = 1024, n_threads: int | None = None) -> None:
        if importlib.util.find_spec("llama_cpp") is None:  # say so here, not from the child
            raise RefusalkitError(INSTALL_HINT)
        self.path = Path(path)
        threads = n_threads or os.cpu_count() or 1
        self._child = Child(_open, str(path), n_ctx, threads, what="llama.cpp", hint=crash_hint)

    def first_token_logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """log p(next token | prompt) [n_vocab] float64, after evaluating the prompt ``tokens``."""
        doing = f"evaluating a {len(tokens)}-token prompt of {self.path.name}"
        return np.asarray(self._child.call(_logprobs, list(tokens), doing=doing))

    def greedy_completion(self, tokens: Sequence[int], max_tokens: int) -> str:
        """The greedy continuation of the prompt ``tokens`` (stops at end of generation)."""
        doing = f"generating from {self.path.name}"
        return str(self._child.call(_greedy, list(tokens), max_tokens, doing=doing))

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokens of ``text`` (special tokens parsed, BOS added where the model wants it)."""
        return list(self._child.call(_tokenize, text))

    def system_info(self) -> str:
        """llama.cpp's build line: the CPU features it was compiled with (AMX_INT8 = 1, ...)."""
        return str(self._child.call(_system_info))

    @contextmanager
    def control_vector(self, path: str | Path, scale: float = 1.0) -> Iterator[LlamaCpp]:
        """Apply a control-vector file for the block (``--control-vector-scaled path scale``); cleared
        again on exit."""
        self._child.call(_set_cvec, str(path), scale, doing=f"applying the control vector {path}")
        try:
            yield self
        finally:
            self._child.call(_clear_cvec)

    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(llm, *args)`` on the ``llama_cpp.Llama`` in the child (``fn`` importable by name)."""
        return self._child.call(fn, *args)

    def close(self) -> None:
        self._child.close()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_gguf(path: str | Path, *, n_ctx: int = 1024, n_threads: int | None = None) -> LlamaCpp:
    """``path`` loaded in llama.cpp in a child process (see ``LlamaCpp``)."""
    return LlamaCpp(path, n_ctx=n_ctx, n_threads=n_threads)


# ---- does llama.cpp work on this machine? ---------------------------------------------------------------

# About 30 tokens: a batch this size is what made the native AMX build crash (a 1-token prompt worked).
CHECK_PROMPT = (
    "Explain in two short sentences why the sky looks blue on a clear summer day, and why the sunsets "
    "we see in the evening often look red or orange instead."
)


@dataclass(frozen=True)
class LlamaCheck:
    state: str  # "works", "crashed", "failed" or "skipped"
    detail: str

    def line(self) -> str:
        return f"llama.cpp: {self.state} ({self.detail})"


def check_llamacpp(gguf: str | Path | None = None) -> LlamaCheck:
    """Load a GGUF (default: the smallest installed built-in one) in llama.cpp in a child process and
    ask for the logits of a ~30-token prompt: whether llama.cpp works on this machine, and why not."""
    if importlib.util.find_spec("llama_cpp") is None:
        return LlamaCheck("skipped", "llama-cpp-python is not installed; `make llamacpp` installs it")
    if gguf is None:
        from refusalkit.models.registry import smallest_installed_gguf

        gguf = smallest_installed_gguf()
        if gguf is None:
            return LlamaCheck("skipped", "no built-in model is installed to load; `make models`")
    t0 = time.perf_counter()
    try:
        with LlamaCpp(gguf, n_ctx=256) as llm:
            amx = "AMX" in llm.system_info()
            tokens = llm.tokenize(CHECK_PROMPT)
            logprobs = llm.first_token_logprobs(tokens)
    except ChildCrashed as exc:
        return LlamaCheck("crashed", str(exc))
    except Exception as exc:  # llama-cpp-python's own errors (a file it cannot load) come back as they are
        return LlamaCheck("failed", f"{type(exc).__name__}: {exc}")
    if not np.isfinite(logprobs).all():
        return LlamaCheck("failed", f"non-finite log-probabilities from {Path(gguf).name}")
    seconds = time.perf_counter() - t0
    detail = f"{Path(gguf).name}: logits of a {len(tokens)}-token prompt in a child process, {seconds:.1f} s"
    if amx:  # it worked here, but such a build died with SIGILL on other Xeons with AMX (issue 22)
        detail += f"; this build has AMX kernels: if llama.cpp crashes on a machine, {rebuild_hint()}"
    return LlamaCheck("works", detail)
