"""The compute dtype: --dtype auto's probe and its cache, bfloat16 runs (hooks against edited weights, no
float32 on the hot path), the dtype in every stage fingerprint, and the memory of a bfloat16 load."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from refusalkit.activations import logits_for_prompts
from refusalkit.errors import RefusalkitError
from refusalkit.evaluation.continuations import score_continuations
from refusalkit.generation import generate_ids
from refusalkit.interventions import RowSteering, ablate_direction, add_direction
from refusalkit.models import compute_dtype
from refusalkit.models.compute_dtype import DtypeChoice, cached_probe, choose_dtype, mlp_shape
from refusalkit.models.loading import load_model, resolved_settings
from refusalkit.orthogonalize import orthogonalized
from refusalkit.pipeline import Run
from refusalkit.prompts import format_prompts
from refusalkit.settings import Settings, build_settings
from refusalkit.stages import evaluate, extract, select

INSTRUCTIONS = ["hi", "Name a colour of the sky at dusk.", "Why?", "Count to three."]


def _fake_probe(speedup: float, calls: list[tuple[int, int]]) -> Callable[..., dict[str, Any]]:
    def probe(shape: tuple[int, int], seconds: float = 1.0) -> dict[str, Any]:
        calls.append(shape)
        return {"float32_ms": 10.0, "bfloat16_ms": 10.0 / speedup, "speedup": speedup}

    return probe


@pytest.fixture(autouse=True)
def _cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The probe's cache and the bfloat16 copies of weights in a fresh folder, never the user's."""
    monkeypatch.setenv("REFUSALKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def probe_calls() -> list[tuple[int, int]]:
    """A record of the shapes actually probed."""
    return []


@pytest.mark.parametrize(("speedup", "want"), [(0.6, "float32"), (1.05, "float32"), (2.5, "bfloat16")])
def test_auto_follows_the_probe(
    monkeypatch: pytest.MonkeyPatch, probe_calls: list[tuple[int, int]], speedup: float, want: str
) -> None:
    monkeypatch.setattr(compute_dtype, "probe_cpu", _fake_probe(speedup, probe_calls))
    choice = choose_dtype("auto", "cpu", (64, 128))
    assert choice.dtype == want and choice.requested == "auto"
    assert choice.probe is not None and choice.probe["speedup"] == speedup
    assert f"{speedup:.2f}x" in choice.reason
    assert probe_calls == [(64, 128)]


def test_probe_is_cached_per_machine_and_shape(
    monkeypatch: pytest.MonkeyPatch, probe_calls: list[tuple[int, int]]
) -> None:
    monkeypatch.setattr(compute_dtype, "probe_cpu", _fake_probe(2.0, probe_calls))
    first = cached_probe((64, 128))
    again = cached_probe((64, 128))
    assert probe_calls == [(64, 128)]  # the second call read the cache
    assert not first["cached"] and again["cached"] and again["speedup"] == 2.0
    saved = json.loads(compute_dtype.cache_file().read_text())
    (key,) = saved
    assert json.loads(key)["cpu"] == compute_dtype.cpu_identity()["cpu"]
    cached_probe((64, 256))  # another shape is measured
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another machine setup is measured
    cached_probe((64, 128))
    assert probe_calls == [(64, 128), (64, 256), (64, 128)]
    compute_dtype.cache_file().write_text("not json")  # a damaged cache is measured again
    assert not cached_probe((64, 128))["cached"]


def test_explicit_and_other_devices_need_no_probe(
    monkeypatch: pytest.MonkeyPatch, probe_calls: list[tuple[int, int]]
) -> None:
    monkeypatch.setattr(compute_dtype, "probe_cpu", _fake_probe(3.0, probe_calls))
    assert choose_dtype("float32", "cpu").dtype == "float32"
    assert choose_dtype("float16", "cpu").dtype == "float16"
    assert choose_dtype("auto", "mps").dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype("auto", "cuda:0").dtype == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_dtype("auto", "cuda").dtype == "float32"
    assert probe_calls == []
    with pytest.raises(RefusalkitError, match="unknown dtype 'int4'"):
        choose_dtype("int4", "cpu")


def test_real_probe_measures_both_dtypes() -> None:
    out = compute_dtype.probe_cpu((64, 128), seconds=0.02)
    assert out["shape"] == [compute_dtype.PROBE_ROWS, 64, 128] and out["rounds"] >= 2
    assert out["float32_ms"] > 0 and out["bfloat16_ms"] > 0
    assert out["speedup"] == pytest.approx(out["float32_ms"] / out["bfloat16_ms"], rel=0.05)


def test_mlp_shape_from_configs() -> None:
    assert mlp_shape({"hidden_size": 1536, "intermediate_size": 8960}) == (1536, 8960)
    assert mlp_shape({"text_config": {"hidden_size": 64, "intermediate_size": 128}}) == (64, 128)
    assert mlp_shape({"n_embd": 32}) == (32, 128)
    assert mlp_shape(None) == compute_dtype.DEFAULT_SHAPE


def test_paper_preset_keeps_float32(tmp_path: Path) -> None:
    assert build_settings({"preset": "paper", "data_dir": str(tmp_path)}, environ={}).dtype == "float32"
    flags = {"preset": "paper", "data_dir": str(tmp_path), "dtype": "bfloat16"}
    assert build_settings(flags, environ={}).dtype == "bfloat16"  # a flag still wins
    assert Settings().dtype == "auto"


# ---- a tiny model saved to a folder, loaded as a user would -------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    tok = tiny_tokenizer()
    model = tiny_model("qwen2", vocab_size=len(tok))
    out = tmp_path / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_auto_load_uses_the_models_shape_and_records_why(
    folder: Path, monkeypatch: pytest.MonkeyPatch, probe_calls: list[tuple[int, int]]
) -> None:
    monkeypatch.setattr(compute_dtype, "probe_cpu", _fake_probe(3.0, probe_calls))
    lm = load_model(str(folder), device="cpu")
    assert lm.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert lm.dtype_choice is not None and lm.dtype_choice.dtype == "bfloat16"
    assert probe_calls == [(64, 128)]  # the tiny model's hidden and intermediate sizes


def _direction(lm: Any) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(lm.model.config.hidden_size, dtype=torch.float64) * 5


def test_bfloat16_hooks_equal_orthogonalized_weights(folder: Path) -> None:
    """In a bfloat16 load, the selection path's logits (shared-prefix cache, last token) under the
    ablation hooks equal those of the orthogonalized weights within bfloat16's rounding."""
    lm = load_model(str(folder), dtype="bfloat16", device="cpu")
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS)
    direction = _direction(lm)
    base = logits_for_prompts(lm, prompts, batch_size=2)
    with ablate_direction(lm.arch, direction):
        hooked = logits_for_prompts(lm, prompts, batch_size=2)
    with orthogonalized(lm, direction):
        edited = logits_for_prompts(lm, prompts, batch_size=2)
    assert base.dtype == hooked.dtype == torch.float32  # logits leave the model as float32
    scale = float(hooked.abs().max())
    # bfloat16 keeps 8 bits: the two edits round differently, by about 2^-8 of the largest logit here
    # (0.011; bfloat16's own difference from float32 is of the same size); the ablation moves them 0.39,
    # and a hook that removes only 90% of the direction is 0.023 from the edit.
    assert float((hooked - base).abs().max()) > 0.2 * scale
    assert float((edited - hooked).abs().max()) <= 0.02 * scale
    assert lm.dtype == torch.bfloat16  # the edit was undone in the model's dtype


