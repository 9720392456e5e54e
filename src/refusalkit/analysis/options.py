"""The options of `refusalkit suffix search` and `suffix analyze`, as options classes (refusalkit.options
turns them into flags, TOML keys and REFUSALKIT_* variables).

The search's GCG knobs are GCGConfig's own fields: their types and defaults come from the dataclass, so
they are written once; this module adds only their help texts.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from refusalkit.analysis.gcg_config import GCGConfig


class SuffixOptions(BaseModel):
    """Where the model, direction and prompts come from"""

    model_config = ConfigDict(extra="forbid")
    env_prefix: ClassVar[str] = "REFUSALKIT_SUFFIX_"  # REFUSALKIT_SEED / _BATCH_SIZE mean the run's

    model: str | None = Field(
        None, description="Model to load instead of the run's (name, folder, .gguf or hub id)."
    )
    direction: str | None = Field(
        None, description="A saved direction stem (DIR/direction); default: the run's."
    )
    out: str | None = Field(None, description="Output folder; default RUN_DIR/suffix.")
    harmful: str = Field("builtin:harmful", description="Harmful data spec, without a run folder.")
    harmless: str = Field("builtin:harmless", description="Harmless data spec, without a run folder.")
    seed: int = Field(0, description="Seed of the search and of the random suffixes.")
    filter: bool = Field(
        True,
        description="Use only the harmful prompts the model refuses at baseline (--no-filter: all, in split order).",
    )


# Help texts of GCGConfig's fields; their types and defaults come from GCGConfig itself.
GCG_HELP: dict[str, str] = {
    "n_steps": "GCG steps.",
    "search_width": "Candidates per step.",
    "topk": "Tokens considered per suffix position.",
    "batch_size": "Candidate sequences per forward pass.",
    "n_replace": "Positions swapped per candidate.",
    "n_tokens": "Suffix length in tokens (with the default init).",
    "init": "Initial suffix text (default ' ! ! ... !'); keep its leading space.",
    "target": "Target completion.",
    "objective": "Target completion loss, the direction's projection, or both.",
    "direction_weight": "Weight of the direction term for 'both'.",
    "direction_layers": "Projection at the direction's layer only, or averaged over it and every later layer.",
    "loss_threshold": "Stop once the best loss is below this.",
    "stop_on_match": "Stop once the target is the greedy continuation on every prompt.",
    "check_every": "Steps between match checks.",
    "ascii_only": "Only ASCII suffix tokens (--no-ascii-only allows any).",
    "prefix_cache": "Reuse the KV cache of the fixed prompt part (--no-prefix-cache for models whose cache misbehaves).",
}
GCG_FLAGS = {"n_steps": ["--steps"]}  # the spelling the command had first


def _gcg_fields() -> dict[str, Any]:
    """GCGConfig's fields (but the seed, which SuffixOptions holds) as pydantic field definitions."""
    hints = typing.get_type_hints(GCGConfig)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(GCGConfig):
        if f.name in ("seed", "max_seconds"):  # SuffixOptions' seed; --max-minutes
            continue
        extra: dict[str, Any] = {"flags": GCG_FLAGS[f.name]} if f.name in GCG_FLAGS else {}
        help_text = GCG_HELP.get(f.name, f"GCGConfig.{f.name}")
        default: Any = f.default  # every GCGConfig field has a plain default
        out[f.name] = (hints[f.name], Field(default, description=help_text, json_schema_extra=extra))
    return out


SearchOptions = create_model(
    "SearchOptions",
    __base__=SuffixOptions,
    __doc__="The GCG search",
    n_prompts=(int, Field(1, ge=1, description="Harmful prompts optimized together (mean loss).")),
    max_minutes=(
        float | None,
        Field(None, gt=0, description="Stop the search after this many minutes (CPU budgets)."),
    ),
    **_gcg_fields(),
)


class AnalyzeOptions(SuffixOptions):
    """The suffix analysis"""

    suffix_file: str | None = Field(
        None,
        description="Suffixes to analyse: a search.json, a JSON list, or text with one suffix per line "
        "(verbatim, leading space kept). Default: OUT/search.json's best suffix.",
    )
    n_random: int = Field(3, ge=0, description="Random control suffixes of the same token length.")
    n_prompts: int = Field(16, ge=1, description="Harmful prompts (search prompts first).")
    n_harmless: int | None = Field(None, ge=1, description="Harmless prompts; default --n-prompts.")
    top_heads: int = Field(8, ge=1, description="Heads kept by harmful attribution.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass / generation batch.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens per completion for the refusal rate.")
    generate: bool = Field(True, description="Generate completions (--no-generate: metric only).")
    plots: bool = Field(True, description="Write PNG plots (--no-plots: none).")
    save_completions: bool = Field(False, description="Also write OUT/completions.json.")
