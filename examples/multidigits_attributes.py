"""MultiDigits-Attributes: ten binary tasks about the two digits of the MultiDigits canvas (a CelebA-like
many-task setting at CPU scale, on real offline scans).

The tasks come in natural groups: three about the left digit (odd? at least 5? prime?), the same three about
the right digit, and four about both (equal? sum at least 10? left greater? both odd?). Tasks of one group
read the same digit, so they should agree more with each other than with the other groups: the case for
task-group branches (``recon split --groups auto``), where a per-task split would pay nine extra copies of a
layer that two or three groups would do.

Same data, trunk and environment variables as ``multidigits.py`` (``RECON_DIGITS_TRAIN``/``_VAL``/``_BATCH``).

    recon profile examples/multidigits_attributes.py && recon split --budget-params 0.1 --groups auto
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from multidigits import N_TRAIN, N_VAL, MultiDigitNet, accuracy, loader
from torch import nn
from torch.utils.data import DataLoader

PRIMES = torch.tensor([False, False, True, True, False, True, False, True, False, False])
GROUPS = {
    "left": ("left_odd", "left_large", "left_prime"),
    "right": ("right_odd", "right_large", "right_prime"),
    "both": ("equal", "sum_large", "left_greater", "both_odd"),
}
TASKS = tuple(t for group in GROUPS.values() for t in group)


def attributes(y: torch.Tensor) -> torch.Tensor:
    """``(n, 10)`` binary labels, one column per task in :data:`TASKS`, from ``(n, 2)`` digit labels."""
    a, b = y[:, 0], y[:, 1]
    columns = [
        a % 2 == 1,
        a >= 5,
        PRIMES[a],
        b % 2 == 1,
        b >= 5,
        PRIMES[b],
        a == b,
        a + b >= 10,
        a > b,
        (a % 2 == 1) & (b % 2 == 1),
    ]
    return torch.stack(columns, dim=1).long()


def build_model(width: int = 16, hidden: int | None = None) -> nn.Module:
    """The recipe's model; ``width`` and ``hidden`` as in ``multidigits.build_model``."""
    return MultiDigitNet(TASKS, width=width, n_classes=2, hidden=hidden)


losses = {t: F.cross_entropy for t in TASKS}
metrics = {t: {"acc": (accuracy, "higher")} for t in TASKS}


def train_data() -> DataLoader:
    return loader("train", N_TRAIN, shuffle=True, tasks=TASKS, labels=attributes)


def val_data() -> DataLoader:
    return loader("val", N_VAL, shuffle=False, tasks=TASKS, labels=attributes)