def _outputs_dtypes(model: torch.nn.Module) -> tuple[list[Any], Callable[[], None]]:
    """Every module's floating outputs' dtypes while registered, to catch a hook that upcasts."""
    seen: list[Any] = []

    def hook(module: torch.nn.Module, _args: Any, output: Any) -> None:
        outs = output if isinstance(output, tuple) else (output,)
        for t in outs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                seen.append((type(module).__name__, t.dtype))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    return seen, lambda: [h.remove() for h in handles]


def test_bfloat16_hot_paths_stay_bfloat16(folder: Path) -> None:
    """No hook upcasts the residual stream: under ablation, addition and per-row steering, in a pass
    and in generation, every module of a bfloat16 model outputs bfloat16 (the rotary embedding's
    cos/sin aside, which transformers computes in float32 and casts itself)."""
    lm = load_model(str(folder), dtype="bfloat16", device="cpu")
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS)
    direction = _direction(lm)
    seen, remove = _outputs_dtypes(lm.model)
    try:
        with ablate_direction(lm.arch, direction):
            logits_for_prompts(lm, prompts, batch_size=2)
        with add_direction(lm.arch, direction, 1, -1.0):
            generate_ids(lm, prompts, max_new_tokens=3, batch_size=4)
        unit = direction / direction.norm()
        steering = RowSteering(
            torch.stack([torch.zeros_like(unit), unit]), torch.stack([direction, torch.zeros_like(unit)]), 1
        )
        with steering.active(lm.arch):
            generate_ids(lm, prompts, max_new_tokens=3, batch_size=4, steering=steering, kinds=[0, 1, 0, 1])
    finally:
        remove()
    upcast = {name for name, dtype in seen if dtype != torch.bfloat16 and "Rotary" not in name}
    assert seen and not upcast, upcast


