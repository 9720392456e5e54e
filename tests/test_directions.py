"""Candidates and Direction: lossless save/load, and clear errors for missing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refusalkit.directions import Candidates, Direction
from refusalkit.errors import RefusalkitError


def _candidates() -> Candidates:
    torch.manual_seed(0)
    return Candidates(
        torch.randn(3, 5, 8, dtype=torch.float64),
        torch.randn(3, 5, 8, dtype=torch.float64),
        post_instruction_tokens=["<|im_end|>", "\n", "assistant"],
    )


def test_candidates_round_trip(tmp_path: Path) -> None:
    cands = _candidates()
    path = tmp_path / "sub" / "candidates.safetensors"
    cands.save(path)
    loaded = Candidates.load(path)
    assert torch.equal(loaded.harmful_mean, cands.harmful_mean)
    assert torch.equal(loaded.harmless_mean, cands.harmless_mean)
    assert loaded.harmful_mean.dtype == torch.float64
    assert loaded.post_instruction_tokens == cands.post_instruction_tokens
    assert (loaded.n_positions, loaded.n_layers) == (3, 5)
    assert torch.equal(loaded.directions, cands.harmful_mean - cands.harmless_mean)
    assert [loaded.position_label(p) for p in range(3)] == [-3, -2, -1]
    assert [p.name for p in path.parent.iterdir()] == ["candidates.safetensors"]  # no temp files left


def test_direction_round_trip(tmp_path: Path) -> None:
    vector = torch.randn(8)
    d = Direction(
        vector, layer=3, position=-2, model="tiny", scores={"bypass": -1.5, "kl": 0.01}, meta={"n": [1, 2]}
    )
    tensor_path, json_path = d.save(tmp_path / "direction")
    assert (tensor_path.name, json_path.name) == ("direction.safetensors", "direction.json")
    info = json.loads(json_path.read_text())
    assert info["norm"] == pytest.approx(float(vector.norm())) and info["d_model"] == 8
    for stem in (tmp_path / "direction", json_path, tensor_path):
        loaded = Direction.load(stem)
        assert torch.equal(loaded.vector, vector)
        assert (loaded.layer, loaded.position, loaded.model) == (3, -2, "tiny")
        assert loaded.scores == d.scores and loaded.meta == d.meta
    torch.testing.assert_close(loaded.unit.norm(), torch.tensor(1.0))


def test_direction_load_missing(tmp_path: Path) -> None:
    with pytest.raises(
        RefusalkitError, match=r"direction\.safetensors and direction\.json.*refusalkit select"
    ):
        Direction.load(tmp_path / "direction")
    Direction(torch.ones(4), 0, -1).save(tmp_path / "direction")
    (tmp_path / "direction.safetensors").unlink()
    with pytest.raises(RefusalkitError, match="needs both"):
        Direction.load(tmp_path / "direction.json")
