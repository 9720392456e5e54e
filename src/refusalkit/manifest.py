"""manifest.json: what reproduces a run (settings, versions, hardware, model, data hashes) and one record
per finished stage.

``Manifest.stage(name, inputs, artifacts, compute, load)`` is the one place a stage is fingerprinted,
skipped and recorded: when the manifest holds the same fingerprint of ``inputs`` for ``name`` and every
artifact exists, ``load()`` returns the saved result; otherwise ``compute()`` runs (writing its
artifacts) and the stage is recorded with its fingerprint and duration. A stage's ``inputs`` name
everything its result depends on, including the fingerprints of the stages it reads.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from refusalkit.layout import RunLayout
from refusalkit.utils import read_json, sha256_text, write_json

log = logging.getLogger(__name__)
T = TypeVar("T")


def fingerprint(inputs: Any) -> str:
    """A short content hash of JSON-able ``inputs`` (key order does not matter)."""
    return sha256_text(json.dumps(inputs, sort_keys=True, default=str))[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("refusalkit", "torch", "transformers", "accelerate", "safetensors", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


class SkipStage(Exception):
    """Raised by a stage's compute when the stage does not apply (e.g. export of a model whose weights
    cannot be orthogonalized); the message says why."""


class Manifest:
    """The manifest of one run folder; written atomically after every finished stage."""

    def __init__(self, layout: RunLayout) -> None:
        self.path = layout.manifest
        self.data: dict[str, Any] = read_json(self.path) if self.path.is_file() else {}
        self.data.setdefault("stages", {})

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the run was last saved with ({} for a new run folder)."""
        return dict(self.data.get("settings") or {})

    def fingerprint_of(self, stage: str) -> str:
        """The recorded fingerprint of a finished stage ("" if it never finished)."""
        return str(self.data["stages"].get(stage, {}).get("fingerprint", ""))

    def is_done(self, stage: str, fp: str, artifacts: Sequence[Path]) -> bool:
        skipped = "skipped" in self.data["stages"].get(stage, {})
        return self.fingerprint_of(stage) == fp and (skipped or all(p.exists() for p in artifacts))

    def stage(
        self,
        name: str,
        inputs: dict[str, Any],
        artifacts: Sequence[Path],
        compute: Callable[[], T],
        load: Callable[[], T],
    ) -> T | None:
        """``load()`` if ``name`` finished with these ``inputs`` and its artifacts exist, else ``compute()``
        and record it. A ``compute`` that raises ``SkipStage`` is recorded as skipped (with the reason)
        and returns None; a skipped stage needs no artifacts to count as done."""
        fp = fingerprint(inputs)
        if self.is_done(name, fp, artifacts):
            log.info("stage %s: up to date", name)
            return load()
        log.info("stage %s", name)
        t0 = time.perf_counter()
        record: dict[str, Any] = {}
        result: T | None
        try:
            result = compute()
        except SkipStage as skip:
            log.warning("skipping %s: %s", name, skip)
            result, record = None, {"skipped": str(skip)}
        self.data["stages"][name] = {
            "fingerprint": fp,
            "seconds": round(time.perf_counter() - t0, 2),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **record,
        }
        self.save()
        return result

    def update(self, **sections: Any) -> None:
        """Set top-level sections (settings, model, data); written with the next ``save``."""
        self.data.update({k: v for k, v in sections.items() if v is not None})

    def save(self) -> None:
        self.data.update(
            versions=versions(),
            hardware=hardware(),
            updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        write_json(self.path, self.data)
