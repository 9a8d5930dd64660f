"""MultiDigits-3: the MultiDigits recipe with a third task, the sum of the two digits (19 classes).

The sum needs both digits, so it pulls the shared trunk towards features the left/right tasks do not need:
a three-task setting for Recon's conflict scores (3 task pairs per layer). Same data and trunk as
``multidigits.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from multidigits import N_TRAIN, N_VAL, MultiDigitNet, accuracy, loader
from torch import nn
from torch.utils.data import DataLoader

TASKS = ("left", "right", "total")
CLASSES = {"left": 10, "right": 10, "total": 19}


def _labels(y: torch.Tensor) -> torch.Tensor:
    return torch.cat([y, y.sum(dim=1, keepdim=True)], dim=1)


def build_model(width: int = 16, hidden: int | None = None) -> nn.Module:
    """The recipe's model; ``width`` and ``hidden`` as in ``multidigits.build_model``."""
    return MultiDigitNet(TASKS, width=width, n_classes=CLASSES, hidden=hidden)


losses = {t: F.cross_entropy for t in TASKS}
metrics = {t: {"acc": (accuracy, "higher")} for t in TASKS}


def train_data() -> DataLoader:
    return loader("train", N_TRAIN, shuffle=True, tasks=TASKS, labels=_labels)


def val_data() -> DataLoader:
    return loader("val", N_VAL, shuffle=False, tasks=TASKS, labels=_labels)
