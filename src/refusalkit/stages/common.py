"""Small helpers the stages share: formatted prompts, refusal token ids, file-content fingerprints."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from refusalkit.metric import refusal_token_ids
from refusalkit.models.loading import LoadedModel
from refusalkit.prompts import format_prompts
from refusalkit.settings import Settings
from refusalkit.utils import sha256_file, sha256_text

MIN_PROMPTS = 2  # fewer prompts than this per class make a mean (or a score) meaningless


def prompts(lm: LoadedModel, instructions: list[str], settings: Settings) -> list[str]:
    return format_prompts(lm.tokenizer, instructions, settings.system_prompt)


def refusal_ids(lm: LoadedModel, settings: Settings) -> list[int]:
    return refusal_token_ids(lm.tokenizer, settings.refusal_tokens)


def model_fingerprint(spec: str) -> str:
    """The identity of a model's weights without loading them (the same as ``LoadedModel.fingerprint``):
    a cheap content hash of its folder, or the hub id."""
    # loading.py is the one place that maps a spec to its folder.
    from refusalkit.models.loading import fingerprint, locate

    where, local = locate(spec)
    return fingerprint(where) if local else f"hub:{where}"


def content_fingerprint(spec: str | None) -> str | None:
    """What a data spec or file option holds: a file's sha256, a built-in set's sha256, else the spec
    itself (hf: datasets are remote; a template given inline is its own content)."""
    if spec is None:
        return None
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        res = resources.files("refusalkit.data").joinpath(f"builtin/{name}.json")
        return "sha256:" + sha256_text(res.read_text()) if res.is_file() else spec
    path = Path(spec).expanduser()
    if path.is_file():
        return "sha256:" + sha256_file(path)
    return spec
