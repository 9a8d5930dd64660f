"""ResNet-18 / ResNet-50-size multi-task models for benchmarks (no torchvision needed).

``multitask_resnet(depth, tasks)`` builds the standard ResNet trunk (BasicBlock for 18/34, Bottleneck for
50/101/152, BatchNorm everywhere, the usual widths 64-128-256-512 and expansion 4 for Bottleneck) followed by
one linear head per task; ``forward(x)`` returns ``{task: logits}``. The trunk's parameter names follow
torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ...), so layer names in a profile
read like a torchvision ResNet's. ``stem="cifar"`` (default: 3x3 stride-1 first conv, no max-pool) suits 32x32
images; ``stem="imagenet"`` is the 7x7 stride-2 conv plus max-pool of the original.

``make_batches`` and ``make_losses`` give matching synthetic data and per-task cross-entropy losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.downsample = _shortcut(in_ch, ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class MultiTaskResNet(nn.Module):
    """A ResNet trunk (shared by every task) and one ``nn.Linear`` head per task in ``heads``."""

    def __init__(
        self,
        depth: int = 18,
        tasks: Sequence[str] | int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
        stem: str = "cifar",
        width: int = 64,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth {depth} is not one of {sorted(DEPTHS)}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem {stem!r} must be 'cifar' or 'imagenet'")
        kind, counts = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.tasks = task_names(tasks)
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        in_ch = width
        stages = []
        for s, n in enumerate(counts):
            ch = width * 2**s
            blocks = []
            for b in range(n):
                blocks.append(block(in_ch, ch, stride=2 if (s > 0 and b == 0) else 1))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.features = in_ch
        self.heads = nn.ModuleDict({t: nn.Linear(in_ch, num_classes) for t in self.tasks})
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: head(z) for t, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk's parameters (everything but the heads)."""
        return [p for n, p in self.named_parameters() if not n.startswith("heads.")]


def task_names(tasks: Sequence[str] | int) -> list[str]:
    """``3`` -> ``["t0", "t1", "t2"]``; a sequence of names is kept as is."""
    return [f"t{k}" for k in range(tasks)] if isinstance(tasks, int) else list(tasks)


def multitask_resnet(depth: int = 18, tasks: Sequence[str] | int = 2, **kwargs) -> MultiTaskResNet:
    """``MultiTaskResNet(depth, tasks, **kwargs)``: ResNet-18 by default (11.2M trunk parameters)."""
    return MultiTaskResNet(depth, tasks, **kwargs)


def make_batches(
    n: int,
    tasks: Sequence[str] | int,
    *,
    batch: int = 16,
    image: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``n`` synthetic ``(images, {task: labels})`` batches (Gaussian images, uniform labels)."""
    names = task_names(tasks)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, channels, image, image, generator=g)
        y = {t: torch.randint(0, num_classes, (batch,), generator=g) for t in names}
        out.append((x.to(device), {t: v.to(device) for t, v in y.items()}))
    return out


def make_losses(tasks: Sequence[str] | int) -> dict[str, nn.Module]:
    """``{task: nn.CrossEntropyLoss()}``."""
    return {t: nn.CrossEntropyLoss() for t in task_names(tasks)}
