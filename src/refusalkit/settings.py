"""The run's settings: one typed class, the single source of CLI flags, TOML keys and environment variables.

``Settings`` is assembled from one options class per stage, so each stage command shows only the
options of the stages it may run (``refusalkit select --help`` lists no GSM8K options). The flag, TOML
and environment machinery is generic (``refusalkit.options``); this module adds the presets.

Precedence, lowest first: field defaults < preset < the run's saved settings (when a stage is rerun on
an existing run folder) < TOML file (--config) < REFUSALKIT_* environment variables < command-line
flags. Each field's description is its --help text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refusalkit import options
from refusalkit.models.registry import DEFAULT_MODEL

ENV_PREFIX = options.ENV_PREFIX
# The measure stage's measurements (implemented in evaluation/suite.py). GSM8K (greedy generation of
# long answers, ~30 s per problem and model on a 2-core CPU for the 1.5B default) and lm_eval are opt-in
# for `refusalkit run`, so the default run stays under 20 minutes there; the paper preset includes GSM8K.
MEASUREMENTS = (
    "refusal_judges",
    "safety",
    "llm_judge",
    "coherence",
    "corpus_ce",
    "projections",
    "gsm8k",
    "truthfulqa",
    "lm_eval",
    "over_refusal",
)
# over_refusal (greedy completions of 2 x over_refusal_n prompts, unedited and edited: ~3-4 minutes on the
# default model on a 2-core CPU at n 32) is opt-in too (docs/calibrate.md).
# llm_judge (the run's own model reads every saved completion once more, one forward pass each) is
# opt-in, also for the paper preset.
DEFAULT_MEASUREMENTS = tuple(
    m for m in MEASUREMENTS if m not in ("gsm8k", "lm_eval", "over_refusal", "llm_judge")
)
# Formats of the export stage (stages/export.py holds one writer per format).
EXPORT_FORMATS = ("safetensors",)


def default_data_dir() -> str:
    """$REFUSALKIT_DATA, else ../shared/data if it exists beside the working directory."""
    return str(Path(os.environ.get("REFUSALKIT_DATA", str(Path("..") / "shared" / "data"))).resolve())


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunOptions(_Options):
    """The model, how it runs, and what every stage shares."""

    model: str = Field(DEFAULT_MODEL, description="Built-in model name, model folder, .gguf file or hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype. auto: bfloat16 on a GPU that supports it and on a CPU where a one-second "
        "probe (cached per machine) measures bfloat16 matrix products faster than float32, else float32. "
        "The run records the resolved dtype; a run in one dtype never resumes another's artifacts.",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N. Ignored with --device-map.")
    device_map: str | None = Field(None, description="accelerate device map, e.g. 'auto' to shard over GPUs.")
    trust_remote_code: bool = Field(
        False, description="Allow the model's own Python code (only if you trust it)."
    )
    chat_template: str | None = Field(None, description="Jinja chat template file, for models without one.")
    system_prompt: str | None = Field(
        None, description="System prompt for every prompt; default: the template's."
    )
    arch_override: str | None = Field(
        None,
        description="Architecture module paths, e.g. 'attn_write=self_attn.out_proj,final_norm=model.ln_f'.",
    )
    preset: str | None = Field(None, description="Named settings bundle: 'paper' or 'quick'.")
    seed: int = Field(42, description="Seed for sampling and splits.")
    batch_size: int = Field(
        32,
        ge=1,
        description="Prompts per forward pass (on a CPU, passes of a few hundred tokens run the matrix "
        "products well below their speed: 118 GFLOP/s for 80 tokens, 175 for 650 on a 2-core CPU).",
    )
    data_dir: str = Field(
        default_factory=default_data_dir, description="Folder of the shared data sets (presets)."
    )

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset; known: {', '.join(PRESETS)}")
        return v

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``load_model`` (besides the model spec) that these settings hold."""
        return {
            "dtype": self.dtype,
            "device": self.device,
            "device_map": self.device_map,
            "trust_remote_code": self.trust_remote_code,
            "chat_template": self.chat_template,
            "arch_override": self.arch_override,
        }


