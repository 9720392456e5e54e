"""GGUF export on a tiny qwen2 model written as a GGUF in-process (no download).

The tiny GGUF is loaded the way users load theirs (``load_model("x.gguf")``: transformers dequantizes it),
then exported inside ``orthogonalized``; the export is read back with gguf-py and with transformers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.export.cli import ExportOptions, run_export
from refusalkit.export.gguf import OUTPUT, TOKEN_EMBD, export_gguf, rewrite_gguf
from refusalkit.layout import RunLayout
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.orthogonalize import orthogonalized
from refusalkit.utils import write_json

Q = gguf.GGMLQuantizationType


def write_tiny_gguf(
    path: Path, *, tied: bool = False, qtype: Q = Q.Q4_0, arch_name: str = "qwen2", seed: int = 0
) -> Path:
    """A complete, loadable GGUF of a tiny random qwen2 model (matrices in ``qtype``, vectors F32)."""
    tok = tiny_tokenizer()
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])] + ["ĠĠ"]
    model = tiny_model("qwen2", seed=seed, vocab_size=len(tokens), tie_word_embeddings=tied)
    cfg = model.config
    w = gguf.GGUFWriter(path, arch_name)
    w.add_name("tiny-qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(["Ġ Ġ"])  # llama.cpp needs at least one merge
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        arr = t.float().numpy()
        if arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private model cache for the module (load_model converts GGUF files into it)."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("REFUSALKIT_CACHE")
    os.environ["REFUSALKIT_CACHE"] = str(path)
    yield path
    if old is None:
        del os.environ["REFUSALKIT_CACHE"]
    else:
        os.environ["REFUSALKIT_CACHE"] = old


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf")


@pytest.fixture(scope="module")
def tied_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tied") / "tied.gguf", tied=True, seed=1)


def _load(path: Path) -> LoadedModel:
    return load_model(str(path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def lm(source: Path, cache: Path) -> LoadedModel:
    return _load(source)


def _direction(d_model: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _fields(path: Path) -> dict[str, Any]:
    return {
        f.name: f.contents() for f in gguf.GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")
    }


def _logits(lm: LoadedModel, text: str = "<|im_start|>user\nhello there<|im_end|>\n") -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    return lm.model(ids).logits[0].double()


def _edited_names(n_layers: int = 4) -> set[str]:
    per_block = [f"blk.{i}.{k}.weight" for i in range(n_layers) for k in ("attn_output", "ffn_down")]
    return {TOKEN_EMBD, *per_block}


def test_untouched_tensors_and_metadata_are_copied_byte_for_byte(
    lm: LoadedModel, source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "edited.gguf"
    with orthogonalized(lm, _direction()):
        info = export_gguf(lm, source, out, metadata={"run": "r1"})
    assert set(info.replaced) == _edited_names()
    assert info.added == []  # the source has its own output.weight
    src, new = _tensors(source), _tensors(out)
    assert list(new) == list(src)  # same tensors, same order
    for name, t in src.items():
        if name in info.replaced:
            assert new[name].tensor_type == Q.Q8_0
            continue
        assert new[name].tensor_type == t.tensor_type, name
        assert new[name].data.tobytes() == t.data.tobytes(), name
    assert info.copied == len(src) - len(info.replaced)
    fields_src, fields_new = _fields(source), _fields(out)
    for key, value in fields_src.items():
        assert fields_new[key] == value, key
    assert fields_new["refusalkit.run"] == "r1"
    assert set(fields_new["refusalkit.edited_tensors"]) == _edited_names()
    assert fields_new["refusalkit.edited_tensor_type"] == "q8_0"


def test_edited_tensors_hold_the_edited_weights(lm: LoadedModel, source: Path, tmp_path: Path) -> None:
    """f32: exactly the orthogonalized weights, in transformers' layout; q8_0: within its rounding."""
    exact, q8 = tmp_path / "f32.gguf", tmp_path / "q8.gguf"
    u = _direction()
    with orthogonalized(lm, u):
        export_gguf(lm, source, exact, tensor_type="f32")
        export_gguf(lm, source, q8, tensor_type="q8_0")
        want = {
            TOKEN_EMBD: lm.arch.embed.weight.detach().clone(),
            "blk.2.attn_output.weight": lm.arch.attn_write[2].weight.detach().clone(),
            "blk.3.ffn_down.weight": lm.arch.mlp_write[3].weight.detach().clone(),
        }
    f32, q8t = _tensors(exact), _tensors(q8)
    for name, w in want.items():
        got = torch.from_numpy(np.array(f32[name].data))
        assert got.shape == w.shape and torch.equal(got, w), name
        deq = torch.from_numpy(gguf.quants.dequantize(q8t[name].data, Q.Q8_0))
        # Q8_0: one float16 scale d <= max/127 per 32 values; error <= d/2 + 127 d 2^-11 (scale rounding)
        step = w.abs().amax(dim=-1, keepdim=True) / 127
        assert ((deq - w).abs() <= step * 0.57).all(), name
    # The edit removed the direction from what the attention output writes.
    unit = (u / u.norm()).double()
    assert float((unit @ want["blk.2.attn_output.weight"].double()).abs().max()) < 1e-5


