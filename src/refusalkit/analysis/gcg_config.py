"""The GCG search's knobs (``GCGConfig``), apart from the search itself so that the `refusalkit suffix`
command can build its flags from them without importing torch (`refusalkit suffix --help` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refusalkit.errors import RefusalkitError

Objective = Literal["target", "direction", "both"]
OBJECTIVES: tuple[str, ...] = ("target", "direction", "both")


@dataclass
class GCGConfig:
    """Knobs of the search. Defaults suit a small model on a CPU; the GCG paper used 500 steps,
    width 512, top-k 256 on GPUs."""

    n_steps: int = 100
    search_width: int = 128  # candidates evaluated per step
    topk: int = 64  # tokens considered per suffix position
    batch_size: int = 64  # candidate sequences per forward pass
    n_replace: int = 1  # positions swapped per candidate
    n_tokens: int = 20  # suffix length when ``init`` is None
    init: str | None = None  # initial suffix text; default " ! ! ... !" (n_tokens tokens)
    target: str = "Sure, here is"
    seed: int = 0
    objective: Objective = "target"
    direction_weight: float = 1.0
    direction_layers: Literal["at", "from"] = "from"
    loss_threshold: float | None = None  # stop once the best loss is below this
    stop_on_match: bool = True  # stop once the target is the greedy continuation on every prompt
    check_every: int = 1  # steps between match checks (the check is free: it reuses the step's logits)
    ascii_only: bool = True
    prefix_cache: bool = True
    max_seconds: float | None = None  # wall-clock budget of the search (setup included); None: no limit

    def validate(self) -> None:
        problems = [
            f"{name} must be at least 1, got {getattr(self, name)}"
            for name in (
                "n_steps",
                "search_width",
                "topk",
                "batch_size",
                "n_replace",
                "n_tokens",
                "check_every",
            )
            if getattr(self, name) < 1
        ]
        if self.max_seconds is not None and self.max_seconds <= 0:
            problems.append(f"max_seconds must be positive, got {self.max_seconds}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.direction_layers not in ("at", "from"):
            problems.append(f"direction_layers must be 'at' or 'from', got {self.direction_layers!r}")
        if not self.target.strip():
            problems.append("target must be non-empty text")
        if problems:
            raise RefusalkitError("invalid GCG settings:\n  " + "\n  ".join(problems))