class DataOptions(_Options):
    """Instruction sets, split sizes and the refusal filter (the extract stage)."""

    harmful_train: str = Field(
        "builtin:harmful", description="Harmful instructions for extraction (data spec)."
    )
    harmless_train: str = Field("builtin:harmless", description="Harmless instructions for extraction.")
    harmful_val: str | None = Field(
        None, description="Harmful validation set; default: carved from harmful-train."
    )
    harmless_val: str | None = Field(
        None, description="Harmless validation set; default: carved from harmless-train."
    )
    harmful_test: str | None = Field(
        None, description="Harmful evaluation set; default: carved from harmful-train."
    )
    harmless_test: str | None = Field(
        None, description="Harmless evaluation set; default: carved from harmless-train."
    )
    n_train: int = Field(64, ge=1, description="Training prompts per class (paper: 128).")
    n_val: int = Field(16, ge=1, description="Validation prompts per class for selection (paper: 32).")
    n_test: int = Field(32, ge=1, description="Evaluation prompts per class (paper: JailbreakBench's 100).")
    filter_train: bool = Field(
        True, description="Keep harmful (harmless) train prompts the model refuses (obeys)."
    )
    filter_val: bool = Field(True, description="Apply the same filter to the validation prompts.")
    refusal_tokens: list[str] = Field(
        ["I", "As"], description="First tokens of refusals for the refusal metric."
    )


class SelectOptions(_Options):
    """The paper's selection rules (the select stage)."""

    max_layer_frac: float = Field(
        0.8, gt=0, le=1, description="Discard candidates at layers >= this * n_layers."
    )
    kl_threshold: float = Field(
        0.1, ge=0, description="Discard candidates whose ablation KL on harmless exceeds this."
    )
    kl_definition: Literal["exact", "paper"] = Field(
        "exact",
        description="KL of the threshold: 'exact' KL(p||q), or 'paper': sum p (log(p+1e-6) - log(q+1e-6)), "
        "the paper code's score.",
    )
    induce_threshold: float = Field(0.0, description="Discard candidates whose induce score is below this.")
    score_late_layers: bool = Field(False, description="Also score the candidates the layer rule discards.")
    exhaustive_selection: bool = Field(
        False,
        description="Score induce and KL for every candidate (for complete heat maps). Off: only until the "
        "pick is certain, which selects the same direction about 2-3x faster.",
    )


class EvaluateOptions(_Options):
    """Completions under each setting (the evaluate stage)."""

    gen_batch_size: int = Field(
        256,
        ge=1,
        description="Rows per generation batch (settings share batches: the default run's 160 rows decode "
        "in one; on a CPU a row of a decoding step costs a little less the more rows share it).",
    )
    max_new_tokens: int = Field(
        64,
        ge=1,
        description="New tokens per completion in evaluation. The refusal judges read these; under ~100 they "
        "undercount refusals that start late (the paper's code used 512).",
    )


class MeasureOptions(_Options):
    """Judges, coherence and capability (the measure stage; docs/evaluation.md)."""

    measurements: list[str] = Field(
        list(DEFAULT_MEASUREMENTS),
        description=f"Measurements of the measure stage; known: {', '.join(MEASUREMENTS)}.",
    )
    judge_model: str | None = Field(
        None,
        description="Safety judge model (folder or hub id, e.g. meta-llama/Meta-Llama-Guard-2-8B); none: not measured.",
    )
    corpus: str | None = Field(
        None, description="Text file for corpus CE; default: DATA_DIR/corpus/wikitext2_tokenized_test.txt."
    )
    corpus_windows: int = Field(6, ge=1, description="Token windows of the corpus scored for CE.")
    corpus_window_tokens: int = Field(128, ge=2, description="Tokens per corpus window.")
    coherence_n: int = Field(
        12,
        ge=1,
        description="Harmless test prompts for completion CE (and prompts per set for projections).",
    )
    kl_n: int = Field(
        100,
        ge=1,
        description="Harmless prompts for first-token KL: the harmless test split, topped up from "
        "DATA_DIR/refusal_direction/splits/harmless_test.json (disjoint from train and validation).",
    )
    gsm8k_n: int = Field(
        8, ge=1, description="GSM8K test problems (the first N of DATA_DIR/gsm8k/test.jsonl)."
    )
    gsm8k_max_new_tokens: int = Field(
        160, ge=1, description="New tokens per GSM8K answer (greedy, zero-shot chat)."
    )
    truthfulqa_n: int = Field(
        12, ge=1, description="TruthfulQA questions (the first N of DATA_DIR/truthfulqa/TruthfulQA.csv)."
    )
    lm_eval_tasks: list[str] = Field(
        [], description="lm-evaluation-harness tasks for the lm_eval measurement."
    )
    lm_eval_limit: int | None = Field(
        None, ge=1, description="Examples per lm-evaluation-harness task (all if unset)."
    )
    over_refusal_n: int = Field(
        32,
        ge=1,
        description="Prompts per over-refusal set (the first N of DATA_DIR/over_refusal/"
        "or_bench_hard_test.json and oktest_val.json) for the over_refusal measurement.",
    )

    @field_validator("measurements")
    @classmethod
    def _known_measurements(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in MEASUREMENTS]
        if unknown:
            raise ValueError(f"unknown measurement(s) {', '.join(unknown)}; known: {', '.join(MEASUREMENTS)}")
        return v


