"""refusalkit: find, measure and edit the refusal direction of chat language models.

The method is Arditi et al., "Refusal in Language Models Is Mediated by a Single Direction"
(NeurIPS 2024). The main entry points are re-exported here; see README.md for the tour.

The re-exports are resolved on first use (PEP 562), so importing the package, as the `refusalkit`
command does before it knows which subcommand runs, loads no torch: `refusalkit --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refusalkit.utils import lazy_exports

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "Candidates": "refusalkit.directions",
    "Direction": "refusalkit.directions",
    "ablate_direction": "refusalkit.interventions",
    "add_direction": "refusalkit.interventions",
    "load_model": "refusalkit.models",
    "orthogonalize_weights": "refusalkit.orthogonalize",
    "orthogonalized": "refusalkit.orthogonalize",
}

__all__ = [
    "Candidates",
    "Direction",
    "__version__",
    "ablate_direction",
    "add_direction",
    "load_model",
    "orthogonalize_weights",
    "orthogonalized",
]

if TYPE_CHECKING:
    from refusalkit.directions import Candidates, Direction
    from refusalkit.interventions import ablate_direction, add_direction
    from refusalkit.models import load_model
    from refusalkit.orthogonalize import orthogonalize_weights, orthogonalized


__getattr__ = lazy_exports("refusalkit", _EXPORTS, globals())
