"""refusalkit: find, measure and edit the refusal direction of chat language models.

The method is Arditi et al., "Refusal in Language Models Is Mediated by a Single Direction"
(NeurIPS 2024). The main entry points are re-exported here; see README.md for the tour.
"""

from refusalkit.directions import Candidates, Direction
from refusalkit.interventions import ablate_direction, add_direction
from refusalkit.models import load_model
from refusalkit.orthogonalize import orthogonalize_weights, orthogonalized

__version__ = "0.1.0"

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
