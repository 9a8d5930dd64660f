"""Small multi-task architectures, one builder per family, for the tests (and any other test that needs one).

Every builder takes the task names and returns a fresh ``nn.Module``; :data:`FAMILIES` pairs each builder with
an input maker and says whether the forward returns a dict (names its tasks) or a tuple (positions follow
``tasks``). The models are small enough to run in milliseconds on a CPU and contain no dropout, so a
training-mode forward is deterministic.

>>> fam = FAMILIES["resnet"]
>>> model = fam.build(TASKS)
>>> out = model(fam.inputs(batch=2))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TASKS: tuple[str, ...] = ("seg", "depth")
TASKS3: tuple[str, ...] = ("seg", "depth", "normal")


# ------------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """A Linear/ReLU trunk with one Linear head per task; dict output."""

    def __init__(self, tasks: Sequence[str] = TASKS, d_in: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, 2) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {t: head(h) for t, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu(in place)-conv-bn, ``out += identity``, optional downsample."""

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
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A small ResNet (stem, two stages of BasicBlocks, the second downsampling) with per-task linear heads."""

    def __init__(self, tasks: Sequence[str] = TASKS, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleDict({t: nn.Linear(2 * width, classes) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        h = torch.flatten(self.pool(x), 1)
        return {t: head(h) for t, head in self.heads.items()}


# ------------------------------------------------------------------------------------- encoder-decoder
def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """SegNet/U-Net style: a two-level encoder, a decoder with skip connections (concatenation) and
    ``F.interpolate`` upsampling, and one dense 1x1-conv head per task; returns a tuple in task order."""

    def __init__(self, tasks: Sequence[str] = TASKS, width: int = 4) -> None:
        super().__init__()
        self.enc1 = _conv_bn(3, width)
        self.enc2 = _conv_bn(width, 2 * width)
        self.bottleneck = _conv_bn(2 * width, 2 * width)
        self.dec2 = _conv_bn(4 * width, width)
        self.dec1 = _conv_bn(2 * width, width)
        self.heads = nn.ModuleList([nn.Conv2d(width, 1 + i, 1) for i in range(len(tasks))])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottleneck(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(b, scale_factor=2.0, mode="nearest"), e2], dim=1))
        up = F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up, e1], dim=1))
        return tuple(head(d1) for head in self.heads)


# ------------------------------------------------------------------------------------------------ MTAN
class MTAN(nn.Module):
    """MTAN style: a shared backbone of three blocks; each task has attention modules that gate the shared
    features (``sigmoid(conv(.)) * feature``) at every block and carry its own attended feature forward."""

    def __init__(self, tasks: Sequence[str] = TASKS, width: int = 4) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.blocks = nn.ModuleList([_conv_bn(3, width), _conv_bn(width, width), _conv_bn(width, width)])
        self.att = nn.ModuleDict(
            {
                t: nn.ModuleList([nn.Conv2d(width, width, 1)] + [nn.Conv2d(2 * width, width, 1) for _ in range(2)])
                for t in tasks
            }
        )
        self.heads = nn.ModuleDict({t: nn.Conv2d(width, 2, 1) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = []
        h = x
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        out = {}
        for t in self.tasks:
            a = torch.sigmoid(self.att[t][0](feats[0])) * feats[0]
            for i in (1, 2):
                a = torch.sigmoid(self.att[t][i](torch.cat([feats[i], a], dim=1))) * feats[i]
            out[t] = self.heads[t](a)
        return out


# ------------------------------------------------------------------------------------------------ MMoE
class MMoE(nn.Module):
    """Multi-gate mixture of experts: shared experts, a softmax gate per task, a tower per task."""

    def __init__(self, tasks: Sequence[str] = TASKS, d_in: int = 8, experts: int = 3, d: int = 8) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.embed = nn.Linear(d_in, d)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU()) for _ in range(experts)])
        self.gates = nn.ModuleDict({t: nn.Linear(d, experts) for t in tasks})
        self.towers = nn.ModuleDict({t: nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1)) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = F.relu(self.embed(x))
        expert_out = torch.stack([expert(e) for expert in self.experts], dim=1)  # (B, E, d)
        out = {}
        for t in self.tasks:
            gate = torch.softmax(self.gates[t](e), dim=-1)  # (B, E)
            mixed = torch.einsum("be,bed->bd", gate, expert_out)
            out[t] = self.towers[t](mixed)
        return out


# ----------------------------------------------------------------------------------------- transformer
class SelfAttention(nn.Module):
    """Hand-written multi-head self-attention (traced through: its projections are ordinary layers)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: LayerNorm, attention, residual, LayerNorm, MLP (GELU), residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A token embedding, a learned positional embedding (a bare parameter read through ``get_attr``), a
    hand-written encoder block, an ``nn.MultiheadAttention`` block (a leaf module with a child layer), a
    final LayerNorm and a mean-pooled head per task."""

    def __init__(self, tasks: Sequence[str] = TASKS, d_in: int = 6, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.block = EncoderBlock(d, heads)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 2) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x) + self.pos
        h = self.block(h)
        a, _ = self.mha(h, h, h, need_weights=False)
        h = self.norm(h + a)
        pooled = h.mean(dim=1)
        return {t: head(pooled) for t, head in self.heads.items()}


class TorchTransformer(nn.Module):
    """``nn.TransformerEncoder`` (a default fx leaf whose layers sit inside it) with per-task heads."""

    def __init__(self, tasks: Sequence[str] = TASKS, d_in: int = 6, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 2) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(self.embed(x)).mean(dim=1)
        return {t: head(h) for t, head in self.heads.items()}


# --------------------------------------------------------------------------------- reuse / functional
class Reuse(nn.Module):
    """One block called twice, a layer used both as a module and through its weight (``F.linear``), and a
    tuple output."""

    def __init__(self, tasks: Sequence[str] = TASKS, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.block = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.Tanh())
        self.proj = nn.Linear(d, d)
        self.heads = nn.ModuleList([nn.Linear(d, 1) for _ in tasks])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.block(self.inp(x))
        h = self.block(h) + h  # the same block again
        g = self.proj(h) + F.linear(h, self.proj.weight)  # module call and functional use of one layer
        return tuple(head(g) for head in self.heads)


# ------------------------------------------------------------------------------------ partial sharing
class Partial(nn.Module):
    """Trunk layers that feed only some tasks: ``side`` feeds ``seg`` only, ``mid`` feeds ``depth`` and
    ``normal``, ``unused`` feeds nothing; ``stem`` and ``shared`` feed all three."""

    def __init__(self, tasks: Sequence[str] = TASKS3, d: int = 8) -> None:
        super().__init__()
        assert tuple(tasks) == TASKS3, "Partial is wired for the tasks seg, depth, normal"
        self.stem = nn.Linear(d, d)
        self.shared = nn.Linear(d, d)
        self.side = nn.Linear(d, d)
        self.mid = nn.Linear(d, d)
        self.unused = nn.Linear(d, d)
        self.seg = nn.Linear(d, 1)
        self.depth = nn.Linear(d, 1)
        self.normal = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.shared(torch.relu(self.stem(x))))
        m = torch.tanh(self.mid(h))
        return {"seg": self.seg(self.side(h)), "depth": self.depth(m), "normal": self.normal(m + h)}


# ------------------------------------------------------------------------------------------ BatchNorm
class SharedNorm(nn.Module):
    """BatchNorm1d after the trunk layers: ``norm`` is called at two places (before and after ``fc``/``out``),
    ``bn`` keeps cumulative averages (``momentum=None``)."""

    def __init__(self, tasks: Sequence[str] = TASKS, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d)
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d, momentum=None)
        self.out = nn.Linear(d, d)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 2) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.norm(self.inp(x)))
        g = torch.relu(self.bn(self.fc(h)))
        g = self.norm(self.out(g)) + h
        return {t: head(g) for t, head in self.heads.items()}


# ------------------------------------------------------------------------------------------- in place
class InPlace(nn.Module):
    """In-place operations next to branch points: a shared tensor that a later layer writes into
    (``z.add_(y)``) and that is read again afterwards; a ReLU applied in place whose result is ignored while
    the tensor it wrote is used (``F.relu(p, inplace=True)``); and a ReLU module in place."""

    def __init__(self, tasks: Sequence[str] = TASKS, d: int = 8) -> None:
        super().__init__()
        self.pre = nn.Linear(d, d)
        self.fc = nn.Linear(d, d)
        self.post = nn.Linear(d, d)
        self.relu = nn.ReLU(inplace=True)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 2) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.pre(x) * 1.0  # a non-leaf tensor that all tasks share
        y = self.fc(x)
        z.add_(y)  # written by a layer that may be branched
        p = self.post(z)
        F.relu(p, inplace=True)  # result ignored: p itself now holds relu(p)
        h = self.relu(p * 2.0)
        return {t: head(h + z + p) for t, head in self.heads.items()}


# -------------------------------------------------------------------------------------- hard to trace
class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace it, unless it is a leaf."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return self.lin(-x)


class Gated(nn.Module):
    """A trunk with a data-dependent :class:`Gate` in the middle."""

    def __init__(self, tasks: Sequence[str] = TASKS, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.gate = Gate(d)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 1) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.gate(self.inp(x))
        return {t: head(h) for t, head in self.heads.items()}


class ModeDependent(nn.Module):
    """A forward whose traced graph depends on ``self.training`` (functional dropout)."""

    def __init__(self, tasks: Sequence[str] = TASKS, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 1) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.dropout(self.inp(x), 0.1, self.training)
        return {t: head(h) for t, head in self.heads.items()}


class NoReset(nn.Module):
    """A layer that owns a bare parameter and has no ``reset_parameters()``."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class WithNoReset(nn.Module):
    def __init__(self, tasks: Sequence[str] = TASKS, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.scaler = NoReset(d)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 1) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.scaler(self.inp(x))
        return {t: head(h) for t, head in self.heads.items()}


