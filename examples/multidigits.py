"""MultiDigits: a recon recipe in the spirit of the paper's Multi-Fashion+MNIST, on real offline data.

Two handwritten digits from scikit-learn's bundled ``load_digits`` (1797 real 8x8 scans, no download) are
placed side by side on a 10x14 canvas with their columns overlapping and a random vertical jitter; the tasks
are the left digit and the right digit (10 classes each). Train and validation pairs are drawn from disjoint
halves of the digit scans, so validation digits are never seen in training.

The model is a small ResNet-style CNN with BatchNorm (stem, three residual blocks, one of them downsampling)
and a two-layer head per task.

    recon profile examples/multidigits.py && recon split --top-k 4 && recon train examples/multidigits.py
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

TASKS = ("left", "right")
CANVAS = (10, 14)
OVERLAP = 2  # columns shared by the two digits
BATCH_SIZE = int(os.environ.get("RECON_DIGITS_BATCH", 64))
N_TRAIN = int(os.environ.get("RECON_DIGITS_TRAIN", 4096))
N_VAL = int(os.environ.get("RECON_DIGITS_VAL", 1024))


@functools.lru_cache(maxsize=4)
def make_pairs(split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` two-digit images ``(n, 1, 10, 14)`` in [0, 1] and labels ``(n, 2)`` from one half of the scans."""
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(images))  # fixed: the same halves every time
    half = order[: len(order) * 3 // 4] if split == "train" else order[len(order) * 3 // 4 :]
    rng = np.random.default_rng(seed if split == "train" else seed + 1)
    a, b = rng.choice(half, size=n), rng.choice(half, size=n)
    canvas = np.zeros((n, *CANVAS), dtype=np.float32)
    rows = rng.integers(0, CANVAS[0] - 8 + 1, size=(n, 2))
    left_col, right_col = 0, CANVAS[1] - 8
    assert right_col == 8 - OVERLAP
    for i in range(n):
        r0, r1 = rows[i]
        canvas[i, r0 : r0 + 8, left_col : left_col + 8] = images[a[i]]
        right = canvas[i, r1 : r1 + 8, right_col : right_col + 8]
        np.maximum(right, images[b[i]], out=right)  # overlapping strokes merge, as in Multi-MNIST
    x = torch.from_numpy(canvas).unsqueeze(1)
    x = (x - 0.5) / 0.5
    y = torch.from_numpy(np.stack([labels[a], labels[b]], axis=1))
    return x, y


class TaskTargets(TensorDataset):
    """Yields ``(image, {task: label})`` so the default collate builds the recipe's target dict."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, tasks: tuple[str, ...]) -> None:
        super().__init__(x, y)
        self.tasks = tasks

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x, {t: y[k] for k, t in enumerate(self.tasks)}


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2016): conv-BN-ReLU-conv-BN plus identity or 1x1 downsample."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class MultiDigitNet(nn.Module):
    """Shared ResNet-style trunk, one MLP head per task; returns ``{task: logits}``."""

    def __init__(
        self, tasks: tuple[str, ...] = TASKS, width: int = 16, n_classes: int | dict = 10, hidden: int | None = None
    ) -> None:
        super().__init__()
        hidden = 4 * width if hidden is None else hidden  # the shared fc's width (the heads' input)
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True))
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width * 1, hidden)
        classes = n_classes if isinstance(n_classes, dict) else dict.fromkeys(tasks, n_classes)
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, classes[t])) for t in tasks}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        z = F.relu(self.fc(torch.flatten(self.pool(h), 1)))
        return {t: head(z) for t, head in self.heads.items()}


def build_model(width: int = 16, hidden: int | None = None) -> nn.Module:
    """The recipe's model; ``width`` (trunk channels) and ``hidden`` (shared fc width, default ``4 * width``)
    build wider or narrower ones (the width-matched rows of ``benchmarks/evidence.py``)."""
    return MultiDigitNet(width=width, hidden=hidden)


losses = {t: F.cross_entropy for t in TASKS}


def accuracy(output: torch.Tensor, target: torch.Tensor) -> float:
    return (output.argmax(dim=1) == target).float().mean().item()


metrics = {t: {"acc": (accuracy, "higher")} for t in TASKS}


def loader(split: str, n: int, shuffle: bool, tasks: tuple[str, ...] = TASKS, labels=None) -> DataLoader:
    """Batches of ``(images, {task: labels})``; ``labels(y)`` derives extra task columns from ``(n, 2)`` digits."""
    x, y = make_pairs(split, n)
    y = y if labels is None else labels(y)
    return DataLoader(TaskTargets(x, y, tasks), batch_size=BATCH_SIZE, shuffle=shuffle, drop_last=shuffle)


def train_data() -> DataLoader:
    return loader("train", N_TRAIN, shuffle=True)


def val_data() -> DataLoader:
    return loader("val", N_VAL, shuffle=False)
