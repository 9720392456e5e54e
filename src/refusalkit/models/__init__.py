"""Model loading, the built-in model registry and architecture adapters.

The names are resolved on first use (PEP 562): the settings import the registry's DEFAULT_MODEL, and
that must not load torch and transformers before a command runs (`refusalkit --help` stays fast).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refusalkit.utils import lazy_exports

_EXPORTS = {
    "ARCHITECTURES": "refusalkit.models.adapters",
    "Arch": "refusalkit.models.adapters",
    "ArchSpec": "refusalkit.models.adapters",
    "resolve_arch": "refusalkit.models.adapters",
    "LoadedModel": "refusalkit.models.loading",
    "load_model": "refusalkit.models.loading",
    "BUILTIN_MODELS": "refusalkit.models.registry",
    "DEFAULT_MODEL": "refusalkit.models.registry",
    "ensure_converted": "refusalkit.models.registry",
}

__all__ = [
    "ARCHITECTURES",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "Arch",
    "ArchSpec",
    "LoadedModel",
    "ensure_converted",
    "load_model",
    "resolve_arch",
]

if TYPE_CHECKING:
    from refusalkit.models.adapters import ARCHITECTURES, Arch, ArchSpec, resolve_arch
    from refusalkit.models.loading import LoadedModel, load_model
    from refusalkit.models.registry import BUILTIN_MODELS, DEFAULT_MODEL, ensure_converted


__getattr__ = lazy_exports("refusalkit.models", _EXPORTS, globals())
