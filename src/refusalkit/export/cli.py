"""`refusalkit export RUN_DIR`: the edited model as a transformers folder or a GGUF file, with its card.

``run_export(run_dir, options)`` is the whole command: it loads the run's model, applies the edit
``--edit`` names (default: the run's active edit, ``run.RunFolder.active_edit``), writes the export
while the edit is applied, then the optional control vector, the README.md card (that edit's numbers)
and the optional Hub upload. Every check a user can fail (no direction, no chosen edit, target exists,
no GGUF source and no llama.cpp) runs before the model is loaded.

It is also the one writer of RUN_DIR/model: the export stage of `refusalkit run` and
`refusalkit optimize --export` call ``write_model``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from refusalkit.directions import Direction
from refusalkit.errors import RefusalkitError
from refusalkit.export.card import CardFile, model_card, write_card
from refusalkit.export.control_vector import cvec_layer, write_control_vector
from refusalkit.export.gguf import (
    convert_with_llama_cpp,
    export_gguf,
    llama_cpp_converter,
    source_gguf,
)
from refusalkit.export.hub import push_to_hub
from refusalkit.export.options import ExportOptions
from refusalkit.layout import RunLayout
from refusalkit.models.compute_dtype import dtype_name
from refusalkit.models.loading import LoadedModel, load_model
from refusalkit.orthogonalize import save_folder
from refusalkit.run import ActiveEdit, RunFolder
from refusalkit.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    folder: Path
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    url: str | None = None


def _slug(model: str) -> str:
    return Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"


@dataclass(frozen=True)
class ExportPaths:
    folder: Path
    model: Path  # the GGUF file, or the transformers folder
    cvec: Path | None


def export_paths(layout: RunLayout, opts: ExportOptions, model: str) -> ExportPaths:
    """Where an export of ``model`` (the run's model spec) goes: its folder, the model (GGUF file or
    transformers folder) and the control vector, if asked for."""
    if opts.format == "safetensors":
        folder = opts.out_dir or layout.model_dir
        return ExportPaths(
            folder, folder, folder / f"{_slug(model)}-refusal-cvec.gguf" if opts.control_vector else None
        )
    folder = opts.out_dir or layout.gguf_dir
    stem = _slug(model)
    cvec = folder / f"{stem}-refusal-cvec.gguf" if opts.control_vector else None
    return ExportPaths(folder, folder / f"{stem}-abliterated-{opts.gguf_type}.gguf", cvec)


def _refuse_existing(t: ExportPaths, opts: ExportOptions) -> None:
    existing = [p for p in (t.model, t.cvec) if p is not None and p.exists()]
    if opts.format == "safetensors" and not (t.model / "config.json").exists():
        existing = [p for p in existing if p != t.model]
    if existing and not opts.force:
        raise RefusalkitError(
            f"{existing[0]} already exists; pass --force to overwrite it, or --out-dir DIR for another folder"
        )


def _gguf_metadata(run: RunFolder, active: ActiveEdit) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "version": metadata.version("refusalkit"),
        "edit": {"direction": "orthogonalization", "calibrate": "calibration"}.get(
            active.kind, "searched edit"
        ),
        "run": run.root.resolve().name,
        "select_fingerprint": run.manifest.fingerprint_of("select"),
    }
    if active.kind == "direction":
        assert active.direction is not None
        meta |= {"direction.layer": active.direction.layer, "direction.position": active.direction.position}
    elif active.kind == "calibrate":
        assert active.direction is not None
        d = active.direction
        meta |= {
            "calibration.layer": d.layer,
            "calibration.position": d.position,
            "calibration.lam": d.meta.get("lam"),
        }
    else:
        assert active.params is not None
        meta |= {"edit.trial": active.trial, "edit.params": active.params.model_dump_json()}
    return meta


def run_export(
    run_dir: str | Path,
    opts: ExportOptions,
    *,
    lm: LoadedModel | None = None,
    settings: Settings | None = None,
) -> ExportResult:
    """Export the edit ``opts.edit`` names (default: the run's active edit; see the module docstring).
    ``lm``: the run's model, already loaded; ``settings``: the run's settings, when the caller has them."""
    run = RunFolder(run_dir)
    settings = settings or run.settings()
    active = run.active_edit(opts.edit)
    direction = run.direction() if opts.control_vector else None
    if direction is not None:
        cvec_layer(direction.layer)  # fail before any work if the direction has no control-vector form
    targets = export_paths(run.layout, opts, settings.model)
    _refuse_existing(targets, opts)
    source = source_gguf(settings.model) if opts.format == "gguf" else None
    converter = None
    if opts.format == "gguf" and source is None:
        converter = llama_cpp_converter(opts.llama_cpp, settings.model)
    lm = lm or load_model(settings.model, **settings.model_kwargs())
    result = ExportResult(targets.folder)
    targets.folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    meta = _gguf_metadata(run, active)
    if opts.format == "safetensors":
        extra = (
            {"refusalkit_edit.json": active.params.model_dump_json(indent=2) + "\n"} if active.params else {}
        )
        write_checkpoint(lm, active, settings, targets.model, extra)
    elif source is not None:
        modules = active.modules(lm)
        with active.apply(lm):
            export_gguf(lm, source, targets.model, tensor_type=opts.gguf_type, metadata=meta, modules=modules)
    else:
        assert converter is not None
        convert_with_llama_cpp(lm, active.apply, converter, targets.model, opts.gguf_type, meta)
    result.seconds["export"] = time.perf_counter() - t0
    result.files.append(targets.model)
    if targets.cvec is not None:
        assert direction is not None
        hint = str(lm.arch.model_type) if source is None else _gguf_arch_name(source)
        write_control_vector(
            direction.vector, direction.layer, targets.cvec, model_hint=hint, n_layers=lm.arch.n_layers
        )
        result.files.append(targets.cvec)
    for p in result.files:
        result.size_bytes[p.name] = _size(p)
    files = _card_files(result, opts, source, direction)
    write_card(result.folder, model_card(run, active, files, fmt=opts.format) + _usage(result, opts))
    if opts.push_to_hub:
        result.url = push_to_hub(targets.folder, opts.push_to_hub)
    return result


def write_model(
    run_dir: str | Path, lm: LoadedModel, *, edit: str | None = None, settings: Settings | None = None
) -> Path:
    """The one writer of RUN_DIR/model: the edit ``edit`` names (an ``--edit`` value; default the
    active edit) as a transformers folder with its card, replacing an earlier export there (a control
    vector beside it is kept)."""
    opts = ExportOptions(format="safetensors", edit=edit, force=True)
    return run_export(run_dir, opts, lm=lm, settings=settings).folder


def write_checkpoint(
    lm: LoadedModel, active: ActiveEdit, settings: Settings, out: Path, extra: dict[str, str]
) -> None:
    """The edited transformers folder ``out``, in the source folder's dtype.

    Same dtype (or no local source): the edit applied to ``lm`` in place while it is saved. A run
    computing in another dtype (bfloat16 from a float32 folder) streams the source's safetensors files
    through the edit (export/stream.py: one tensor in memory, the checkpoint equal to the edit of a
    model loaded in the source's dtype); when the files cannot be mapped to the model's parameters,
    it loads that second model instead (``export_by_reload``), and says so.
    """
    keep = source_dtype(lm)
    if keep is None or keep == dtype_name(lm.dtype):
        with active.apply(lm):
            _save_folder(lm, out, extra)
        return
    from refusalkit.export.stream import stream_folder, stream_plan

    log.info("exporting in the source's dtype %s (the run computes in %s)", keep, dtype_name(lm.dtype))
    plan = stream_plan(lm, active.targets(lm), keep)
    if isinstance(plan, str):
        log.info("cannot stream the export from the source files (%s); loading a %s copy instead", plan, keep)
        export_by_reload(active, settings, out, extra, keep)
        return
    stream_folder(lm, plan, out, keep, extra=extra, carry=_carried)


def export_by_reload(
    active: ActiveEdit, settings: Settings, out: Path, extra: dict[str, str], keep: str
) -> None:
    """The export through a second model loaded in ``keep`` with the edit applied (float32 products,
    rounded once): the streamed export's fallback, and what it is tested against."""
    out_lm = load_model(settings.model, **(settings.model_kwargs() | {"dtype": keep}))
    with active.apply(out_lm):
        _save_folder(out_lm, out, extra)


def source_dtype(lm: LoadedModel) -> str | None:
    """The dtype a local model folder stores its weights in (config.json's ``dtype`` or
    ``torch_dtype``), when it is one refusalkit computes in; None for a hub id or an unknown dtype."""
    config = Path(lm.source) / "config.json"
    if not config.is_file():
        return None
    cfg = json.loads(config.read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return name if name in ("float32", "bfloat16", "float16") else None


def _gguf_arch_name(source: Path) -> str:
    import gguf

    from refusalkit.export.gguf import gguf_architecture

    return gguf.MODEL_ARCH_NAMES[gguf_architecture(gguf.GGUFReader(source), source)]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _save_folder(lm: LoadedModel, out: Path, extra: dict[str, str]) -> None:
    """Save ``lm`` as it is now; a control vector written beside the weights survives (the card is
    rewritten after the save)."""
    save_folder(lm, out, extra=extra, keep=_carried)


def _carried(path: Path) -> bool:
    """Files of an earlier export that a new one keeps: a control vector (.gguf) beside the weights."""
    return path.suffix == ".gguf"


def _card_files(
    result: ExportResult, opts: ExportOptions, source: Path | None, d: Direction | None
) -> list[CardFile]:
    files = []
    for p in result.files:
        if p.suffix == ".gguf" and p.name.endswith("-refusal-cvec.gguf"):
            assert d is not None
            desc = (
                f"the run's selected refusal direction as a llama.cpp control vector (direction."
                f"{cvec_layer(d.layer)}, added to the output of block {cvec_layer(d.layer)} = resid_pre[{d.layer}])"
            )
        elif p.suffix == ".gguf":
            how = "copied byte for byte from the source GGUF" if source else "converted by llama.cpp"
            desc = f"GGUF; edited tensors in {opts.gguf_type.upper()}, every other tensor {how}"
        else:
            desc = "transformers checkpoint (safetensors), loads with `AutoModelForCausalLM.from_pretrained`"
        files.append(CardFile(p.name if p != result.folder else ".", desc))
    return files


def _usage(result: ExportResult, opts: ExportOptions) -> str:
    lines = ["## Usage", ""]
    for p in result.files:
        if p.name.endswith("-refusal-cvec.gguf"):
            lines += [
                "With the *original* model in llama.cpp, subtract refusal at run time, or add it:",
                "",
                f"    llama-cli -m ORIGINAL.gguf --control-vector-scaled {p.name} -1.0",
                f"    llama-cli -m ORIGINAL.gguf --control-vector-scaled {p.name} 1.0",
                "",
            ]
        elif p.suffix == ".gguf":
            lines += [
                "In llama.cpp (or Ollama / LM Studio, which import GGUF files):",
                "",
                f"    llama-cli -m {p.name} -cnv",
                "",
            ]
        else:
            lines += [
                "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                'model = AutoModelForCausalLM.from_pretrained("PATH")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH")',
                "```",
                "",
            ]
    return "\n".join(lines)


def run_export_cli(args: argparse.Namespace) -> int:
    """The command: options from the flags (and --config / environment), then ``run_export``."""
    from refusalkit.options import options_from_args

    opts = options_from_args(args, ExportOptions)
    run_dir = getattr(args, "run_dir", None) or getattr(args, "out", None)
    if run_dir is None:
        raise RefusalkitError("`refusalkit export` needs a run folder: pass RUN_DIR")
    result = run_export(run_dir, opts)
    for p in result.files:
        print(f"wrote {p} ({result.size_bytes[p.name] / 1e6:.1f} MB)")
    print(f"card: {result.folder / 'README.md'}  (export took {result.seconds['export']:.1f} s)")
    if result.url:
        print(f"pushed: {result.url}")
    return 0
