"""Candidate directions (difference in means) and the selected Direction record, with save and load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refusalkit.errors import RefusalkitError
from refusalkit.utils import atomic_path, write_json


@dataclass
class Candidates:
    """Every candidate r_i^(l) = mu_i^(l) - nu_i^(l).

    harmful_mean, harmless_mean, directions: [n_positions, n_layers, d_model] float64. Position p is
    the token -(n_positions - p) counted from the end of the prompt (the post-instruction tokens).
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    post_instruction_tokens: list[str] = field(default_factory=list)

    @property
    def directions(self) -> torch.Tensor:
        return self.harmful_mean - self.harmless_mean

    @property
    def n_positions(self) -> int:
        return int(self.harmful_mean.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.harmful_mean.shape[1])

    def position_label(self, p: int) -> int:
        """The negative index from the end for row ``p`` (-n_positions .. -1)."""
        return p - self.n_positions

    def save(self, path: str | Path) -> None:
        meta = {"post_instruction_tokens": json.dumps(self.post_instruction_tokens)}
        with atomic_path(path) as tmp:
            save_file(
                {
                    "harmful_mean": self.harmful_mean.contiguous(),
                    "harmless_mean": self.harmless_mean.contiguous(),
                },
                str(tmp),
                metadata=meta,
            )

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return cls(
            harmful_mean=tensors["harmful_mean"],
            harmless_mean=tensors["harmless_mean"],
            post_instruction_tokens=json.loads(meta.get("post_instruction_tokens", "[]")),
        )


@dataclass
class Direction:
    """One refusal direction: the raw difference in means at (position, layer), and where it came from.

    vector: [d_model], unnormalized (activation addition uses it as is; ablation normalizes it).
    position: negative index from the end of the prompt; layer: the resid_pre layer it was read at.
    """

    vector: torch.Tensor
    layer: int
    position: int
    model: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write ``stem.safetensors`` (the vector) and ``stem.json`` (everything else), atomically."""
        stem = Path(stem)
        tensor_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        with atomic_path(tensor_path) as tmp:
            save_file({"direction": self.vector.contiguous()}, str(tmp))
        info = asdict(self)
        info.pop("vector")
        info["norm"] = float(self.vector.norm())
        info["d_model"] = int(self.vector.shape[0])
        write_json(json_path, info)
        return tensor_path, json_path

    @classmethod
    def load(cls, stem: str | Path) -> Direction:
        stem = Path(stem)
        if stem.suffix in (".json", ".safetensors"):
            stem = stem.with_suffix("")
        tensor_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        if not tensor_path.is_file() or not json_path.is_file():
            raise RefusalkitError(
                f"direction {stem} needs both {tensor_path.name} and {json_path.name}; run `refusalkit select` first"
            )
        info = json.loads(json_path.read_text())
        vector = load_file(str(tensor_path))["direction"]
        return cls(
            vector=vector,
            layer=int(info["layer"]),
            position=int(info["position"]),
            model=info.get("model", ""),
            scores=info.get("scores", {}),
            meta=info.get("meta", {}),
        )