def test_exported_gguf_loads_and_matches_the_orthogonalized_model(
    lm: LoadedModel, source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "export" / "edited-f32.gguf"
    with orthogonalized(lm, _direction()):
        export_gguf(lm, source, out, tensor_type="f32")
        want = _logits(lm)
    original = _logits(lm)
    got = _logits(_load(out))
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, original, atol=1e-2)  # the edit changed the model


def test_tied_source_gets_the_original_embedding_as_output(
    tied_source: Path, cache: Path, tmp_path: Path
) -> None:
    lm = _load(tied_source)
    assert lm.arch.unembed.weight is lm.arch.embed.weight
    out = tmp_path / "untied.gguf"
    with orthogonalized(lm, _direction()):
        info = export_gguf(lm, tied_source, out, tensor_type="f32")
        want = _logits(lm)
    assert info.added == [OUTPUT]
    src, new = _tensors(tied_source), _tensors(out)
    assert OUTPUT not in src
    assert new[OUTPUT].tensor_type == src[TOKEN_EMBD].tensor_type
    assert new[OUTPUT].data.tobytes() == src[TOKEN_EMBD].data.tobytes()  # the original, not the edited one
    assert torch.allclose(_logits(_load(out)), want, atol=1e-4)


def test_unknown_architecture_is_a_clear_error(tmp_path: Path, lm: LoadedModel) -> None:
    odd = write_tiny_gguf(tmp_path / "odd.gguf", arch_name="no-such-arch")
    with pytest.raises(RefusalkitError, match=r"architecture 'no-such-arch' is unknown"):
        export_gguf(lm, odd, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_gguf_of_another_model_is_refused(lm: LoadedModel, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other)
    with pytest.raises(RefusalkitError, match=r"not the model"):
        rewrite_gguf(other, tmp_path / "x.gguf", {"blk.0.ffn_down.weight": torch.zeros(3, 3)})
    with pytest.raises(RefusalkitError, match=r"no tensor"):
        rewrite_gguf(other, tmp_path / "x.gguf", {"blk.9.ffn_down.weight": torch.zeros(3, 3)})
    assert not (tmp_path / "x.gguf").exists()


# ---- the command ----------------------------------------------------------------------------------------


def make_run(root: Path, model: str, *, layer: int = 2, with_direction: bool = True) -> RunLayout:
    """A run folder with just what export reads: settings in the manifest and a selected direction."""
    layout = RunLayout(root)
    write_json(
        layout.manifest, {"settings": {"model": model, "dtype": "float32", "device": "cpu"}, "stages": {}}
    )
    if with_direction:
        Direction(vector=_direction() * 3, layer=layer, position=-1, model="tiny").save(layout.direction)
    return layout


def test_run_export_writes_gguf_control_vector_and_card(
    lm: LoadedModel, source: Path, tmp_path: Path
) -> None:
    layout = make_run(tmp_path / "run", str(source))
    result = run_export(layout.root, ExportOptions(format="gguf", control_vector=True), lm=lm)
    names = sorted(p.name for p in result.files)
    assert names == ["tiny-abliterated-q8_0.gguf", "tiny-refusal-cvec.gguf"]
    assert all(p.parent == layout.gguf_dir for p in result.files)
    fields = _fields(layout.gguf_dir / "tiny-abliterated-q8_0.gguf")
    assert fields["refusalkit.direction.layer"] == 2 and fields["refusalkit.run"] == "run"
    card = (layout.gguf_dir / "README.md").read_text()
    assert "tiny-abliterated-q8_0.gguf" in card and "tiny-refusal-cvec.gguf" in card
    assert result.size_bytes["tiny-abliterated-q8_0.gguf"] > 0
    # The live model is unchanged after the export.
    assert torch.equal(lm.arch.attn_write[0].weight, _load(source).arch.attn_write[0].weight)


def test_run_export_refuses_to_overwrite_without_force(lm: LoadedModel, source: Path, tmp_path: Path) -> None:
    layout = make_run(tmp_path / "run", str(source))
    target = layout.gguf_dir / "tiny-abliterated-q8_0.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"keep me")
    with pytest.raises(RefusalkitError, match=r"already exists; pass --force"):
        run_export(layout.root, ExportOptions(format="gguf"), lm=lm)
    assert target.read_bytes() == b"keep me"
    run_export(layout.root, ExportOptions(format="gguf", force=True), lm=lm)
    assert target.read_bytes()[:4] == b"GGUF"


def test_run_export_without_a_direction_is_a_clear_error(source: Path, tmp_path: Path) -> None:
    layout = make_run(tmp_path / "run", str(source), with_direction=False)
    with pytest.raises(RefusalkitError, match=r"no selected direction.*refusalkit select"):
        run_export(layout.root, ExportOptions(format="gguf"))
    with pytest.raises(RefusalkitError, match=r"not a run folder"):
        run_export(tmp_path / "nowhere", ExportOptions(format="gguf"))


def test_folder_model_without_llama_cpp_names_what_to_install(tmp_path: Path) -> None:
    folder = tmp_path / "hf-model"
    folder.mkdir()
    layout = make_run(tmp_path / "run", str(folder))
    with pytest.raises(RefusalkitError, match=r"llama\.cpp.*--llama-cpp"):
        run_export(layout.root, ExportOptions(format="gguf"))
    with pytest.raises(RefusalkitError, match=r"has no convert_hf_to_gguf.py"):
        run_export(layout.root, ExportOptions(format="gguf", llama_cpp=tmp_path))


def test_folder_model_is_converted_by_the_llama_cpp_script(
    lm: LoadedModel, source: Path, tmp_path: Path
) -> None:
    """The converter contract: the edited folder, --outfile, --outtype; the result gets our metadata.
    A stand-in script checks the folder holds the edited weights and writes a GGUF (a copy of the source)."""
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text(
        "import argparse, shutil, sys\n"
        "from safetensors.torch import load_file\n"
        "p = argparse.ArgumentParser(); p.add_argument('model'); p.add_argument('--outfile');"
        " p.add_argument('--outtype')\n"
        "a = p.parse_args()\n"
        "w = load_file(a.model + '/model.safetensors')['model.layers.0.self_attn.o_proj.weight']\n"
        f"u = load_file({str(tmp_path / 'u.safetensors')!r})['u']\n"
        "assert float((u @ w).abs().max()) < 1e-4, 'not the edited weights'\n"
        f"assert a.outtype == 'f16'\nshutil.copy({str(source)!r}, a.outfile)\n"
    )
    from safetensors.torch import save_file

    layout = make_run(tmp_path / "run", str(tmp_path / "some-folder"))
    u = Direction.load(layout.direction).unit
    save_file({"u": u.contiguous()}, str(tmp_path / "u.safetensors"))
    opts = ExportOptions(format="gguf", gguf_type="f16", llama_cpp=fake, out_dir=tmp_path / "o")
    result = run_export(layout.root, opts, lm=lm)
    fields = _fields(result.files[0])
    assert fields["refusalkit.direction.layer"] == 2
    assert fields["general.name"] == "tiny-qwen2"


def test_failing_converter_reports_its_error(lm: LoadedModel, tmp_path: Path) -> None:
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('NotImplementedError: Architecture X', file=sys.stderr)\nsys.exit(1)\n"
    )
    layout = make_run(tmp_path / "run", str(tmp_path / "some-folder"))
    with pytest.raises(RefusalkitError, match=r"(?s)converter failed.*Architecture X"):
        run_export(layout.root, ExportOptions(format="gguf", llama_cpp=fake), lm=lm)