# ---- the dtype in every stage's fingerprint ---------------------------------------------------------


def _run_settings(folder: Path, dtype: str) -> Settings:
    return Settings(
        model=str(folder), dtype=dtype, device="cpu", n_train=4, n_val=2, n_test=2, max_new_tokens=3,
        batch_size=4, gen_batch_size=8, filter_train=False, filter_val=False, kl_threshold=1e9,
        induce_threshold=-1e9, data_dir="unused", measurements=["refusal_judges"],
    )  # fmt: skip


def test_a_float32_run_never_resumes_bfloat16_artifacts(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe_calls: list[tuple[int, int]]
) -> None:
    monkeypatch.setattr(compute_dtype, "probe_cpu", _fake_probe(3.0, probe_calls))
    out = tmp_path / "run"
    bf16 = Run(out, _run_settings(folder, "auto"))  # auto resolves before any fingerprint
    assert bf16.settings.dtype == "bfloat16"
    bf16.run_all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["dtype"] == "bfloat16" and manifest["model"]["dtype"] == "torch.bfloat16"
    assert manifest["compute_dtype"]["requested"] == "auto"
    assert manifest["compute_dtype"]["probe"]["speedup"] == 3.0
    # the orthogonalized weights reuse the ablation's completions in bfloat16 too (within its rounding)
    assert json.loads((out / "evaluate" / "refusal_rates.json").read_text())["orthogonalized_reuse"]["passed"]
    before = {name: rec["fingerprint"] for name, rec in manifest["stages"].items()}
    assert set(before) >= {"extract", "select", "evaluate", "measure", "export"}

    calls: list[str] = []
    for module, name in ((extract, "mean_activations"), (select, "score_candidates"), (evaluate, "generate")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    f32 = Run(out, _run_settings(folder, "float32"))
    f32.run_all()
    assert {"mean_activations", "score_candidates", "generate"} <= set(calls)
    after = json.loads((out / "manifest.json").read_text())
    assert after["model"]["dtype"] == "torch.float32" and after["compute_dtype"]["reason"] == "set explicitly"
    changed = {name for name, rec in after["stages"].items() if rec["fingerprint"] != before.get(name)}
    assert changed >= set(before) - {"data"}, before.keys() - changed


def test_a_model_given_in_memory_sets_the_runs_dtype(make_lm: Callable[..., Any]) -> None:
    lm = make_lm("qwen2")
    lm.model.to(torch.bfloat16)
    settings, choice = resolved_settings(Settings(dtype="float32"), lm)
    assert settings.dtype == "bfloat16" and choice.dtype == "bfloat16"
    lm.dtype_choice = DtypeChoice("auto", "float32", "probe")  # cast after loading: the weights win
    assert resolved_settings(Settings(), lm)[0].dtype == "bfloat16"


# ---- memory -------------------------------------------------------------------------------------------

# Peak resident memory of a load above the process's before it, sampled every millisecond (ru_maxrss
# would report the imports' peak, higher than a small model's).
_PEAK = """
import sys, threading, time
from refusalkit.models.loading import load_model
from transformers import AutoTokenizer, Qwen2ForCausalLM  # imported before the measurement
AutoTokenizer.from_pretrained(sys.argv[1])
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
lm = load_model(sys.argv[1], dtype=sys.argv[2], device="cpu")
sum(float(p.sum()) for p in lm.model.parameters())  # a run reads every weight (no float copy)
done.append(1)
t.join()
print(max(peak) - base)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads /proc (Linux)")
def test_bfloat16_load_keeps_no_float32_copy(tmp_path: Path) -> None:
    """Loading float32 weights as bfloat16 and reading them all peaks at about half the memory of a
    float32 load: the bfloat16 copy written into the cache (models/cast.py) is what is loaded, and
    writing it holds a chunk at a time. Transformers' own cast peaks at 1.5x float32 instead. A model
    of 194 MiB in float32, each load in a fresh process."""
    tok = tiny_tokenizer()
    model = tiny_model(
        "qwen2", vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=4
    )
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    weights = sum(p.numel() for p in model.parameters()) * 4
    del model
    peak = {}
    for load in ("float32", "bfloat16", "bfloat16 again"):
        run = subprocess.run(
            [sys.executable, "-c", _PEAK, str(tmp_path / "m"), load.split()[0]],
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        peak[load] = int(run.stdout.split()[-1])
    assert peak["float32"] > 0.8 * weights, (peak, weights)  # the measurement sees the weights
    # the first bfloat16 load writes the copy, a chunk at a time (transformers' cast: about 1.5x float32)
    assert peak["bfloat16"] <= 0.7 * peak["float32"], (peak, weights)
    assert peak["bfloat16 again"] <= 0.6 * peak["float32"], (peak, weights)  # later loads map the copy
    (copy,) = (tmp_path / "cache" / "cast").iterdir()
    assert sum(f.stat().st_size for f in copy.glob("*.safetensors")) < 0.51 * weights


# ---- restarts at a layer keep working in bfloat16 -----------------------------------------------------


def test_replay_tolerance_per_dtype() -> None:
    assert compute_dtype.replay_tolerance(torch.float32) == 1e-4
    assert compute_dtype.replay_tolerance(torch.bfloat16) == 4 * 2.0**-7
    assert compute_dtype.replay_tolerance(torch.float16) == 4 * 2.0**-10


def test_bfloat16_selection_restarts_and_notices_a_wrong_one(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Selection's activation-addition restart passes its self-check in a bfloat16 load (a failed
    check would silently cost full passes) and still fails it when the replay is wrong."""
    from refusalkit.activations import encode_batches
    from refusalkit.selection.passes import ResidReplay

    lm = load_model(str(folder), dtype="bfloat16", device="cpu")
    prompts = format_prompts(lm.tokenizer, INSTRUCTIONS, "You are a helpful assistant.")
    enc = encode_batches(lm, prompts, batch_size=2)
    replay = ResidReplay(lm, enc, [1, 2, 3])
    assert replay.exact
    v = _direction(lm)
    with add_direction(lm.arch, v, 2):
        plain = logits_for_prompts(lm, prompts, 2)
    got = replay.added_logits(v[None].float(), 2)[0]
    assert float((got - plain).abs().max()) <= 0.02 * float(plain.abs().max())
    monkeypatch.setattr(ResidReplay, "_head", lambda self, h: lm.arch.unembed(h)[:, -1].float())  # no norm
    assert not ResidReplay(lm, enc, [1, 2, 3]).exact


def test_bfloat16_coherence_actadd_restarts(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from refusalkit.directions import Direction
    from refusalkit.evaluation import continuations
    from refusalkit.evaluation.coherence import intervention, score_settings

    lm = load_model(str(folder), dtype="bfloat16", device="cpu")
    replayed: list[int] = []
    real = continuations.run_blocks
    monkeypatch.setattr(continuations, "run_blocks", lambda *a, **k: replayed.append(1) or real(*a, **k))
    tok = lm.tokenizer
    ctx = [tok(p, add_special_tokens=False)["input_ids"] for p in format_prompts(tok, INSTRUCTIONS)]
    conts = [tok(t, add_special_tokens=False)["input_ids"] for t in (" Blue.", "", " One two", " Hm")]
    d = Direction(_direction(lm), layer=2, position=-1)
    runs = score_settings(lm, d, ctx, conts, ["baseline", "actadd"], batch_size=2, keep_first_logits=True)
    assert len(replayed) > 2  # the self-check and the batches restarted (a failed check: only the former)
    with intervention(lm, "actadd", d):
        hooked = score_continuations(lm, ctx, conts, batch_size=2, keep_first_logits=True)
    a, b = runs["actadd"].first_logits, hooked.first_logits
    assert a is not None and b is not None
    assert float((a - b).abs().max()) <= 0.02 * float(b.abs().max())


def test_kl_and_metric_from_bfloat16_logits_are_float64() -> None:
    """bfloat16 logits are upcast before any arithmetic: KL and the refusal metric equal those of the
    same values given as float64."""
    from refusalkit.metric import kl_div, refusal_metric

    gen = torch.Generator().manual_seed(0)
    a, b = (
        (4 * torch.randn(3, 50, generator=gen)).bfloat16(),
        (4 * torch.randn(3, 50, generator=gen)).bfloat16(),
    )
    kl = kl_div(a, b)
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, kl_div(a.double(), b.double()), rtol=0, atol=0)
    torch.testing.assert_close(refusal_metric(a, [1, 2]), refusal_metric(a.double(), [1, 2]), rtol=0, atol=0)


# ---- the bfloat16 copy of float32 weights --------------------------------------------------------------


def test_cast_file_converts_float32_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from refusalkit.models import cast

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(37, 11, generator=gen),
        "ids": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(9, generator=gen).half(),
    }
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(cast, "CHUNK_BYTES", 64)  # many chunks per tensor
    cast.cast_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors", torch.bfloat16)
    got = load_file(tmp_path / "b.safetensors")
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], tensors["w"].bfloat16())
    assert torch.equal(got["ids"], tensors["ids"]) and torch.equal(got["h"], tensors["h"])
    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_cast_copy_once_and_only_for_float32(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from refusalkit.models import cast

    written: list[Path] = []
    real = cast.cast_file
    monkeypatch.setattr(cast, "cast_file", lambda s, d, t: written.append(s) or real(s, d, t))
    root = tmp_path / "cache"
    copy = cast.cast_copy(folder, torch.bfloat16, root, "files-sha256:abc")
    assert copy is not None and (copy / "config.json").is_file() and (copy / "tokenizer.json").is_file()
    assert cast.cast_copy(folder, torch.bfloat16, root, "files-sha256:abc") == copy
    assert len(written) == 1  # the second call found the finished copy
    assert cast.cast_copy(copy, torch.bfloat16, root, "other") is None  # no float32 left: nothing to do
    assert cast.cast_copy(folder, torch.float32, root, "files-sha256:abc") is None


def test_load_falls_back_to_casting_when_the_copy_cannot_be_written(
    folder: Path, monkeypatch: pytest.MonkeyPatch, probe_calls: list[tuple[int, int]]
) -> None:
    from refusalkit.models import loading

    def full_disk(*_a: Any, **_k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading, "cast_copy", full_disk)
    lm = load_model(str(folder), dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.bfloat16 and lm.source == str(folder)


def test_export_of_a_bfloat16_run_keeps_the_sources_float32(folder: Path, tmp_path: Path) -> None:
    """A run that computes in bfloat16 exports the edited weights in the source's dtype (float32 here):
    the checkpoint equals the float32 model with the same edit, not a bfloat16 one widened."""
    from refusalkit.directions import Direction
    from refusalkit.export.cli import write_model
    from refusalkit.layout import RunLayout
    from refusalkit.utils import write_json

    lm = load_model(str(folder), device="cpu", dtype="bfloat16")
    ref = load_model(str(folder), device="cpu", dtype="float32")
    d_model = lm.model.config.hidden_size
    direction = Direction(
        torch.randn(d_model, generator=torch.Generator().manual_seed(5)), layer=1, position=-1
    )
    layout = RunLayout(tmp_path / "run")
    write_json(layout.manifest, {"settings": {"model": str(folder), "dtype": "bfloat16"}, "stages": {}})
    direction.save(layout.direction)
    out = write_model(layout.root, lm, edit="direction")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    exported = load_model(str(out), device="cpu", dtype="float32").model.state_dict()
    with orthogonalized(ref, direction.vector):
        want = {k: v.clone() for k, v in ref.model.state_dict().items()}
    changed = [k for k in want if not torch.equal(want[k], ref.model.state_dict()[k])]
    assert changed, "the edit must change some weights"
    for k in changed:
        assert exported[k].dtype == torch.float32
        assert torch.equal(exported[k], want[k]), k
    assert lm.dtype == torch.bfloat16  # the run's own model is left as it was
