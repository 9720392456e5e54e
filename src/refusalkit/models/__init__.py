"""Model loading, the built-in model registry and architecture adapters."""

from refusalkit.models.adapters import ARCHITECTURES, Arch, ArchSpec, resolve_arch
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.models.registry import BUILTIN_MODELS, DEFAULT_MODEL, ensure_converted

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