def test_safetensors_export_gets_a_card_and_loads(lm: LoadedModel, source: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    layout = make_run(tmp_path / "run", str(source))
    result = run_export(layout.root, ExportOptions(format="safetensors"), lm=lm)
    assert result.files == [layout.model_dir]
    card = (layout.model_dir / "README.md").read_text()
    assert "transformers checkpoint" in card and "## Intended use" in card
    with orthogonalized(lm, Direction.load(layout.direction).vector):
        want = _logits(lm)
    plain = AutoModelForCausalLM.from_pretrained(layout.model_dir, dtype=torch.float32)
    ids = lm.tokenizer("<|im_start|>user\nhello there<|im_end|>\n", return_tensors="pt").input_ids
    assert torch.allclose(plain(ids).logits[0].double(), want, atol=1e-4)
    with pytest.raises(RefusalkitError, match=r"already exists"):
        run_export(layout.root, ExportOptions(format="safetensors"), lm=lm)


def _folder_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # no refusalkit needed
    ids = tiny_tokenizer()("<|im_start|>user\nhello there<|im_end|>\n", return_tensors="pt").input_ids
    return plain(ids).logits[0].double()


def test_one_writer_of_run_dir_model_for_the_stage_and_optimize_export(
    lm: LoadedModel, source: Path, tmp_path: Path
) -> None:
    """The export stage writes the paper's direction with its card; `optimize --export` (through the same
    writer) replaces the weights and the card, keeps a control vector beside them, and adds the edit's
    parameters; each card states its own edit's numbers only."""
    from refusalkit.directions import Candidates
    from refusalkit.search.edit import EditParams, applied_edit
    from refusalkit.search.optimize import OptimizeOptions, optimize
    from refusalkit.settings import build_settings
    from refusalkit.stages import export as stage
    from test_model_card import CHOSEN, add_search

    layout = make_run(tmp_path / "run", str(source))
    settings = build_settings({"model": str(source), "dtype": "float32", "device": "cpu"})
    out = stage.export(lm, Direction.load(layout.direction), settings, layout)
    assert out == layout.model_dir and stage.load(layout, settings) == layout.model_dir
    with orthogonalized(lm, Direction.load(layout.direction).vector):
        want = _logits(lm)
    assert torch.allclose(_folder_logits(out), want, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "orthogonalized weights (the paper's direction: layer 2, position -1)" in card
    assert "--edit direction" in card and "search" not in card.split("## Run settings")[0]
    assert not (out / "refusalkit_edit.json").exists()
    (out / "tiny-refusal-cvec.gguf").write_bytes(b"a control vector")

    params = add_search(layout)
    said: list[str] = []
    optimize(layout, OptimizeOptions(export=True), lm=lm, say=said.append)  # choose the saved pick, export
    assert said == [f"checkpoint: {layout.model_dir}"]
    card = (out / "README.md").read_text()
    assert f"the search's chosen edit (trial {CHOSEN})" in card and "0.03 = 3/100" in card
    assert "orthogonalized" not in card and "layer 2, position -1" not in card
    assert EditParams.model_validate_json((out / "refusalkit_edit.json").read_text()) == params
    assert (out / "tiny-refusal-cvec.gguf").read_bytes() == b"a control vector"
    with applied_edit(lm, Candidates.load(layout.candidates), params):
        want = _logits(lm)
    assert torch.allclose(_folder_logits(out), want, atol=1e-4)
    assert not torch.allclose(_logits(lm), want, atol=1e-3)  # the edit changes the logits


def test_export_command_writes_the_searched_edit(
    lm: LoadedModel, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`refusalkit export RUN --edit search` on a searched run: the GGUF holds the search's edit (only
    the writes it changes differ from the source), its metadata names the trial, its card the trial's
    numbers; the default `--edit` is the same edit; --edit direction the paper's."""
    from refusalkit.cli import main
    from refusalkit.directions import Candidates
    from refusalkit.search.edit import applied_edit
    from test_model_card import CHOSEN, add_search

    layout = make_run(tmp_path / "run", str(source))
    params = add_search(layout)
    argv = ["export", str(layout.root), "--format", "gguf", "--gguf-type", "f32"]
    assert main([*argv, "--edit", "search"]) == 0
    path = layout.gguf_dir / "tiny-abliterated-f32.gguf"
    assert str(path) in capsys.readouterr().out
    fields = _fields(path)
    assert fields["refusalkit.edit"] == "searched edit" and fields["refusalkit.edit.trial"] == CHOSEN
    src, new = _tensors(source), _tensors(path)
    untouched = [TOKEN_EMBD, *(f"blk.{i}.ffn_down.weight" for i in range(4))]
    for name in untouched:  # the search's edit leaves the embedding and the MLP writes alone
        assert new[name].data.tobytes() == src[name].data.tobytes(), name
    assert new["blk.1.attn_output.weight"].data.tobytes() != src["blk.1.attn_output.weight"].data.tobytes()
    with applied_edit(lm, Candidates.load(layout.candidates), params):
        want = _logits(lm)
    assert torch.allclose(_logits(_load(path)), want, atol=1e-4)
    card = (layout.gguf_dir / "README.md").read_text()
    assert f"trial {CHOSEN}" in card and "0.03 = 3/100" in card and "orthogonalized" not in card

    assert main([*argv, "--force"]) == 0  # no --edit: the run's active edit, the same search edit
    assert _fields(path)["refusalkit.edit.trial"] == CHOSEN
    assert main([*argv, "--force", "--edit", "direction"]) == 0
    fields = _fields(path)
    assert fields["refusalkit.edit"] == "orthogonalization" and "refusalkit.edit.trial" not in fields
    assert _tensors(path)[TOKEN_EMBD].data.tobytes() != src[TOKEN_EMBD].data.tobytes()
    assert "orthogonalized weights" in (layout.gguf_dir / "README.md").read_text()
    assert main([*argv, "--force", "--edit", "trial:99"]) == 2
    assert "trial 99 is not on the search front" in capsys.readouterr().err


def test_searched_edit_exports_only_the_writes_it_changes(
    lm: LoadedModel, source: Path, tmp_path: Path
) -> None:
    """Inside a searched edit's context (search/edit.py) the exporter writes that edit, and with the
    edit's target modules every write the edit leaves alone keeps the source's bytes."""
    from refusalkit.directions import Candidates
    from refusalkit.search.edit import EditParams, Kernel, applied_edit, plan

    g = torch.Generator().manual_seed(2)
    cands = Candidates(torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g))
    params = EditParams(
        layer=2, attn=Kernel(peak=1.0, position=1.0, minimum=0.5, width=1.0), mlp=Kernel(peak=0.0)
    )
    targets = [t.module for t in plan(lm, cands, params)]
    out = tmp_path / "searched.gguf"
    with applied_edit(lm, cands, params):
        info = export_gguf(lm, source, out, tensor_type="f32", modules=targets)
        want = _logits(lm)
    assert sorted(info.replaced) == [f"blk.{i}.attn_output.weight" for i in range(3)]
    src, new = _tensors(source), _tensors(out)
    for name in ("blk.3.attn_output.weight", "blk.0.ffn_down.weight", TOKEN_EMBD):
        assert new[name].data.tobytes() == src[name].data.tobytes(), name
    assert torch.allclose(_logits(_load(out)), want, atol=1e-4)
