"""Reading a run folder: its settings, direction, candidates, splits, the search's front and choice, and
the run's ACTIVE edit, each through ``RunFolder``, with one error per missing piece, worded once.

Every command that works on a finished run (chat, serve, export, optimize, suffix, report, the model
card) reads it here, so a run means the same thing to all of them:

- **settings**: one precedence for every command, the one ``options.py`` defines: defaults < the run's
  saved settings (manifest.json) < TOML (``--config``) < ``REFUSALKIT_*`` environment < flags.
- **the active edit**: the search's choice when search/chosen.json exists (``refusalkit optimize``),
  else the paper's direction, orthogonalized. Every command uses it unless ``--edit`` says otherwise,
  with one spelling everywhere: ``--edit direction`` (the paper's), ``--edit search`` (the search's
  choice) or ``--edit trial:N`` (trial N of the search's front). ``--edit calibrate`` names the
  calibration chosen last (calibrate/calibrated.json): ``refusalkit calibrate``'s false-refusal vector,
  orthogonalized, or ``refusalkit optimize --goal calibrate``'s choice, the vector at per-layer weights
  (calibrate/search/chosen.*); it is never the default.

Importing this module is cheap (options classes inherit ``EditOption``); the readers import torch and
the search code when they run.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, field_validator

from refusalkit.errors import RefusalkitError
from refusalkit.layout import RunLayout

if TYPE_CHECKING:
    from torch import nn

    from refusalkit.directions import Candidates, Direction
    from refusalkit.edits import Target
    from refusalkit.manifest import Manifest
    from refusalkit.models.loading import LoadedModel
    from refusalkit.search.edit import EditParams
    from refusalkit.settings import Settings

EDIT_HELP = (
    "Which edit: direction (the paper's direction, orthogonalized), search (the edit `refusalkit optimize` "
    "chose, search/chosen.json), trial:N (trial N of the search's front) or calibrate (the false-refusal "
    "vector `refusalkit calibrate` chose, calibrate/calibrated.json); default: the run's active "
    "edit, the search's choice when there is one, else the direction."
)
EDIT_KINDS = ("direction", "search", "calibrate")


@dataclass(frozen=True)
class EditChoice:
    """A parsed ``--edit``: kind None means the run's active edit."""

    kind: str | None = None
    trial: int | None = None


def parse_edit_choice(text: str | None) -> EditChoice:
    """``None`` (the active edit), ``direction``, ``search`` or ``trial:N``."""
    if text is None:
        return EditChoice()
    t = text.strip()
    if t in EDIT_KINDS:
        return EditChoice(t)
    name, sep, number = t.partition(":")
    if name == "trial" and sep and number.strip().isdigit():
        return EditChoice("search", int(number))
    raise RefusalkitError(
        f"--edit {text!r}: use direction, search or trial:N (N a trial number), or calibrate"
    )


class EditOption(BaseModel):
    """The ``--edit`` option, one definition for every command that takes it (chat, serve, export):
    options classes inherit it."""

    edit: str | None = Field(None, description=EDIT_HELP)

    @field_validator("edit")
    @classmethod
    def _known_edit(cls, v: str | None) -> str | None:
        try:
            parse_edit_choice(v)
        except RefusalkitError as exc:
            raise ValueError(str(exc)) from None
        return v


