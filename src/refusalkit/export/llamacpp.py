"""Running an exported GGUF in llama.cpp itself (through llama-cpp-python, the `llamacpp` extra).

Used to check an export in the runtime people use: greedy completions, first-token log-probabilities
and control vectors. Prompts go in as token ids from the transformers tokenizer's chat template, so
llama.cpp and transformers see exactly the same tokens.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from refusalkit.errors import RefusalkitError
from refusalkit.export.control_vector import cvec_buffer, read_control_vector


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise RefusalkitError(
            "running GGUF files needs llama-cpp-python: `pip install 'refusalkit[llamacpp]'` (it compiles "
            "llama.cpp; needs cmake and a C++ compiler, a few minutes once)"
        ) from None
    return llama_cpp


def load_gguf(path: str | Path, *, n_ctx: int = 1024, n_threads: int | None = None) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` that keeps the logits of every position (for log-probs)."""
    llama_cpp = _llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=n_threads or os.cpu_count() or 1,
        logits_all=True,
        verbose=False,
    )


def first_token_logprobs(llm: Any, tokens: Sequence[int]) -> np.ndarray:
    """log p(next token | prompt) [n_vocab] float64, after evaluating the prompt ``tokens``."""
    llm.reset()
    llm.eval(list(tokens))
    logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    m = logits.max()
    return logits - (m + np.log(np.exp(logits - m).sum()))


def greedy_completion(llm: Any, tokens: Sequence[int], max_tokens: int) -> str:
    """The greedy continuation of the prompt ``tokens`` (stops at end of generation)."""
    llm.reset()
    out = llm.create_completion(
        prompt=list(tokens), max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0
    )
    return str(out["choices"][0]["text"])


@contextmanager
def control_vector(llm: Any, path: str | Path, scale: float = 1.0) -> Iterator[Any]:
    """Apply a control-vector file to ``llm`` for the block (``--control-vector-scaled path scale``),
    with the buffer layout of llama.cpp's own loader; cleared again on exit."""
    llama_cpp = _llama_cpp()
    n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
    n_layers = int(llama_cpp.llama_model_n_layer(llm.model))
    buf = cvec_buffer(read_control_vector(path), n_embd, n_layers, scale)
    ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if llama_cpp.llama_set_adapter_cvec(llm.ctx, ptr, buf.size, n_embd, 1, n_layers - 1) != 0:
        raise RefusalkitError(f"llama.cpp rejected the control vector {path}")
    try:
        yield llm
    finally:
        llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, 0, 0)
