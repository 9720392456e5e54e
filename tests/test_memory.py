"""Freed heap memory goes back to the OS (memory.release), and the steps that free gigabytes in pieces
call it: a generation batch, a weight edit's saved copies, every stage (issue 20's peak memory)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from refusalkit import memory
from refusalkit.edits import edited, target
from refusalkit.generation import generate
from refusalkit.prompts import format_prompts

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or memory._trim() is None, reason="malloc_trim is glibc's"
)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@glibc
def test_release_returns_freed_heap() -> None:
    # Blocks of 4 KiB always come from malloc's heap (far below its mmap threshold), as the many small
    # and mid-size blocks of a decoding step do; freed, they stay resident until release().
    blocks = [torch.ones(1024) for _ in range(50_000)]  # 200 MiB
    pins = [torch.ones(16) for _ in range(8)]  # small live blocks after them: no trim at the heap's top
    del blocks
    before = rss_mib()
    memory.release()
    assert before - rss_mib() > 100, "malloc_trim gave back less than half of 200 MiB of freed heap"
    del pins


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for mod in ("refusalkit.generation", "refusalkit.edits"):
        monkeypatch.setattr(f"{mod}.release", lambda mod=mod: calls.append(mod) or False)
    return calls


def test_generation_releases_after_each_batch(lm: Any, released: list[str]) -> None:
    prompts = format_prompts(lm.tokenizer, ["Bake a cake.", "Hi", "Why?", "Name a bird."])
    generate(lm, prompts, max_new_tokens=3, batch_size=2)
    assert released.count("refusalkit.generation") == 2  # two batches


def test_edit_releases_before_its_copies_and_after_restoring(lm: Any, released: list[str]) -> None:
    w = lm.arch.mlp_write[0].weight
    u = torch.randn(w.shape[0], dtype=torch.float64)
    orig = w.detach().clone()
    with edited(lm, [target(lm.arch, "mlp", u, layer=0)]):
        assert released == ["refusalkit.edits"]
        assert not torch.equal(w, orig)
    assert released == ["refusalkit.edits"] * 2
    assert torch.equal(w, orig)
