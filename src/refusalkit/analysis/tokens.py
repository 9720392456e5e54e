"""Where a suffix sits in a chat prompt, which tokens a suffix may use, and random control suffixes.

A suffix is appended to the instruction verbatim, inside the user turn and before the template's
post-instruction tokens::

    prompt = template_pre + instruction + suffix + template_post

A suffix carries its own leading space (the default GCG init is `` ! ! ! ...``), so instruction and
suffix meet at a word boundary and the suffix tokenizes the same alone and in context. The template
parts come from rendering the tokenizer's chat template around a marker, never from hand-written
template strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from refusalkit.errors import RefusalkitError
from refusalkit.prompts import format_prompt

_MARK = "Zq7xSUFFIXxq7Z"

# Token roles, for attention shares: the template before the instruction (system prompt, BOS, role
# markers), the instruction, the suffix, and the template after it (end of turn, assistant header).
ROLES: tuple[str, ...] = ("template_pre", "instruction", "suffix", "template_post")


@dataclass(frozen=True)
class SuffixedPrompt:
    """A formatted prompt and the character spans [start, end) of its instruction and suffix."""

    text: str
    instruction_span: tuple[int, int]
    suffix_span: tuple[int, int]


@dataclass(frozen=True)
class PromptTemplate:
    """The chat template split around the user's message: ``pre`` + message + ``post``."""

    pre: str
    post: str

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, system: str | None = None) -> PromptTemplate:
        text = format_prompt(tokenizer, _MARK, system)
        i = text.find(_MARK)
        if i < 0:
            raise RefusalkitError(
                "the chat template does not include the user's message verbatim; cannot place a suffix"
            )
        return cls(text[:i], text[i + len(_MARK) :])

    def render(self, instruction: str, suffix: str = "") -> SuffixedPrompt:
        a = len(self.pre)
        b = a + len(instruction)
        c = b + len(suffix)
        return SuffixedPrompt(self.pre + instruction + suffix + self.post, (a, b), (b, c))


def token_roles(tokenizer: Any, prompt: SuffixedPrompt) -> list[int]:
    """The role (an index into ROLES) of each token of ``prompt.text``, by the token's first character."""
    enc = tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)
    a, b = prompt.instruction_span
    c = prompt.suffix_span[1]
    roles = []
    for start, _end in enc["offset_mapping"]:
        roles.append(0 if start < a else 1 if start < b else 2 if start < c else 3)
    return roles


def allowed_token_ids(tokenizer: Any, vocab_size: int, *, ascii_only: bool = True) -> torch.Tensor:
    """[vocab_size] bool: tokens a suffix may use.

    Allowed: ordinary (not special or added) tokens that decode to non-blank text, printable ASCII
    when ``ascii_only``, and that encode back to themselves alone. Embedding rows beyond the
    tokenizer's vocabulary (padding rows) are never allowed.
    """
    n = min(vocab_size, len(tokenizer))
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    reenc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i, (text, ids) in enumerate(zip(texts, reenc, strict=True)):
        if i in excluded or not text.strip() or ids != [i]:
            continue
        if ascii_only and not (text.isascii() and text.isprintable()):
            continue
        mask[i] = True
    if not mask.any():
        raise RefusalkitError(
            "no token is allowed in a suffix with this tokenizer; try allowing non-ASCII tokens"
        )
    return mask


def random_suffixes(
    tokenizer: Any, n: int, n_tokens: int, *, seed: int, allowed: torch.Tensor, max_tries: int = 200
) -> list[str]:
    """``n`` random suffixes of exactly ``n_tokens`` tokens each, seeded; controls for a found suffix.

    Tokens are drawn from ``allowed`` one at a time; a draw is kept only if the suffix so far still
    encodes to one more token (random neighbours can merge). The first token starts with a space when
    the vocabulary has such tokens, so the suffix joins the instruction at a word boundary, as the GCG
    init does.
    """
    if n_tokens < 1:
        raise RefusalkitError(f"a suffix needs at least one token, got {n_tokens}")
    ids = allowed.nonzero().flatten().tolist()
    texts = tokenizer.batch_decode([[i] for i in ids])
    spaced = [i for i, t in zip(ids, texts, strict=True) if t.startswith(" ")] or ids
    gen = torch.Generator().manual_seed(seed)

    def draw(pool: list[int]) -> int:
        return pool[int(torch.randint(len(pool), (1,), generator=gen))]

    out: list[str] = []
    for _ in range(n):
        text = ""
        for k in range(n_tokens):
            for _try in range(max_tries):
                cand = text + tokenizer.decode([draw(spaced if k == 0 else ids)])
                if len(tokenizer.encode(cand, add_special_tokens=False)) == k + 1:
                    text = cand
                    break
            else:
                raise RefusalkitError(
                    f"could not draw a random suffix of {n_tokens} tokens; try a shorter length"
                )
        out.append(text)
    return out


def suffix_token_length(tokenizer: Any, suffix: str) -> int:
    return len(tokenizer.encode(suffix, add_special_tokens=False))
