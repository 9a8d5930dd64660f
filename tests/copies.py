"""A recipe where no split can pay: two tasks that are copies of one another (the same regression target,
each task with its own label noise in training, the clean target for validation).

Both tasks want the same function of ``x``, so a per-task copy of a shared layer only splits the data each copy
learns from (each copy sees one task's noise instead of the average of two): ``recon search`` must say "no
split" here. Small and fast, for tests/test_search.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

TASKS = ("a", "b")
D_IN, HIDDEN, N_TRAIN, N_VAL = 8, 64, 64, 128
NOISE = 1.0  # each task's own label noise in training: a shared layer learns from both, a copy from one


def _data(n: int, seed: int, noisy: bool) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    w = torch.linspace(-1.0, 1.0, D_IN)
    clean = torch.sin(x @ w).unsqueeze(1)
    noise = NOISE if noisy else 0.0
    return TensorDataset(
        x, clean + noise * torch.randn(n, 1, generator=g), clean + noise * torch.randn(n, 1, generator=g)
    )


class _Copies(TensorDataset):
    def __init__(self, data: TensorDataset) -> None:
        super().__init__(*data.tensors)

    def __getitem__(self, i: int):
        x, ya, yb = super().__getitem__(i)
        return x, {"a": ya, "b": yb}


class CopiesNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(HIDDEN, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {t: head(h) for t, head in self.heads.items()}


def build_model() -> nn.Module:
    return CopiesNet()


losses = {t: F.mse_loss for t in TASKS}
metrics = {t: {"mse": (lambda out, y: F.mse_loss(out, y).item(), "lower")} for t in TASKS}


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


def train_data() -> DataLoader:
    return DataLoader(_Copies(_data(N_TRAIN, 0, noisy=True)), batch_size=16, shuffle=True, drop_last=True)


def val_data() -> DataLoader:
    return DataLoader(_Copies(_data(N_VAL, 1, noisy=False)), batch_size=64)
