"""The options of `refusalkit export` (and its old name `orthogonalize`), torch-free: the command table
builds their flags, so `refusalkit export --help` and its argument errors import no model code."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field

from refusalkit.run import EditOption


class ExportOptions(EditOption):
    """Options of `refusalkit export`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["safetensors", "gguf"] = Field(
        default="safetensors",
        description="safetensors: a transformers folder; gguf: one GGUF file for llama.cpp, Ollama, LM Studio.",
    )
    out_dir: Path | None = Field(
        default=None, description="Export folder; default RUN_DIR/model (safetensors) or RUN_DIR/gguf (gguf)."
    )
    gguf_type: Literal["q8_0", "f16", "f32"] = Field(
        default="q8_0",
        description="Encoding of the edited GGUF tensors (the other tensors keep the source's encoding).",
    )
    control_vector: bool = Field(
        default=False,
        description="Also write the direction as a llama.cpp control vector (--control-vector-scaled FILE -1 "
        "subtracts the direction at run time, +1 adds it).",
    )
    llama_cpp: Path | None = Field(
        default=None,
        description="A llama.cpp checkout; GGUF export of a model that was not loaded from a GGUF file runs "
        "its convert_hf_to_gguf.py on the edited transformers folder.",
    )
    force: bool = Field(default=False, description="Overwrite export files that already exist.")
    push_to_hub: str | None = Field(
        default=None,
        description="Upload the export folder and its card to this Hugging Face Hub repo (online).",
    )
