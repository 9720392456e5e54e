"""Options of `refusalkit optimize` (one flag per field; the run's own settings come from its manifest).

Two kinds of call. A call whose only options are choosing ones (``CHOOSING``: --trial, --max-kl,
--max-refusals, --export; the run-wide --seed, --batch-size and --data-dir, whose REFUSALKIT_*
variables the run's settings share, do not count) on a run that already has a search chooses from
the saved front: no trial,
no verification, no model loaded unless --export needs one. Any other call runs the search to its
budget (resuming the study in the run), verifies, then chooses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

# Options that only choose among the points a search already found (see the module docstring).
CHOOSING = frozenset({"trial", "max_kl", "max_refusals", "export", "harmful_floor"})
# Fields whose REFUSALKIT_* variables the run's own settings share (set for every command), which do not
# make a choosing call a search.
RUN_WIDE = frozenset({"seed", "batch_size", "data_dir"})
SETUP_NAMES = ("none", "default", "helpful")


class OptimizeOptions(BaseModel):
    """Options of `refusalkit optimize` (the run's own settings come from its manifest)."""

    goal: Literal["remove", "calibrate"] = Field(
        default="remove",
        description="remove: the fewest refusals at the least KL (search/); calibrate: the fewest "
        "over-refusals (OR-Bench-Hard val) at the least KL, harmful refusal held at --harmful-floor, "
        "edits of the false-refusal vector (calibrate/search/; docs/calibrate.md).",
    )
    harmful_floor: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="--goal calibrate: a trial's harmful refusal (proxy, harmful validation prompts) must "
        "be at least this fraction of the unedited model's; trials below it are never chosen.",
    )
    over_n: int = Field(
        default=64,
        ge=1,
        description="--goal calibrate: pseudo-harmful validation prompts scored per trial (OR-Bench-Hard "
        "val, first N).",
    )
    trials: int = Field(
        default=40,
        ge=1,
        description="Completed trials the study should hold (a resumed study counts its old ones).",
    )
    minutes: float | None = Field(
        default=5.0, gt=0, description="Wall-time budget for this call's trials; unset: no limit."
    )
    seed: int = Field(default=0, description="Seed of the Optuna sampler.")
    startup_trials: int = Field(default=8, ge=0, description="Random trials before TPE starts modelling.")
    harmful_prompts: str | None = Field(
        default=None,
        description="Harmful prompts for the refusal proxy (data spec); default: the run's harmful_val split.",
    )
    kl_prompts: str | None = Field(
        default=None,
        description="Harmless prompts for the search's KL (data spec); default: DATA_DIR/refusal_direction/"
        "splits/harmless_val.json, else the run's harmless train and val splits.",
    )
    kl_n: int = Field(
        default=100,
        ge=1,
        description="Harmless prompts for the search's KL (first N, shared out among the chat setups; a KL's "
        "heavy tail needs about 100); verification measures KL on --verify-kl-n held-out prompts per setup.",
    )
    batch_size: int = Field(default=32, ge=1, description="Prompts per forward pass.")
    proxy_new_tokens: int = Field(
        default=24,
        ge=0,
        description="Greedy tokens per harmful prompt judged by both marker lists in each trial (catches "
        "replies that turn to a refusal after the first token); 0: the first token's logits only. "
        "--goal calibrate: per pseudo-harmful and harmful prompt, judged by the paper's phrases.",
    )
    proxy_judge: str = Field(
        default="keywords",
        description="Who reads the proxy's generated tokens: keywords (both marker lists); or an LLM judge "
        "as for --judge (local: the run's own unedited model; a model; a server URL), and the refusal "
        "objective becomes the share of replies it does not call compliance (the keyword count is kept "
        "beside; about one judge forward pass per reply and trial).",
    )
    setups: list[str] = Field(
        default=list(SETUP_NAMES),
        description="Chat setups the proxy and the verification run under: none (an empty system turn), "
        "default (the template's own), helpful ('You are a helpful assistant.'); a trial's refusal "
        "objective is its worst setup's.",
    )
    system_prompts: list[str] = Field(
        default=[],
        description="More chat setups, one per system prompt (repeat --system-prompt TEXT for prompts "
        "holding commas).",
    )
    sources: list[str] = Field(
        default=["interpolated", "per_layer"],
        description="Direction sources to search: interpolated, per_layer, candidate.",
    )
    positions: list[int] | None = Field(
        default=None,
        description="Post-instruction positions to search (negative); default: -1 and the paper pick's position.",
    )
    edit_embed: bool = Field(
        default=False, description="Also search the token-embedding edit (slower per trial)."
    )
    verify_n: int = Field(
        default=0,
        ge=0,
        description="Front points to verify on held-out prompts with full generations, besides the "
        "--verify-at ones.",
    )
    verify_at: list[float] = Field(
        default=[0.0185, 0.03],
        description="KL budgets (proxy KL, comma-separated) to compare at: the search aims a trial at each "
        "one no trial has reached (the front point nearest above it, weights scaled down), and the front "
        "point with the lowest expected refusal within each is verified first.",
    )
    verify_harmful: str | None = Field(
        default=None,
        description="Held-out harmful prompts for verification (data spec); default: the run's harmful_test split.",
    )
    verify_benchmarks: list[str] = Field(
        default=["jailbreakbench"],
        description="More harmful prompt sets verified and counted apart from the held-out split: names of "
        "DATA_DIR/refusal_direction/processed/NAME.json (skipped with a warning where absent).",
    )
    verify_per_set: int | None = Field(
        default=16,
        ge=1,
        description="Harmful prompts per verification set and chat setup (first N; unset: all).",
    )
    data_dir: str | None = Field(
        default=None, description="Folder of the shared data sets; default: the run's."
    )
    verify_harmless: str | None = Field(
        default=None,
        description="Held-out harmless prompts for verification KL (data spec); default: DATA_DIR/refusal_direction/"
        "splits/harmless_test.json, else the run's harmless_test split.",
    )
    verify_kl_n: int = Field(
        default=100,
        ge=1,
        description="Held-out harmless prompts for verification KL, per chat setup (first N).",
    )
    verify_max_new_tokens: int = Field(
        default=50, ge=1, description="New tokens per verification completion (greedy)."
    )
    verify_over_refusal: int = Field(
        default=16,
        ge=0,
        description="--goal remove: over-refusal prompts per set (OR-Bench-Hard test, OKTest val; first N) "
        "each verified point and the unedited model also answer, under the run's own system prompt, judged "
        "by the paper's phrases and the broad list; 0: none. A set missing from DATA_DIR/over_refusal is "
        "skipped with a warning.",
    )
    verify_baseline: bool = Field(
        default=False, description="Also verify the unedited model (one more generation pass, no KL)."
    )
    judge: str | None = Field(
        default=None,
        description="An LLM judge for the verified completions, counted beside the keyword lists: refusal, "
        "compliance, partial, degenerate. local: the run's own unedited model; a model (built-in name, "
        "folder, .gguf, hub id); or an OpenAI-compatible server's URL (http://HOST:PORT). Unset: keyword "
        "lists only (a local judge costs about one more forward pass per completion).",
    )
    judge_calibration: str | None = Field(
        default=None,
        description="The judge's fitted prompt and biases (`refusalkit judges --save-calibration FILE`); "
        "unset: the default prompt, no biases.",
    )
    gen_batch_size: int = Field(
        default=128,
        ge=1,
        description="Prompts per verification generation batch (a CPU decodes 100 rows in one step "
        "for about twice the cost of 32).",
    )
    max_kl: float | None = Field(
        default=None,
        gt=0,
        description="Choose the fewest refusals with KL <= this (also limits what is verified). Alone "
        "on a run with a search: choose without searching.",
    )
    max_refusals: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Choose the lowest KL with refusal rate <= this. Alone on a run with a search: "
        "choose without searching.",
    )
    trial: int | None = Field(
        default=None,
        ge=0,
        description="Choose this trial number. Alone on a run with a search: choose without searching.",
    )
    export: bool = Field(
        default=False, description="Export the chosen edit as a checkpoint into RUN_DIR/model."
    )

    @field_validator("positions", mode="before")
    @classmethod
    def _split_positions(cls, v: object) -> object:
        return [int(x) for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("verify_at", mode="before")
    @classmethod
    def _split_budgets(cls, v: object) -> object:
        return [float(x) for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("verify_at")
    @classmethod
    def _positive_budgets(cls, v: list[float]) -> list[float]:
        if any(x <= 0 for x in v):
            raise ValueError(f"KL budgets must be positive, got {v}")
        return v

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, v: list[str]) -> list[str]:
        known = ("interpolated", "per_layer", "candidate")
        bad = [x for x in v if x not in known]
        if bad or not v:
            raise ValueError(f"unknown or no direction source {bad}; known: {', '.join(known)}")
        return v

    @field_validator("setups")
    @classmethod
    def _known_setups(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in SETUP_NAMES]
        if bad:
            raise ValueError(
                f"unknown chat setup {bad}; known: {', '.join(SETUP_NAMES)} (or --system-prompt)"
            )
        return v

    def choosing_only(self) -> bool:
        """True when options were given (flag, TOML key or environment variable) and every one is a
        choosing one: such a call on a run with a search chooses from it without searching (``--export``
        alone exports the point chosen before)."""
        given = self.model_fields_set - RUN_WIDE - {"goal"}  # which search, not what it does
        return bool(given) and given <= CHOOSING


__all__ = ["CHOOSING", "RUN_WIDE", "SETUP_NAMES", "OptimizeOptions"]
