"""The model card of an export (offline): numbers from the run's artifacts, gaps said, Hub push errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.export.card import NOT_MEASURED, CardFile, model_card, write_card
from refusalkit.export.hub import push_to_hub
from refusalkit.layout import RunLayout
from refusalkit.utils import write_json


def _rate(k: int, n: int) -> dict[str, object]:
    return {"refusal_rate": k / n, "refused": k, "n": n, "ci95": [0.1, 0.9], "coeff": 0.0}


def make_run(root: Path, *, measured: bool) -> RunLayout:
    layout = RunLayout(root)
    settings = {"model": "qwen2.5-coder-1.5b-instruct", "n_train": 64, "n_test": 32, "seed": 42}
    write_json(
        layout.manifest,
        {
            "settings": settings,
            "model": {"name": "qwen2.5-coder-1.5b-instruct", "n_layers": 28},
            "stages": {},
        },
    )
    Direction(torch.ones(8), layer=17, position=-1, scores={"bypass": -3.0, "induce": 4.0, "kl": 0.05}).save(
        layout.direction
    )
    write_json(
        layout.refusal_rates,
        {
            "max_new_tokens": 64,
            "harmful": {"baseline": _rate(30, 32), "orthogonalized": _rate(1, 32), "ablation": _rate(0, 32)},
            "harmless": {"baseline": _rate(0, 32), "actadd": _rate(29, 32)},
        },
    )
    if measured:
        write_json(layout.measurement("coherence"), {"kl": {"orthogonalized": {"mean": 0.0421}}})
        write_json(layout.measurement("corpus_ce"), {"ce": {"baseline": 2.5101, "orthogonalized": 2.5332}})
        write_json(
            layout.measurement("gsm8k"), {"original": {"accuracy": 0.5}, "edited": {"accuracy": 0.375}}
        )
    return layout


def test_card_holds_the_runs_numbers_and_intended_use(tmp_path: Path) -> None:
    layout = make_run(tmp_path / "run", measured=True)
    text = model_card(layout.root, [CardFile("m.gguf", "the model")], fmt="gguf")
    assert text.startswith("---\ntags:")
    assert "| `m.gguf` | the model |" in text
    assert "30/32" in text and "1/32" in text and "29/32" in text  # refusal rates with counts
    assert "0.042" in text  # KL of the orthogonalized model
    assert "2.510" in text and "2.533" in text  # corpus CE original / edited
    assert "| GSM8K accuracy | 0.500 | 0.375 |" in text
    assert "| TruthfulQA MC1 | not measured | not measured |" in text
    assert "layer 17 of 28" in text
    assert "bypass -3.000, induce 4.000, kl 0.050" in text
    assert "## Intended use" in text and "harmful requests" in text
    assert "| n_train | `64` |" in text
    path = write_card(tmp_path / "out", text)
    assert path == tmp_path / "out" / "README.md" and path.read_text() == text


def test_card_says_not_measured_for_missing_measurements(tmp_path: Path) -> None:
    layout = make_run(tmp_path / "run", measured=False)
    text = model_card(layout.root, [], fmt="safetensors")
    kl_row = next(line for line in text.splitlines() if line.startswith("| first-token KL"))
    assert kl_row.endswith(f"| {NOT_MEASURED} |")
    assert "Not measured in this run:" in text and "coherence" in text
    assert "suffix" not in text  # artifacts that are not measurements of the model are not listed


def test_push_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    with pytest.raises(RefusalkitError, match=r"no README.md"):
        push_to_hub(folder, "me/model")
    (folder / "README.md").write_text("card")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RefusalkitError, match=r"HF_HUB_OFFLINE.*huggingface-cli upload me/model"):
        push_to_hub(folder, "me/model")


def test_push_without_network_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub unreachable (a closed local port stands in for no network): a RefusalkitError, no trace."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(RefusalkitError, match=r"could not push .* Check the network"):
        push_to_hub(folder, "me/model")