@dataclass(frozen=True)
class ActiveEdit:
    """One edit of a run: the paper's direction (orthogonalized), a searched edit (a trial) or the
    calibration (the false-refusal vector in ``direction``, orthogonalized).

    ``record`` is the search's record of the trial (its edit, proxy and verified numbers) from
    search/front.json, else search/chosen.json, or the calibration's record (its vector's JSON, with
    the validation numbers); ``record_path`` says which.
    """

    kind: str  # "direction" | "search" | "calibrate"
    direction: Direction | None
    params: EditParams | None = None
    trial: int | None = None
    chosen: bool = False  # the search's choice (search/chosen.json), not a trial named by number
    candidates: Candidates | None = None
    record: dict[str, Any] | None = None
    record_path: Path | None = None

    @property
    def label(self) -> str:
        """What the edit is, in the words the chat banner, the page, the card and the report use."""
        if self.kind == "direction":
            d = self.direction
            assert d is not None
            return f"orthogonalized weights (the paper's direction: layer {d.layer}, position {d.position})"
        if self.kind == "calibrate":
            d = self.direction
            assert d is not None
            lam = d.meta.get("lam")
            how = "orthogonalized weights"
            if d.meta.get("weights") is not None:  # `refusalkit optimize --goal calibrate`'s choice
                how = f"per-layer weights, the calibration search's trial {d.meta.get('trial')}"
            return (
                f"the calibration (the false-refusal vector, layer {d.layer}, position {d.position}, "
                f"lambda {lam:g}, {how})"
            )
        if self.chosen:
            return "the search's chosen edit" + (f" (trial {self.trial})" if self.trial is not None else "")
        return f"the search's trial {self.trial}"

    @property
    def choice(self) -> str:
        """The ``--edit`` value that selects this edit again."""
        if self.kind in ("direction", "calibrate"):
            return self.kind
        return "search" if self.chosen else f"trial:{self.trial}"

    def apply(self, lm: LoadedModel) -> AbstractContextManager[Any]:
        """The edit on ``lm``'s weights for the duration of a ``with`` block, restored bit for bit after."""
        if self.kind == "calibrate":  # one vector off every residual write, or off each at its weight
            from refusalkit.calibrate.edit import applied

            assert self.direction is not None
            return applied(lm, self.direction)
        if self.kind == "direction":
            from refusalkit.orthogonalize import orthogonalized

            assert self.direction is not None
            return orthogonalized(lm, self.direction.vector)
        from refusalkit.search.edit import applied_edit

        assert self.candidates is not None and self.params is not None
        return applied_edit(lm, self.candidates, self.params)

    def targets(self, lm: LoadedModel) -> list[Target]:
        """The edit as the edit core's targets on ``lm``'s modules, the list ``apply`` edits: for a
        writer that applies them elsewhere (the streamed export edits tensors read from the source)."""
        if self.kind == "calibrate":
            from refusalkit.calibrate.edit import targets as calibration

            assert self.direction is not None
            return calibration(lm.arch, self.direction.vector, self.direction.meta.get("weights"))
        if self.kind == "direction":
            from refusalkit.orthogonalize import targets as everywhere

            assert self.direction is not None
            return everywhere(lm.arch, self.direction.vector)
        from refusalkit.search.edit import plan

        assert self.candidates is not None and self.params is not None
        return plan(lm, self.candidates, self.params)

    def modules(self, lm: LoadedModel) -> list[nn.Module] | None:
        """The modules the edit changes (None: every residual write, as orthogonalization edits)."""
        if self.kind == "calibrate":
            from refusalkit.calibrate.edit import modules

            assert self.direction is not None
            return modules(lm, self.direction)
        if self.kind == "direction":
            return None
        from refusalkit.search.edit import plan

        assert self.candidates is not None and self.params is not None
        return [t.module for t in plan(lm, self.candidates, self.params)]


