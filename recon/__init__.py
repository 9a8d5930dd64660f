"""recon: find the shared layers where multi-task gradients conflict, branch them, retrain.

After "Recon: Reducing Conflicting Gradients From the Root for Multi-Task Learning" (Shi et al., ICLR 2023).
"""

from recon._errors import NonFiniteLossError, ReconError
from recon._profile import ConflictProfile, profile, read_scores_json
from recon._recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "ConflictProfile",
    "NonFiniteLossError",
    "Recipe",
    "ReconError",
    "load_recipe",
    "profile",
    "read_scores_json",
]
