"""The streamed export (export/stream.py): a bfloat16 run of a float32 folder writes its checkpoint by
streaming the source's tensors through the edit, bit for bit what loading a second float32 model and
editing it writes (``export_by_reload``), into shards transformers loads, and falls back to that second
load, saying why, when a tensor cannot be mapped. Tiny models saved to folders, loaded as a user would."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model, tiny_tokenizer
from refusalkit.calibrate.edit import CalibrationEdit
from refusalkit.directions import Candidates, Direction
from refusalkit.export import cli, stream
from refusalkit.models.loading import load_model
from refusalkit.run import ActiveEdit
from refusalkit.search.edit import EditParams, Kernel
from refusalkit.settings import Settings

EXTRA = {"refusalkit_edit.json": "{}\n"}


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """bfloat16 copies of the weights (models/cast.py) go to a fresh folder, never the user's."""
    monkeypatch.setenv("REFUSALKIT_CACHE", str(tmp_path / "cache"))


def _source(
    tmp_path: Path, *, family: str = "qwen2", tied: bool = False, shard: str | None = None, **config: Any
) -> Path:
    """A tiny model saved in float32 (optionally in shards of ``shard``), with its tokenizer."""
    tok = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tok), tie_word_embeddings=tied, **config)
    with torch.no_grad():  # biases start at zero, where an edit changes nothing
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path / "source"
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(out)
    return out


def _edit(kind: str, d_model: int = 64, n_layers: int = 4) -> ActiveEdit:
    """One edit of each kind the export writes: the paper's direction, a searched edit (per-layer
    directions, fractional kernels, the embedding, norm-preserving) and the calibration search's choice
    (per-layer weights)."""
    g = torch.Generator().manual_seed(5)
    vector = torch.randn(d_model, generator=g, dtype=torch.float64) * 3
    if kind == "direction":
        return ActiveEdit("direction", Direction(vector, layer=1, position=-1))
    if kind == "calibrate":
        weights = CalibrationEdit(
            attn=Kernel(peak=1.0, position=1.0, minimum=0.4, width=2.0), mlp=Kernel(peak=0.6), embed=0.5
        ).weights(n_layers)
        meta = {"lam": 1.0, "weights": weights}
        return ActiveEdit("calibrate", Direction(vector, layer=1, position=-1, meta=meta))
    cands = Candidates(
        torch.randn(2, n_layers, d_model, generator=g, dtype=torch.float64) * 4,
        torch.randn(2, n_layers, d_model, generator=g, dtype=torch.float64),
    )
    params = EditParams(
        source="per_layer",
        position=-1,
        embed=0.7,
        norm_preserving=True,
        attn=Kernel(peak=1.2, position=1.5, minimum=0.3, width=2.0),
        mlp=Kernel(peak=0.8),
    )
    return ActiveEdit("search", None, params=params, trial=3, candidates=cands)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _no_reload(*_a: Any, **_k: Any) -> None:
    raise AssertionError("the export loaded a second model instead of streaming")


