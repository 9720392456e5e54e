"""Loading a chat model and its tokenizer from a built-in name, a folder, a GGUF file or a hub id."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from refusalkit.errors import RefusalkitError
from refusalkit.models.adapters import Arch, resolve_arch
from refusalkit.models.cast import cast_copy
from refusalkit.models.compute_dtype import DtypeChoice, choose_dtype, dtype_name, mlp_shape, torch_dtype
from refusalkit.models.registry import BUILTIN_MODELS, cache_dir, ensure_converted, gguf_to_folder

log = logging.getLogger(__name__)
SettingsT = TypeVar("SettingsT", bound=BaseModel)


@dataclass
class LoadedModel:
    """A model, its tokenizer and its resolved architecture, plus where it came from."""

    model: Any  # a transformers PreTrainedModel (typed loosely: transformers is untyped)
    tokenizer: Any
    arch: Arch
    name: str
    source: str  # the folder the weights were read from, or the hub id
    fingerprint: str  # identifies the weights, for the manifest
    dtype_choice: DtypeChoice | None = None  # the compute dtype and why (None: built in memory)

    @property
    def device(self) -> torch.device:
        return self.arch.embed.weight.device  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the embedding's, as every weight of a loaded model)."""
        return self.arch.embed.weight.dtype  # type: ignore[return-value]


def resolve_dtype(dtype: str, device: str, config: dict[str, Any] | None = None) -> DtypeChoice:
    """The compute dtype for ``dtype`` (auto or a name) on ``device`` (resolved, e.g. "cpu"), and why.
    ``config``: the model's config.json (its MLP shape is the CPU probe's matrix product)."""
    return choose_dtype(dtype, device, mlp_shape(config))


def model_config(spec: str) -> dict[str, Any] | None:
    """The config.json of a built-in name, model folder or .gguf file (None for a hub id): read without
    loading the model, for choices made before it loads (the compute dtype of ``--dtype auto``)."""
    where, local = locate(spec)
    return _read_config(where) if local else None


def _read_config(folder: str) -> dict[str, Any] | None:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def choose_model_dtype(spec: str, dtype: str = "auto", device: str = "auto") -> DtypeChoice:
    """What ``load_model(spec, dtype=dtype, device=device)`` computes in, and why, without loading it."""
    device = resolve_device(device)
    return resolve_dtype(dtype, device, model_config(spec) if dtype == "auto" and device == "cpu" else None)


def resolved_settings(settings: SettingsT, lm: LoadedModel | None = None) -> tuple[SettingsT, DtypeChoice]:
    """``settings`` (a ``Settings``) with ``dtype`` resolved ("auto" -> float32 or bfloat16), and why.

    A run resolves it before fingerprinting anything: stages fingerprint the dtype they compute in, so a
    float32 run never resumes bfloat16 artifacts, and the saved settings name the dtype that made them.
    With ``lm`` (a model already in memory) its own dtype is the one the stages compute in.
    """
    if lm is not None:
        name = dtype_name(lm.dtype)
        choice = lm.dtype_choice or DtypeChoice(settings.dtype, name, "the dtype of the model given")  # type: ignore[attr-defined]
        if choice.dtype != name:  # the model was cast after loading: its weights are the truth
            choice = DtypeChoice(choice.requested, name, f"the model was cast to {name} after loading")
    else:
        choice = choose_model_dtype(settings.model, settings.dtype, settings.device)  # type: ignore[attr-defined]
    return settings.model_copy(update={"dtype": choice.dtype}), choice


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def locate(spec: str) -> tuple[str, bool]:
    """Map a model spec to (folder or hub id, is_local)."""
    if spec in BUILTIN_MODELS:
        return str(ensure_converted(spec)), True
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_to_folder(path)), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RefusalkitError(
                f"model folder {path} has no config.json; point --model at a transformers model folder"
            )
        return str(path), True
    if path.exists():
        raise RefusalkitError(f"{path} is neither a model folder nor a .gguf file")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path:
        raise RefusalkitError(
            f"model {spec!r} not found: no such file or folder. Give a model folder, a .gguf file, a hub id "
            f"(online), or a built-in name: {', '.join(BUILTIN_MODELS)}"
        )
    return spec, False


def fingerprint(folder: str) -> str:
    """A cheap identity of a weights folder: config + each weight file's name, size, head and tail."""
    path = Path(folder)
    src = path / "refusalkit-source.json"
    if src.is_file():
        return "gguf-sha256:" + json.loads(src.read_text())["gguf_sha256"]
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if f.stat().st_size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return "files-sha256:" + h.hexdigest()


def _contiguous(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_head_input(head: torch.nn.Module) -> None:
    """Make the output head's input contiguous before it runs. transformers hands the head a strided
    view of the last positions (``logits_to_keep``); torch's matmul sends a strided 3-D input down its
    batched path, the [vocab, d_model] weight broadcast per row: about 4x slower than one matrix
    product for the default model's 151936-token head on a CPU (0.76 s vs 0.17 s for 24 rows),
    several seconds per pass in selection. Copying the few kept positions costs nothing in comparison."""
    if not any(h is _contiguous for h in head._forward_pre_hooks.values()):
        head.register_forward_pre_hook(_contiguous)


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    arch_override: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load ``spec`` (built-in name, folder, .gguf file or hub id) for inference.

    ``device_map="auto"`` shards the model over the available GPUs with accelerate; hooks and weight
    edits follow each module's own device. The tokenizer pads on the left (generation needs it); the
    math elsewhere reads positions from the attention mask, so it does not depend on the side.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, local = locate(spec)
    device = resolve_device(device)
    choice = resolve_dtype(dtype, device, _read_config(where) if dtype == "auto" and local else None)
    if dtype == "auto":
        log.info("compute dtype %s (%s)", choice.dtype, choice.reason)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(choice.dtype), "trust_remote_code": trust_remote_code}
    if device_map:
        kwargs["device_map"] = device_map
    weights_fp = fingerprint(where) if local else f"hub:{where}"
    # Float32 weights loaded as bfloat16 come from a copy cast once (models/cast.py): transformers'
    # own cast holds the float32 and the bfloat16 model at once, 1.5x a float32 load's peak.
    weights = where
    if local:
        try:
            cast = cast_copy(where, kwargs["dtype"], cache_dir() / "cast", weights_fp)
        except OSError as exc:  # e.g. a full disk: transformers' cast works, at 1.5x the memory
            log.warning(
                "could not write a %s copy of the weights (%s); casting while loading", choice.dtype, exc
            )
            cast = None
        weights = str(cast) if cast is not None else where
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
    except OSError as exc:
        hint = "check the hub id and your network" if not local else "check the folder's files"
        raise RefusalkitError(f"could not load model {spec!r}: {exc}. {hint}") from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise RefusalkitError(
                f"model {spec!r} needs custom code; rerun with --trust-remote-code if you trust its source"
            ) from None
        raise
    if not device_map:
        # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), so its stub expects
        # ``self`` again as the first argument of the bound call.
        model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    if chat_template:
        template_path = Path(chat_template)
        tokenizer.chat_template = template_path.read_text() if template_path.is_file() else chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise RefusalkitError(
            f"model {spec!r} has no chat template; refusal is a property of chat models. Use an instruct/chat "
            "model, or pass --chat-template FILE with a Jinja chat template"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    arch = resolve_arch(model, arch_override)
    contiguous_head_input(arch.unembed)
    name = spec if spec in BUILTIN_MODELS else Path(spec).name or spec
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        arch=arch,
        name=name,
        source=where,
        fingerprint=weights_fp,
        dtype_choice=choice,
    )
