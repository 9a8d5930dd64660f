"""Running every stage under ``torchrun``: one process per GPU (NCCL) or per CPU group (gloo).

Each process loads the same global batch and keeps its shard (a slice along the batch dimension), so recipes
need no sampler. Per-task gradients are averaged across processes *before* cosines are taken or a method
aggregates them, weighted by shard size, so scores and updates equal those of one process on the global
batch (for losses that are means over the batch, the usual case). Every process draws the same random
numbers (same seed, same sequence of draws), so stochastic methods (PCGrad's order, GradDrop's mask) agree.
Only rank 0 writes files and prints.

Cost per step: one all-reduce of K x (shared + task-specific) parameters plus K loss values.
Not equal to the global batch: BatchNorm statistics are per shard (as with DDP without SyncBatchNorm).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from recon._errors import ReconError


def active() -> bool:
    """True inside an initialised process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes files and prints (rank 0, or the only one)."""
    return rank() == 0


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment; a no-op outside ``torchrun``.

    NCCL on CUDA devices (each process on ``cuda:LOCAL_RANK``), gloo on CPU. Returns whether it is active.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return active()


def local_device(device: torch.device) -> torch.device:
    """On CUDA under torchrun, each process uses its own GPU."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _batch_len(value: Any) -> int | None:
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() > 0 else None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            n = _batch_len(v)
            if n is not None:
                return n
    return None


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() > 0 else value
    if isinstance(value, Mapping):
        return {k: _slice(v, start, stop) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, start, stop) for v in value)
    return value


def shard(inputs: Any, targets: Any) -> tuple[Any, Any, float]:
    """This process's slice of a global batch, and its weight ``n_r * W / N`` for exact averaging.

    Averaging ``weight * grad`` over the W processes gives ``sum_r (n_r / N) grad_r``: the gradient of the mean
    loss over the global batch of N, even when N is not divisible by W.
    """
    if not active():
        return inputs, targets, 1.0
    n = _batch_len(targets) or _batch_len(inputs)
    if n is None:
        raise ReconError("cannot shard a batch without a batch dimension; yield tensors of shape (N, ...)")
    W, r = world_size(), rank()
    if n < W:
        raise ReconError(f"a batch of {n} cannot be split over {W} processes; use batches of at least {W}")
    bounds = [n * k // W for k in range(W + 1)]
    start, stop = bounds[r], bounds[r + 1]
    return _slice(inputs, start, stop), _slice(targets, start, stop), (stop - start) * W / n


def average_(tensors: Sequence[torch.Tensor], weight: float = 1.0) -> None:
    """In place: ``t <- mean over processes of (weight * t)``, in one all-reduce over a flat buffer."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if weight != 1.0:
        flat.mul_(weight)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size())
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Start every process from rank 0's parameters and buffers."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of ``obj`` on every process (e.g. the run folder's name)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
