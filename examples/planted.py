"""Planted conflict: a recipe whose ground truth is known, the unit test of the whole idea.

The data are clearly generated (no real-world claim): ``x`` is a 16-dimensional standard Gaussian, and two
tasks read disjoint parts of it through fixed orthonormal directions ``U`` and ``V`` (``U^T V = 0``):

* task ``a`` regresses ``y_a = U^T x + noise`` (2 outputs),
* task ``b`` regresses ``y_b = V^T x + noise`` (2 outputs).

The model's first layer, ``neck``, is a 2-unit linear bottleneck shared by both tasks: it can carry two
directions of ``x`` but the tasks need four, so whatever one task gains there the other loses. Every other
shared layer (``mix``, ``post``) sits after the bottleneck and is wide enough to decode both tasks at once, so
it is not contested; ``post`` is the shared layer nearest the outputs, so "deeper heads" (branching the last
shared layers) would miss the conflict, and ``mix`` has exactly the neck's number of parameters (32), the
random layer of the same size.

Ground truth, fixed before any profile was run: :data:`PLANTED` (``"neck"``) is the contested layer; a
per-task copy of it lets each task keep its own two directions and closes the gap to the single-task models
(both reach the noise floor), while branching ``mix`` or ``post`` cannot recover what the neck dropped.

    recon profile examples/planted.py --steps 300 && recon split --top-k 1 --score interference
    recon train examples/planted.py --epochs 3
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

TASKS = ("a", "b")
PLANTED = "neck"  # the contested layer (ground truth)
SAME_SIZE = ("mix",)  # the other shared layers with the planted layer's parameter count
NEAREST_OUTPUTS = "post"  # the shared layer "deeper heads" would branch first
D_IN, NECK, WIDTH, OUT = 16, 2, 16, 2
NOISE = 0.1
BATCH_SIZE = int(os.environ.get("RECON_PLANTED_BATCH", 64))
N_TRAIN = int(os.environ.get("RECON_PLANTED_TRAIN", 4096))
N_VAL = int(os.environ.get("RECON_PLANTED_VAL", 1024))


@functools.lru_cache(maxsize=1)
def directions() -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` and ``V``, ``(D_IN, OUT)`` each, orthonormal columns, ``U^T V = 0`` (a fixed QR)."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((D_IN, 2 * OUT)))
    q = torch.from_numpy(q.astype(np.float32))
    return q[:, :OUT], q[:, OUT:]


@functools.lru_cache(maxsize=4)
def make_data(split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` inputs ``(n, D_IN)`` and both tasks' targets ``(n, OUT)``, train and validation drawn apart."""
    g = torch.Generator().manual_seed(2 * seed + (split != "train"))
    x = torch.randn(n, D_IN, generator=g)
    U, V = directions()
    return x, x @ U + NOISE * torch.randn(n, OUT, generator=g), x @ V + NOISE * torch.randn(n, OUT, generator=g)


class PlantedNet(nn.Module):
    """``neck`` (16 -> 2, the bottleneck both tasks contest) -> ``mix`` (2 -> 16) -> ReLU -> ``post``
    (16 -> 16) -> ReLU -> one linear head per task; returns ``{task: prediction}``."""

    def __init__(self, tasks: tuple[str, ...] = TASKS) -> None:
        super().__init__()
        self.neck = nn.Linear(D_IN, NECK, bias=False)
        self.mix = nn.Linear(NECK, WIDTH, bias=False)
        self.post = nn.Linear(WIDTH, WIDTH)
        self.heads = nn.ModuleDict({t: nn.Linear(WIDTH, OUT) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.post(F.relu(self.mix(self.neck(x)))))
        return {t: head(h) for t, head in self.heads.items()}


def build_model() -> nn.Module:
    return PlantedNet()


losses = {t: F.mse_loss for t in TASKS}


def mse(output: torch.Tensor, target: torch.Tensor) -> float:
    return F.mse_loss(output, target).item()


metrics = {t: {"mse": (mse, "lower")} for t in TASKS}


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


class _Targets(TensorDataset):
    def __getitem__(self, i: int):
        x, ya, yb = super().__getitem__(i)
        return x, {"a": ya, "b": yb}


def loader(split: str, n: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = _Targets(*make_data(split, n))
    return DataLoader(data, batch_size=BATCH_SIZE, shuffle=shuffle, drop_last=shuffle, generator=g)


def train_data() -> DataLoader:
    return loader("train", N_TRAIN, shuffle=True)


def val_data() -> DataLoader:
    return loader("val", N_VAL, shuffle=False)
