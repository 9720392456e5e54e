"""Shared fixtures: tiny random models of each supported family, built in-process (no download)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small configs per family; each is a real transformers architecture with random weights.
FAMILIES: dict[str, dict[str, object]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}
ORTHOGONALIZABLE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level fast tokenizer (every byte is a token) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(sorted(byte_tokens))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "pad_token": "<|pad|>"}
    )
    fast.eos_token = "<|im_end|>"
    fast.chat_template = CHATML
    return fast


ATTENTION = ("eager", "sdpa")  # the kernels tests run under; real CPU/GPU loads default to sdpa


def tiny_model(family: str, seed: int = 0, vocab_size: int = 272, attn: str = "eager", **overrides: object):  # type: ignore[no-untyped-def]
    """A tiny random model of ``family`` running the ``attn`` attention kernel ("eager" or "sdpa").

    Eager is the default because attention probabilities exist only there; sdpa is what a real load
    picks, and it treats masks differently (a padded row whose pads sit between a cached prefix and the
    prompt runs only there in real use), so tests of padding and the prefix cache run both.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if attn not in ATTENTION:
        raise ValueError(f"attn must be one of {ATTENTION}")

    torch.manual_seed(seed)
    kwargs: dict[str, object] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        **FAMILIES[family],
        **overrides,
    }
    config = AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config)
    # Random init is tiny; scale weights up so directions and interventions have visible effects.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest) -> object:
    """Tiny models run fastest on one thread (and do not fight other work for the cores); the
    real-model integration tests keep torch's default."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def make_lm() -> Callable[..., object]:
    """Factory: make_lm(family, seed, attn="eager"|"sdpa", **config overrides) -> LoadedModel."""
    from refusalkit.models.adapters import resolve_arch
    from refusalkit.models.loading import LoadedModel

    def make(family: str = "qwen2", seed: int = 0, attn: str = "eager", **overrides: object) -> LoadedModel:
        tok = tiny_tokenizer()
        model = tiny_model(family, seed=seed, vocab_size=len(tok), attn=attn, **overrides)
        tok.padding_side = "left"
        return LoadedModel(
            model, tok, resolve_arch(model), f"tiny-{family}", "memory", f"tiny-{family}-{seed}"
        )

    return make


@pytest.fixture
def lm(make_lm: Callable[..., object]) -> object:
    return make_lm("qwen2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Integration tests load the built-in real models (GBs, minutes): they run when
    REFUSALKIT_INTEGRATION=1, as `make test` and CI set it, and are skipped otherwise."""
    if os.environ.get("REFUSALKIT_INTEGRATION") == "1":
        return
    skip = pytest.mark.skip(reason="real-model test; set REFUSALKIT_INTEGRATION=1 (make test does)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)