class ExportOptions(_Options):
    """The edited model as a checkpoint (the export stage)."""

    export_checkpoint: bool = Field(
        True, description="Save the orthogonalized model as a checkpoint in the run."
    )
    export_format: str = Field(
        "safetensors",
        description=f"Checkpoint format; known: {', '.join(EXPORT_FORMATS)}.",
        json_schema_extra={"flags": ["--format"]},
    )

    @field_validator("export_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in EXPORT_FORMATS:
            raise ValueError(f"unknown format; known: {', '.join(EXPORT_FORMATS)}")
        return v


# Bases in reverse: pydantic collects fields from the last base first, so they keep the stages' order.
class Settings(ExportOptions, MeasureOptions, EvaluateOptions, SelectOptions, DataOptions, RunOptions):
    """Every setting of a run (the union of the stage option classes)."""


# The option classes of each stage command: its own and those of the stages it may have to run first.
STAGE_OPTIONS: dict[str, tuple[type[BaseModel], ...]] = {
    "extract": (RunOptions, DataOptions),
    "select": (RunOptions, DataOptions, SelectOptions),
    "evaluate": (RunOptions, DataOptions, SelectOptions, EvaluateOptions),
    "measure": (RunOptions, DataOptions, SelectOptions, EvaluateOptions, MeasureOptions),
    "export": (RunOptions, DataOptions, SelectOptions, ExportOptions),
    "run": (RunOptions, DataOptions, SelectOptions, EvaluateOptions, MeasureOptions, ExportOptions),
}


def _paper(data_dir: str) -> dict[str, Any]:
    splits = Path(data_dir) / "refusal_direction" / "splits"
    processed = Path(data_dir) / "refusal_direction" / "processed"
    return {
        "harmful_train": str(splits / "harmful_train.json"),
        "harmless_train": str(splits / "harmless_train.json"),
        "harmful_val": str(splits / "harmful_val.json"),
        "harmless_val": str(splits / "harmless_val.json"),
        "harmful_test": str(processed / "jailbreakbench.json"),
        "harmless_test": str(splits / "harmless_test.json"),
        "n_train": 128,
        "n_val": 32,
        "n_test": 100,
        "max_new_tokens": 256,
        "exhaustive_selection": True,
        "measurements": [m for m in MEASUREMENTS if m not in ("lm_eval", "over_refusal", "llm_judge")],
        "gsm8k_n": 100,
        "truthfulqa_n": 200,
        "coherence_n": 32,
        "kl_definition": "paper",
        "corpus_windows": 32,
        "dtype": "float32",  # the paper's numbers are float32's; bfloat16 is a speed choice
    }


PRESETS: dict[str, Any] = {
    # The paper's sizes and data: 128/128 train, 32/32 val, JailbreakBench's 100 for evaluation.
    "paper": _paper,
    # A smoke run: small sets, short completions.
    "quick": lambda _data_dir: {
        "n_train": 16,
        "n_val": 4,
        "n_test": 8,
        "max_new_tokens": 24,
        "coherence_n": 4,
        "kl_n": 16,
        "corpus_windows": 2,
        "gsm8k_n": 2,
        "gsm8k_max_new_tokens": 64,
        "truthfulqa_n": 4,
    },
}


def env_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    return options.env_values(Settings, environ)


def toml_values(path: str | Path) -> dict[str, Any]:
    return options.toml_values(path, "refusalkit")


def explicit_values(
    flags: Mapping[str, Any] | None = None,
    config: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The values the sources set explicitly (no defaults, no preset), merged by precedence."""
    return options.layered(Settings, flags=flags, config=config, environ=environ, base=base)


def build_settings(
    flags: Mapping[str, Any] | None = None,
    config: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the sources (see the module docstring) and validate, reporting every error at once.

    ``base`` (e.g. the settings saved in a run's manifest, when a stage is rerun) sits above the preset
    and below the TOML file, the environment and the flags.
    """
    given = explicit_values(flags, config, environ, base)
    preset = given.get("preset")
    preset_values = PRESETS[preset](given.get("data_dir") or default_data_dir()) if preset in PRESETS else {}
    return options.validate(Settings, {**preset_values, **given})