class RunFolder:
    """A run folder, read through its ``RunLayout`` and ``Manifest``. Each reader raises one
    ``RefusalkitError`` naming what is missing and the command that makes it."""

    def __init__(self, run_dir: str | Path | RunLayout) -> None:
        self.layout = run_dir if isinstance(run_dir, RunLayout) else RunLayout(run_dir)
        self._manifest: Manifest | None = None

    @property
    def root(self) -> Path:
        return self.layout.root

    def missing(self, what: str, path: Path, command: str) -> RefusalkitError:
        """The one wording of a missing piece: what, where, and the command that makes it."""
        rel = path.relative_to(self.root) if path.is_relative_to(self.root) else path
        return RefusalkitError(
            f"{self.root} has no {what} ({rel} is missing); run `refusalkit {command} {self.root}` first"
        )

    # ---- the manifest and settings --------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            if not self.layout.manifest.is_file():
                raise RefusalkitError(
                    f"{self.root} is not a run folder (no manifest.json); give a folder `refusalkit run --out` "
                    f"wrote, or start one with `refusalkit run --out {self.root}`"
                )
            from refusalkit.manifest import Manifest

            self._manifest = Manifest(self.layout)
        return self._manifest

    def has_settings(self) -> bool:
        """Whether a stage of this run finished and saved the run's settings (manifest.json)."""
        return self.layout.manifest.is_file() and bool(self.manifest.settings)

    def settings(self, flags: Mapping[str, Any] | None = None, config: str | Path | None = None) -> Settings:
        """The run's settings: defaults < saved settings < ``config`` (TOML) < environment < ``flags``."""
        from refusalkit.settings import build_settings

        return build_settings(flags, config, base=self.manifest.settings)

    # ---- stage artifacts ---------------------------------------------------------------------------------
    def has_direction(self) -> bool:
        return self.layout.direction.with_suffix(".json").is_file()

    def direction(self) -> Direction:
        from refusalkit.directions import Direction

        if not self.has_direction():
            raise self.missing("selected direction", self.layout.direction.with_suffix(".json"), "select")
        return Direction.load(self.layout.direction)

    def candidates(self) -> Candidates:
        from refusalkit.directions import Candidates

        if not self.layout.candidates.is_file():
            raise self.missing("candidates", self.layout.candidates, "extract")
        return Candidates.load(self.layout.candidates)

    def splits(self) -> dict[str, list[str]]:
        """Split name -> instructions (data/splits.json)."""
        from refusalkit.utils import read_json

        if not self.layout.splits.is_file():
            raise self.missing("splits", self.layout.splits, "extract")
        return dict(read_json(self.layout.splits)["splits"])

    # ---- the search ------------------------------------------------------------------------------------
    def front(self) -> dict[str, Any]:
        """search/front.json: the Pareto front with proxy and verified numbers, and the chosen trial."""
        from refusalkit.utils import read_json

        if not self.layout.front.is_file():
            raise self.missing("search front", self.layout.front, "optimize")
        return dict(read_json(self.layout.front))

    def chosen(self) -> dict[str, Any]:
        """search/chosen.json: the trial ``refusalkit optimize`` chose, with its edit (validated)."""
        from refusalkit.search.edit import EditParams
        from refusalkit.utils import read_json

        if not self.layout.chosen.is_file():
            raise self.missing("chosen edit", self.layout.chosen, "optimize")
        try:
            record = dict(read_json(self.layout.chosen))
            EditParams.model_validate(record["edit"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RefusalkitError(
                f"{self.layout.chosen} holds no readable edit ({type(exc).__name__}: {exc}); rerun "
                f"`refusalkit optimize {self.root}`, or pass --edit direction"
            ) from None
        return record

    def _trial_record(self, trial: int) -> tuple[dict[str, Any], Path]:
        """Trial ``trial``'s record: its front point (search/front.json) or, for the chosen trial off
        the front, search/chosen.json."""
        front = self.front() if self.layout.front.is_file() or not self.layout.chosen.is_file() else {}
        for p in front.get("points", []):
            if p.get("trial") == trial:
                return dict(p), self.layout.front
        if self.layout.chosen.is_file() and self.chosen().get("trial") == trial:
            return self.chosen(), self.layout.chosen
        on = sorted(p.get("trial") for p in front.get("points", []))
        raise RefusalkitError(
            f"trial {trial} is not on the search front of {self.root} (on it: {on}); choose it with "
            f"`refusalkit optimize {self.root} --trial {trial}` and pass --edit search"
        )

    def calibration(self) -> ActiveEdit:
        """The calibration ``refusalkit calibrate`` chose last (calibrate/calibrated.json -> its vector)."""
        from refusalkit.directions import Direction
        from refusalkit.utils import read_json

        if not self.layout.calibrated.is_file():
            raise self.missing("calibration", self.layout.calibrated, "calibrate")
        stem = self.layout.calibrate_dir / str(read_json(self.layout.calibrated)["stem"])
        vector = Direction.load(stem)
        return ActiveEdit(
            "calibrate", vector, record=dict(vector.meta), record_path=stem.with_suffix(".json")
        )

    # ---- the active edit --------------------------------------------------------------------------------
    def active_edit(self, choice: str | None = None) -> ActiveEdit:
        """The edit ``choice`` (an ``--edit`` value) names; None: the search's choice when there is
        one, else the paper's direction."""
        from refusalkit.search.edit import EditParams

        c = parse_edit_choice(choice)
        _ = self.manifest  # a folder no run wrote says so first, not "no direction"
        kind = c.kind or ("search" if self.layout.chosen.is_file() else "direction")
        if kind == "direction":
            return ActiveEdit("direction", self.direction())
        if kind == "calibrate":
            return self.calibration()
        chosen = c.trial is None
        trial = int(self.chosen()["trial"]) if chosen else c.trial
        assert trial is not None
        record, path = self._trial_record(trial)
        return ActiveEdit(
            "search",
            self.direction() if self.has_direction() else None,
            params=EditParams.model_validate(record["edit"]),
            trial=trial,
            chosen=chosen or (self.layout.chosen.is_file() and self.chosen().get("trial") == trial),
            candidates=self.candidates(),
            record=record,
            record_path=path,
        )


__all__ = ["EDIT_HELP", "ActiveEdit", "EditChoice", "EditOption", "RunFolder", "parse_edit_choice"]
