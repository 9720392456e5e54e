"""The model card of an export (offline): numbers from the run's artifacts, gaps said, Hub push errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusalkit.directions import Candidates, Direction
from refusalkit.errors import RefusalkitError
from refusalkit.export.card import NOT_MEASURED, CardFile, model_card, write_card
from refusalkit.export.hub import push_to_hub
from refusalkit.layout import RunLayout
from refusalkit.run import RunFolder
from refusalkit.search.edit import EditParams, Kernel
from refusalkit.utils import write_json

CHOSEN = 7  # the searched trial of the fabricated runs
# The chosen trial's verification and the unedited model's on the same held-out prompts: numbers that
# appear nowhere else in a fabricated run, so a card showing them shows the search's numbers.
VERIFIED = {
    "refused": {"paper": 3, "heretic": 5},
    "n": 100,
    "kl": {"mean": 0.0123, "median": 0.0045, "max": 0.321},
    "max_new_tokens": 48,
    "seconds": 1.0,
    "echoed": {"paper": 0, "heretic": 1},
}
BASELINE = {
    **VERIFIED,
    "refused": {"paper": 74, "heretic": 81},
    "kl": {"mean": 0.0, "median": 0.0, "max": 0.0},
}


def search_params() -> EditParams:
    """Attention writes of every layer, no MLP write, no embedding: the paper's edit changes all three."""
    return EditParams(
        position=-1, layer=1, attn=Kernel(peak=1.0, position=1, minimum=0.5, width=2), mlp=Kernel(peak=0.0)
    )


def add_search(layout: RunLayout, *, d_model: int = 64, n_layers: int = 4) -> EditParams:
    """What `refusalkit optimize` leaves in a run: candidates, search/front.json (the chosen trial
    verified, trial 3 not) and search/chosen.json."""
    gen = torch.Generator().manual_seed(5)
    shape = (2, n_layers, d_model)
    Candidates(torch.randn(*shape, generator=gen) * 4, torch.randn(*shape, generator=gen)).save(
        layout.candidates
    )
    params = search_params()
    proxy = {
        "refusal": 0.05,
        "refused": 1,
        "n_harmful": 20,
        "kl": {"mean": 0.011, "median": 0.004, "max": 0.2},
    }
    point = {
        "trial": CHOSEN,
        "seed": None,
        "edit": params.model_dump(mode="json"),
        "proxy": proxy,
        "verified": VERIFIED,
    }
    unverified = {
        "trial": 3,
        "seed": "paper",
        "edit": EditParams.orthogonalization(2, -1).model_dump(mode="json"),
        "proxy": {**proxy, "refusal": 0.2468, "kl": {"mean": 0.0321, "median": 0.01, "max": 0.5}},
        "verified": None,
    }
    front = {
        "points": [point, unverified],
        "chosen": CHOSEN,
        "baseline": BASELINE,
        "sets": {"harmful_test": 100, "harmless_test": 90},
        "verify_max_new_tokens": 48,
        "trials": [],
        "objectives": [],
        "n_layers": n_layers,
    }
    write_json(layout.front, front)
    write_json(layout.chosen, point | {"kernels": params.kernels(n_layers), "embed": params.embed})
    return params


def card(layout: RunLayout, files: list[CardFile], fmt: str, edit: str | None = None) -> str:
    run = RunFolder(layout)
    return model_card(run, run.active_edit(edit), files, fmt=fmt)


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
    text = card(layout, [CardFile("m.gguf", "the model")], fmt="gguf")
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
    text = card(layout, [], fmt="safetensors")
    kl_row = next(line for line in text.splitlines() if line.startswith("| first-token KL"))
    assert kl_row.endswith(f"| {NOT_MEASURED} |")
    assert "Not measured in this run:" in text and "coherence" in text
    assert "suffix" not in text  # artifacts that are not measurements of the model are not listed


ORTHOGONALIZED = ("1/32", "0.042", "2.533", "0.375")  # the direction's numbers in make_run(measured=True)


def test_search_card_shows_the_chosen_trials_numbers_and_no_others(tmp_path: Path) -> None:
    """A card for `--edit search` states the chosen trial's verified counts and KL, against the
    unedited model verified on the same prompts, and none of the orthogonalized model's numbers."""
    layout = make_run(tmp_path / "run", measured=True)
    add_search(layout, d_model=8, n_layers=28)
    for edit in ("search", None, f"trial:{CHOSEN}"):  # the active edit of a searched run is the search's
        text = card(layout, [], fmt="gguf", edit=edit)
        assert (
            "refusal edit chosen by a search" in text and f"the search's chosen edit (trial {CHOSEN})" in text
        )
        assert "| harmful prompts refused (the paper's refusal phrases) | 0.74 = 74/100" in text
        assert "| 0.03 = 3/100" in text and "0.81 = 81/100" in text and "| 0.05 = 5/100" in text
        assert "0.0123 (median 0.0045, max 0.321)" in text and "search/front.json" in text
        assert "pos -1" in text and "`refusalkit export --edit search` exports it" in text
        for number in ORTHOGONALIZED:
            assert number not in text, number
        assert "orthogonalized" not in text and "ablation hooks" not in text
        assert "30/32" not in text  # not even the original model's rate from the paper's evaluation


def test_direction_card_of_a_searched_run_shows_only_the_directions_numbers(tmp_path: Path) -> None:
    layout = make_run(tmp_path / "run", measured=True)
    add_search(layout, d_model=8, n_layers=28)
    text = card(layout, [], fmt="gguf", edit="direction")
    assert "refusal direction ablated" in text and "`refusalkit export --edit direction` exports it" in text
    assert all(number in text for number in ORTHOGONALIZED)
    assert "3/100" not in text and "0.0123" not in text and f"trial {CHOSEN}" not in text


def test_unverified_trial_card_says_its_numbers_are_the_proxy(tmp_path: Path) -> None:
    layout = make_run(tmp_path / "run", measured=True)
    add_search(layout, d_model=8, n_layers=28)
    text = card(layout, [], fmt="gguf", edit="trial:3")
    assert "the search's trial 3" in text and "was not verified on held-out prompts" in text
    assert "| expected refusal on harmful validation prompts (search proxy) | not measured | 0.247 |" in text
    assert "0.0321" in text and "0.0123" not in text and "3/100" not in text
    assert not any(number in text for number in ORTHOGONALIZED)


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
