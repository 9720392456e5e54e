"""The splits of a run (data/splits.json): seeded, disjoint samples of the instruction sets.

They are cached under a fingerprint of the sources' content (not their names), the sizes and the seed,
so an edited data file gives new splits and an unchanged one is never resampled.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from refusalkit.data import carve
from refusalkit.layout import RunLayout
from refusalkit.manifest import fingerprint
from refusalkit.settings import Settings
from refusalkit.stages.common import content_fingerprint
from refusalkit.utils import read_json, sha256_text, write_json

SPLITS = ("harmful_train", "harmful_val", "harmful_test", "harmless_train", "harmless_val", "harmless_test")


@dataclass(frozen=True)
class Splits(Mapping[str, list[str]]):
    """Split name -> instructions, with where each came from."""

    sets: dict[str, list[str]]
    specs: dict[str, str]

    def __getitem__(self, name: str) -> list[str]:
        return self.sets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sets)

    def __len__(self) -> int:
        return len(self.sets)

    def sha256(self, name: str) -> str:
        return sha256_text("\n".join(self.sets[name]))

    def describe(self) -> dict[str, Any]:
        """The manifest's ``data`` section: spec, size and content hash of every split."""
        return {
            k: {"spec": self.specs[k], "n": len(v), "sha256": self.sha256(k)} for k, v in self.sets.items()
        }


def split_specs(s: Settings) -> dict[str, tuple[str, int]]:
    """Split name -> (data spec, size); validation and test sets default to the training source."""
    return {
        "harmful_train": (s.harmful_train, s.n_train),
        "harmful_val": (s.harmful_val or s.harmful_train, s.n_val),
        "harmful_test": (s.harmful_test or s.harmful_train, s.n_test),
        "harmless_train": (s.harmless_train, s.n_train),
        "harmless_val": (s.harmless_val or s.harmless_train, s.n_val),
        "harmless_test": (s.harmless_test or s.harmless_train, s.n_test),
    }


def load_splits(layout: RunLayout, settings: Settings) -> Splits:
    """The run's splits: read back when their sources, sizes and seed are unchanged, else drawn anew."""
    spec = split_specs(settings)
    contents = {src: content_fingerprint(src) for src, _ in spec.values()}
    fp = fingerprint(
        {k: [v[0], contents[v[0]], v[1]] for k, v in spec.items()} | {"seed": settings.seed, "v": 2}
    )
    saved = read_json(layout.splits) if layout.splits.is_file() else {}
    if saved.get("fingerprint") == fp:
        sets = dict(saved["splits"])
    else:
        sets = carve(spec, settings.seed)
        write_json(layout.splits, {"fingerprint": fp, "splits": sets})
    return Splits(sets, {k: v[0] for k, v in spec.items()})
