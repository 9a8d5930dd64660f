"""LibMTL-style architectures (LibMTL itself needs torchvision, which is not installed here), on small ResNets.

They keep what makes LibMTL's models hard to capture: ``forward(self, inputs, task_name=None)`` with a
top-level ``if task_name is not None`` (fx cannot trace it), a torchvision-style ResNet encoder with BatchNorm,
``ReLU(inplace=True)`` and ``out += identity`` (in-place ATen ops under export), experts that are whole ResNets
with a ``hidden_layer`` (Linear, BatchNorm1d, ReLU, Dropout) as in LibMTL's Office-31 example, and
DSelect_k's habit of calling ``backward()`` on a regulariser inside ``forward`` in train mode.

After LibMTL (Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023): ``HPS`` (hard
parameter sharing), ``MMoE`` (Ma et al., KDD 2018, Eq. 5: ``y_k = h_k(sum_i g_k(x)_i f_i(x))``, ``g_k =
softmax(W_k x)``), ``DSelect_k`` (Hazimeh et al., NeurIPS 2021).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tests.models import BasicBlock

TASKS = ("amazon", "dslr", "webcam")
IMAGE = (3, 8, 8)


class ResNetEncoder(nn.Module):
    """A torchvision-style ResNet trunk (stem, two stages, the second downsampling), pooled and flattened."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1)


class Expert(nn.Module):
    """LibMTL's Office-31 encoder: a ResNet, then ``hidden_layer`` (Linear, BatchNorm1d, ReLU, Dropout)."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.resnet_network = ResNetEncoder()
        self.hidden_layer = nn.Sequential(
            nn.Linear(self.resnet_network.out_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.5)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.hidden_layer(self.resnet_network(inputs))


class _Architecture(nn.Module):
    def __init__(self, tasks: Sequence[str], hidden: int) -> None:
        super().__init__()
        self.task_name = list(tasks)
        self.decoders = nn.ModuleDict({t: nn.Linear(hidden, 3) for t in tasks})


class HPS(_Architecture):
    """Hard parameter sharing: one encoder, one decoder per task."""

    def __init__(self, tasks: Sequence[str] = TASKS, hidden: int = 8) -> None:
        super().__init__(tasks, hidden)
        self.encoder = Expert(hidden)

    def forward(self, inputs: torch.Tensor, task_name: str | None = None) -> dict[str, torch.Tensor]:
        out = {}
        s_rep = self.encoder(inputs)
        for task in self.task_name:
            if task_name is not None and task != task_name:
                continue
            out[task] = self.decoders[task](s_rep)
        return out


class MMoE(_Architecture):
    """Multi-gate mixture of experts with ResNet experts (LibMTL's ``MMoE``)."""

    def __init__(self, tasks: Sequence[str] = TASKS, hidden: int = 8, experts: int = 2) -> None:
        super().__init__(tasks, hidden)
        size = IMAGE[0] * IMAGE[1] * IMAGE[2]
        self.experts_shared = nn.ModuleList([Expert(hidden) for _ in range(experts)])
        self.gate_specific = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(size, experts), nn.Softmax(dim=-1)) for t in tasks}
        )

    def forward(self, inputs: torch.Tensor, task_name: str | None = None) -> dict[str, torch.Tensor]:
        experts_shared_rep = torch.stack([e(inputs) for e in self.experts_shared])
        out = {}
        for task in self.task_name:
            if task_name is not None and task != task_name:
                continue
            selector = self.gate_specific[task](torch.flatten(inputs, start_dim=1))
            gate_rep = torch.einsum("ij..., ji -> j...", experts_shared_rep, selector)
            out[task] = self.decoders[task](gate_rep)
        return out


class DSelectK(MMoE):
    """A DSelect_k-like gate whose forward, in train mode, calls ``backward()`` on an entropy regulariser of
    the gates (as LibMTL's ``DSelect_k`` does): a forward that really differs between train and eval mode."""

    def forward(self, inputs: torch.Tensor, task_name: str | None = None) -> dict[str, torch.Tensor]:
        out = super().forward(inputs, task_name)
        if self.training:
            selector = self.gate_specific[self.task_name[0]](torch.flatten(inputs, start_dim=1))
            entropy = -(selector * torch.log(selector + 1e-6)).sum(-1).mean()
            entropy.backward(retain_graph=True)
        return out


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *IMAGE, generator=torch.Generator().manual_seed(seed))