@pytest.mark.parametrize(
    ("family", "kind", "tied", "config"),
    [
        ("qwen2", "direction", False, {}),
        ("qwen2", "direction", True, {}),
        ("qwen2", "search", False, {}),
        ("qwen2", "search", True, {}),
        ("qwen2", "calibrate", False, {}),
        ("llama", "direction", False, {}),
        ("llama", "search", False, {"attention_bias": True, "mlp_bias": True}),  # biases edited
        ("mistral", "search", False, {}),
        ("qwen3", "direction", True, {}),
        ("gemma", "direction", True, {}),
        ("phi3", "search", False, {}),
    ],
)
def test_streamed_export_equals_the_second_load_bit_for_bit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    family: str,
    kind: str,
    tied: bool,
    config: dict[str, Any],
) -> None:
    """Every family the edit core edits (ORTHOGONALIZABLE), each kind of edit, tied heads."""
    src = _source(tmp_path, family=family, tied=tied, **config)
    settings = Settings(model=str(src), device="cpu", dtype="bfloat16")
    lm = load_model(str(src), device="cpu", dtype="bfloat16")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    active = _edit(kind)
    cli.export_by_reload(active, settings, tmp_path / "reload", EXTRA, "float32")
    monkeypatch.setattr(cli, "export_by_reload", _no_reload)
    cli.write_checkpoint(lm, active, settings, tmp_path / "stream", EXTRA)

    want, got, source = _tensors(tmp_path / "reload"), _tensors(tmp_path / "stream"), _tensors(src)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float32, k
        assert torch.equal(got[k], want[k]), k
    edited = [k for k in want if k not in source or not torch.equal(want[k], source[k])]
    assert len(edited) >= 4, edited  # the edit changed weights, and the test sees them
    if config.get("mlp_bias"):
        assert any(k.endswith("down_proj.bias") for k in edited), edited
    if tied:  # the edit untied the head, which keeps the original embedding
        assert "lm_head.weight" not in source and "lm_head.weight" in edited
        assert torch.equal(got["lm_head.weight"], source["model.embed_tokens.weight"])
    # every other file (config, generation config, tokenizer, the edit's parameters) byte for byte
    files = {p.name for p in (tmp_path / "reload").iterdir() if p.suffix != ".safetensors"}
    assert files == {p.name for p in (tmp_path / "stream").iterdir() if p.suffix != ".safetensors"}
    assert {"config.json", "generation_config.json", "refusalkit_edit.json"} <= files
    for name in files:
        assert (tmp_path / "stream" / name).read_bytes() == (tmp_path / "reload" / name).read_bytes(), name
    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is False
    # the run's own model is left as it was
    assert lm.dtype == torch.bfloat16 and lm.model.config.tie_word_embeddings is tied
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_multi_shard_source_streams_into_shards_transformers_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    src = _source(tmp_path, shard="100KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 2
    settings = Settings(model=str(src), device="cpu", dtype="bfloat16")
    lm = load_model(str(src), device="cpu", dtype="bfloat16")
    active = _edit("direction")
    cli.export_by_reload(active, settings, tmp_path / "reload", EXTRA, "float32")
    monkeypatch.setattr(cli, "export_by_reload", _no_reload)
    monkeypatch.setattr(stream, "SHARD_BYTES", 150_000)
    cli.write_checkpoint(lm, active, settings, tmp_path / "stream", EXTRA)

    out = tmp_path / "stream"
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    held = {k: f.name for f in shards for k in load_file(f)}
    assert index["weight_map"] == held  # every tensor, in the shard the index names
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _tensors(out).values())
    assert all(f.stat().st_size < 150_000 + 8_000 for f in shards)  # bounded (plus the header)

    ids = torch.tensor([[5, 17, 40, 99, 3, 250]])
    logits = {}
    for name in ("stream", "reload"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert torch.equal(logits["stream"], logits["reload"])
    unedited = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(unedited(ids).logits, logits["stream"])  # the edit is in the shards


def test_an_unmappable_tensor_falls_back_to_the_second_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An edited parameter with no tensor of its name in the source (here renamed in the file) is never
    written unedited: the export loads the second model, and the log says why."""
    src = _source(tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight_v0"] = tensors.pop("model.layers.2.mlp.down_proj.weight")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    settings = Settings(model=str(src), device="cpu", dtype="bfloat16")
    lm = load_model(str(src), device="cpu", dtype="bfloat16")
    calls: list[Path] = []
    real = cli.export_by_reload
    monkeypatch.setattr(
        cli, "export_by_reload", lambda a, s, out, e, k: calls.append(out) or real(a, s, out, e, k)
    )
    with caplog.at_level(logging.INFO, logger="refusalkit.export.cli"):
        cli.write_checkpoint(lm, _edit("direction"), settings, tmp_path / "out", EXTRA)
    assert calls == [tmp_path / "out"]
    assert "model.layers.2.mlp.down_proj.weight has no tensor" in caplog.text
    assert "loading a float32 copy instead" in caplog.text
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_file_key_with_and_without_the_base_models_prefix() -> None:
    keys = {"model.norm.weight", "layers.0.mlp.down_proj.weight", "lm_head.weight"}
    assert stream.file_key("model.norm.weight", keys, "model") == "model.norm.weight"
    assert (
        stream.file_key("model.layers.0.mlp.down_proj.weight", keys, "model")
        == "layers.0.mlp.down_proj.weight"
    )
    assert stream.file_key("norm.weight", keys, "model") == "model.norm.weight"
    assert stream.file_key("model.embed_tokens.weight", keys, "model") is None
    assert stream.file_key("model.norm.weight", keys | {"norm.weight"}, "model") is None  # ambiguous


# Peak resident memory of the export alone, above the process's after loading the bfloat16 model,
# sampled every millisecond, in a fresh process per export.
_PEAK = """
import sys, threading, time
from pathlib import Path
import torch
from refusalkit.export import cli
from refusalkit.directions import Direction
from refusalkit.models.loading import load_model
from refusalkit.run import ActiveEdit
from refusalkit.settings import Settings
src, out, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
lm = load_model(str(src), device="cpu", dtype="bfloat16")
sum(float(p.sum()) for p in lm.model.parameters())
settings = Settings(model=str(src), device="cpu", dtype="bfloat16")
active = ActiveEdit("direction", Direction(torch.randn(lm.model.config.hidden_size), layer=1, position=-1))
page = 4096
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak, done = [rss()], []
def sample():
    while not done:
        peak.append(rss())
        time.sleep(0.001)
base = rss()
t = threading.Thread(target=sample)
t.start()
if how == "stream":
    cli.write_checkpoint(lm, active, settings, out, {})
else:
    cli.export_by_reload(active, settings, out, {}, "float32")
done.append(1)
t.join()
print(max(peak) - base)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads /proc (Linux)")
def test_streamed_export_holds_no_second_model(tmp_path: Path) -> None:
    """Exporting a bfloat16 run of a 194 MiB float32 folder: the second load holds the float32 model
    (and more while saving); the stream holds one edited tensor (12 MiB) and a 4 MiB copy buffer (measured: 21 MB against 275 MB)."""
    src = _source(tmp_path, hidden_size=1024, intermediate_size=3072, num_hidden_layers=4)
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    peak = {}
    for how in ("stream", "reload"):
        run = subprocess.run(
            [sys.executable, "-c", _PEAK, str(src), str(tmp_path / how), how],
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        peak[how] = int(run.stdout.split()[-1])
    assert peak["reload"] > 0.8 * weights, (peak, weights)  # the measurement sees the second model
    assert peak["stream"] < 0.25 * weights, (peak, weights)
    assert sorted(_tensors(tmp_path / "stream")) == sorted(_tensors(tmp_path / "reload"))
