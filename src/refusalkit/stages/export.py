"""The export stage: the edited model as a checkpoint in the run folder (RUN_DIR/model).

One writer per ``--format`` (settings.EXPORT_FORMATS); safetensors writes an ordinary transformers
folder with the paper's direction orthogonalized, and its model card, through the exporter's one writer
of RUN_DIR/model (``export.cli.write_model``; the stage runs before any search, so it exports the
direction, not a searched edit). A model whose weights cannot be orthogonalized exactly (post-norm
families) is recorded as skipped, so a rerun does not load it again to find that out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from refusalkit.directions import Direction
from refusalkit.layout import RunLayout
from refusalkit.manifest import SkipStage
from refusalkit.models.loading import LoadedModel
from refusalkit.settings import Settings


def _safetensors(lm: LoadedModel, s: Settings, layout: RunLayout) -> Path:
    from refusalkit.export.cli import write_model

    return write_model(layout.root, lm, edit="direction", settings=s)


# format -> writer; a new format adds its writer here and its name to settings.EXPORT_FORMATS.
WRITERS: dict[str, Callable[[LoadedModel, Settings, RunLayout], Path]] = {"safetensors": _safetensors}
# format -> the file whose presence means the export finished
DONE_FILE: dict[str, Callable[[RunLayout], Path]] = {
    "safetensors": lambda layout: layout.model_dir / "config.json"
}


def inputs(select_fingerprint: str, s: Settings) -> dict[str, Any]:
    return {"select": select_fingerprint, "format": s.export_format}


def artifacts(layout: RunLayout, s: Settings) -> list[Path]:
    return [DONE_FILE[s.export_format](layout)]


def export(lm: LoadedModel, direction: Direction, s: Settings, layout: RunLayout) -> Path:
    if not lm.arch.spec.weights_orthogonalizable:
        raise SkipStage(f"{lm.arch.model_type} weights cannot be orthogonalized exactly (post-norm family)")
    del direction  # the writer reads it from the run folder, where select saved it
    return WRITERS[s.export_format](lm, s, layout)


def load(layout: RunLayout, s: Settings) -> Path | None:
    done = DONE_FILE[s.export_format](layout)
    return done.parent if done.exists() else None
