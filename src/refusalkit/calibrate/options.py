"""Options of `refusalkit calibrate` (one flag per field; the run's own settings come from its manifest).
Torch-free: the parser imports this module for ``--help``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field


class CalibrateOptions(BaseModel):
    """Options of `refusalkit calibrate RUN_DIR` (docs/calibrate.md)."""

    # its own variables: REFUSALKIT_N_TRAIN etc. are the run's settings
    env_prefix: ClassVar[str] = "REFUSALKIT_CALIBRATE_"

    lam: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="lambda: how much of the refusal direction is removed from the false-refusal vector "
        "(v - lambda (v.r) r); 1: none of it left (the harmful refusals are kept best), 0: the raw vector.",
        json_schema_extra={"flags": ["--lambda"]},
    )
    n_train: int = Field(
        256,
        ge=2,
        description="Pseudo-harmful training prompts (a seeded sample of OR-Bench-Hard train + OKTest "
        "train); the refused ones (refusal metric > 0) make the false-refusal mean.",
    )
    n_val: int = Field(
        16,
        ge=1,
        description="Pseudo-harmful validation prompts (OR-Bench-Hard val) that choose the vector (each "
        "candidate's ablation runs them once: the scoring's cost grows with it).",
    )
    floor: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Harmful refusal kept: a candidate's harmful validation refusal rate must be at least "
        "this fraction of the unedited model's.",
    )
    kl_max: float = Field(
        0.05,
        gt=0.0,
        description="Largest mean first-token KL on the harmless validation prompts (issue 19's target "
        "on held-out prompts is 0.05).",
    )
    max_layer_frac: float = Field(
        0.8, gt=0.0, le=1.0, description="Candidates only below this fraction of the depth (as selection)."
    )
    max_new_tokens: int = Field(
        64, ge=1, description="New tokens per completion of the judged validation record of the pick."
    )
    judge_val: bool = Field(
        True,
        description="Record the pick's judged refusal rates (greedy completions) on the validation prompts, "
        "unedited and calibrated.",
    )
    exhaustive: bool = Field(
        False, description="Score every candidate fully (default: stop at the first one that is kept)."
    )
    data_dir: str | None = Field(
        None,
        description="Folder holding over_refusal/*.json (default: the run's --data-dir).",
    )
