"""llama.cpp's speed with the installed llama-cpp-python build: prompt and generation tokens per second.

Issue 22 asks what the portable build (`make llamacpp`: this CPU's features, no AMX, no -march=native)
costs against the native one. Run this once per build on the same machine, in one sitting, and compare:

    # the native build (what plain pip builds; on a CPU with AMX it may die: the run says so and goes on)
    .venv/bin/pip install --no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python \
        llama-cpp-python==0.3.36
    .venv/bin/python bench/llamacpp_speed.py --label native
    # the portable build (the marker no longer matches, so make rebuilds)
    make llamacpp
    .venv/bin/python bench/llamacpp_speed.py --label portable

llama.cpp runs in a child process (refusalkit.export.llamacpp), so a build that crashes is reported as
such. Prints one line per measurement and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from refusalkit.child import ChildCrashed
from refusalkit.export.llamacpp import LlamaCpp
from refusalkit.export.llamacpp_build import installed_state
from refusalkit.models.registry import DEFAULT_MODEL, builtin_gguf

TEXT = (
    "Write a short guide for a new gardener: which vegetables grow well in a small sunny balcony, how "
    "often to water them in summer, which soil to buy, and how to keep snails away without chemicals. "
)


def _timed_prompt(llm: Any, tokens: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - t0


def _timed_generation(llm: Any, tokens: list[int], n: int) -> tuple[float, int]:
    llm.reset()
    llm.eval(tokens)
    t0 = time.perf_counter()
    made = 0
    for _ in range(n):
        token = int(llm.sample(top_k=1, temp=0.0))
        llm.eval([token])
        made += 1
    return time.perf_counter() - t0, made


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label", default="installed", help="Name of this build in the output.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Built-in model whose GGUF is timed.")
    parser.add_argument("--gguf", type=Path, help="A GGUF file instead of a built-in model.")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    gguf = args.gguf or builtin_gguf(args.model)
    print(f"[{args.label}] llama-cpp-python {installed_state()}; {gguf.name}")
    try:
        with LlamaCpp(gguf, n_ctx=args.prompt_tokens + args.new_tokens + 8, n_threads=args.threads) as llm:
            print(f"[{args.label}] {llm.system_info()}")
            ids = llm.tokenize(TEXT * 40)[: args.prompt_tokens]
            prompt_s = [llm.call(_timed_prompt, ids) for _ in range(args.repeats)]
            gen = [llm.call(_timed_generation, ids[:32], args.new_tokens) for _ in range(args.repeats)]
    except ChildCrashed as exc:
        print(f"[{args.label}] {exc}")
        return
    p = statistics.median(prompt_s)
    g_s, g_n = statistics.median(s for s, _ in gen), gen[0][1]
    print(
        f"[{args.label}] prompt: {len(ids)} tokens in {p:.2f} s = {len(ids) / p:.1f} tok/s; "
        f"generation: {g_n} tokens in {g_s:.2f} s = {g_n / g_s:.1f} tok/s (median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