# -------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Family:
    """An architecture family: ``build(tasks) -> model``, ``inputs(batch, seed) -> tensor``, output kind."""

    name: str
    build: Callable[[Sequence[str]], nn.Module]
    make_inputs: Callable[[torch.Generator, int], Any]
    output: str = "dict"  # "dict" or "tuple"
    tasks: tuple[str, ...] = TASKS

    def inputs(self, batch: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
        g = torch.Generator().manual_seed(seed)
        x = self.make_inputs(g, batch)
        return x.to(dtype)

    def model(self, tasks: Sequence[str] | None = None, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build(tuple(tasks or self.tasks))

    @property
    def tasks_arg(self) -> list[str] | None:
        """What to pass as ``tasks=`` to recon for this family (None when outputs name themselves)."""
        return list(self.tasks) if self.output == "tuple" else None


def _vector(d: int) -> Callable[[torch.Generator, int], torch.Tensor]:
    return lambda g, b: torch.randn(b, d, generator=g)


def _image(size: int) -> Callable[[torch.Generator, int], torch.Tensor]:
    return lambda g, b: torch.randn(b, 3, size, size, generator=g)


def _tokens(g: torch.Generator, b: int) -> torch.Tensor:
    return torch.randn(b, 5, 6, generator=g)


FAMILIES: dict[str, Family] = {
    "mlp": Family("mlp", MLP, _vector(8)),
    "mlp3": Family("mlp3", MLP, _vector(8), tasks=TASKS3),
    "resnet": Family("resnet", ResNet, _image(8)),
    "unet": Family("unet", UNet, _image(8), output="tuple"),
    "mtan": Family("mtan", MTAN, _image(8)),
    "mmoe": Family("mmoe", MMoE, _vector(8), tasks=TASKS3),
    "transformer": Family("transformer", Transformer, _tokens),
    "torch_transformer": Family("torch_transformer", TorchTransformer, _tokens),
    "reuse": Family("reuse", Reuse, _vector(8), output="tuple"),
    "partial": Family("partial", Partial, _vector(8), tasks=TASKS3),
    "inplace": Family("inplace", InPlace, _vector(8)),
    "bnshare": Family("bnshare", SharedNorm, _vector(8)),
}


def task_losses(output: Any, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """A simple loss per task (mean square of its output), for dict or tuple outputs."""
    values = output if isinstance(output, dict) else dict(zip(tasks, output, strict=True))
    return {t: values[t].pow(2).mean() + values[t].mean() for t in tasks}


class TwoHeads(nn.Module):
    """The smallest multi-task net: a tanh trunk and two linear heads, tasks "a" and "b"."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(5, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 3) for t in ("a", "b")})

    def forward(self, x):
        z = torch.tanh(self.trunk(x))
        return {t: h(z) for t, h in self.heads.items()}


def assert_gradients_match(model: nn.Module, net: nn.Module, branched, *, tol: float) -> None:
    """After one backward through each: each original parameter's gradient is the sum over its copies' in ``net``."""
    from recon._split import TaskBranches

    for pname, p in model.named_parameters():
        owner, _, attr = pname.rpartition(".")
        if owner in branched:
            container = net.get_submodule(owner)
            assert isinstance(container, TaskBranches)
            grads = [getattr(container._modules[c], attr).grad for c in container.tasks]
            grad = sum(g for g in grads if g is not None)
        else:
            grad = net.get_parameter(pname).grad
        if p.grad is None:
            assert grad is None or not torch.is_tensor(grad) or not grad.abs().max() > 0
            continue
        torch.testing.assert_close(grad, p.grad, atol=tol, rtol=tol, msg=f"gradient of {pname}")


def task_matrix(losses: dict[str, torch.Tensor], params: Sequence[torch.Tensor], tasks: Sequence[str]) -> torch.Tensor:
    """``(len(tasks), P)``: each task's autograd gradient w.r.t. ``params``, flattened (zeros where unreached)."""
    rows = []
    for t in tasks:
        grads = torch.autograd.grad(losses[t], list(params), retain_graph=True, allow_unused=True)
        flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
        rows.append(torch.cat(flat))
    return torch.stack(rows)
