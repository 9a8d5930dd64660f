"""Running every stage under ``torchrun``: one process per GPU (NCCL) or per CPU group (gloo).

**The global batch** is what the recipe's data yields in one process: one batch of the recipe's ``DataLoader``
(its ``batch_size``), or one batch of its iterable. Under torchrun each step still covers one global batch of N
samples; process r takes the slice ``[N r / W, N (r + 1) / W)`` of it (sizes ``N // W`` or ``N // W + 1``) and
weights its losses by ``n_r W / N``, so the plain mean over processes of every gradient equals the gradient of
the mean loss over the global batch, uneven last batches included (for losses that are means over the batch,
the usual case). Per-task gradients are averaged *before* cosines are taken or a method aggregates them, so
scores and updates equal those of one process on the global batch. Every process draws the same random numbers
(same seed, same sequence of draws), so stochastic methods (PCGrad's order, GradDrop's mask) agree.

How a process gets its shard (:func:`shard_data`):

* a ``torch.utils.data.DataLoader`` (returned by ``train_data()``, or given): recon rebuilds it per process with
  the same dataset, ``collate_fn``, workers, pinning and generator, and a batch sampler that walks the original
  loader's batch sampler (so shuffling, ``drop_last`` and custom samplers give the same global batches as one
  process) and keeps this process's slice of each global batch's indices: a process loads only its samples,
  every sample is loaded by exactly one process per epoch. Unlike ``DistributedSampler`` nothing is padded or
  dropped (padding would repeat samples, per-process shuffling would change the global batches). A sampler with
  ``set_epoch`` (e.g. a ``DistributedSampler`` the recipe built itself) gets it every epoch.
* a recipe function with ``rank`` and ``world_size`` keyword arguments is called with them and must yield this
  process's shard of each global batch, the same number of batches on every process; the weight ``n_r W / N``
  then takes one all-reduce of the shard sizes per step.
* anything else: every process reads the whole global batch and keeps its slice (one notice says so).

Evaluation on sharded ``val_data`` reduces across processes: per-batch metrics as sums and counts; stateful
metrics (``reset/update/compute``, e.g. ``recon.dense``'s whole-set mIoU) by gathering every process's
``(output, target)`` pairs (:class:`GatheredMetric`) and replaying them, so whole-set metrics equal one process's;
torchmetrics metrics synchronise themselves in ``compute()`` and are left to do so.

Cost per step: one all-reduce of K x (shared + task-specific) parameters plus K loss values; J is reduced in
place (no concatenated copy), small tensors in buckets (:func:`average_`). Only rank 0 writes files and prints.
Not equal to the global batch: BatchNorm statistics are per shard (as with DDP without SyncBatchNorm), and
random data augmentation draws differ from one process's.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


def shard(inputs: Any, targets: Any, batch: Any = None) -> tuple[Any, Any, float]:
    """This process's slice of a global batch, and its weight ``n_r * W / N`` for exact averaging.

    Averaging ``weight * grad`` over the W processes gives ``sum_r (n_r / N) grad_r``: the gradient of the mean
    loss over the global batch of N, even when N is not divisible by W. A ``batch`` that :func:`shard_data`
    already sharded (a :class:`Shard`) is kept whole, with its weight.
    """
    if not active():
        return inputs, targets, 1.0
    if isinstance(batch, Shard):
        if batch.weight is not None:
            return inputs, targets, batch.weight
        n = _batch_len(targets) or _batch_len(inputs) or 0
        sizes = torch.tensor([float(n)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(sizes, op=dist.ReduceOp.SUM)
        return inputs, targets, n * world_size() / float(sizes.item())
    n = _batch_len(targets) or _batch_len(inputs)
    if n is None:
        raise ReconError("cannot shard a batch without a batch dimension; yield tensors of shape (N, ...)")
    start, stop = _bounds(n)
    return _slice(inputs, start, stop), _slice(targets, start, stop), (stop - start) * world_size() / n


def _bounds(n: int) -> tuple[int, int]:
    """This process's ``[start, stop)`` of a global batch of ``n``."""
    W, r = world_size(), rank()
    if n < W:
        raise ReconError(f"a batch of {n} cannot be split over {W} processes; use batches of at least {W}")
    return n * r // W, n * (r + 1) // W


def _comm_device() -> torch.device:
    """Where small collective buffers live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_BUCKET_BYTES = 25 << 20  # DDP's default bucket (bucket_cap_mb=25)
_IN_PLACE_BYTES = _BUCKET_BYTES  # from a bucket's size a tensor is reduced where it lies (no copy of it)


def average_(tensors: Sequence[torch.Tensor], weight: float = 1.0) -> None:
    """In place: ``t <- mean over processes of (weight * t)``.

    A contiguous tensor of a bucket's size (25 MiB) or more (J, the ``(K, P)`` task gradients, on real models)
    is all-reduced in place, with no concatenated copy; smaller ones are packed into flat buckets of up to
    25 MiB per dtype and device (one all-reduce per bucket, as DDP does), then copied back. Below a bucket a
    small J goes into the bucket too: one call is faster than two there (1.8x on gloo at J = 1.3 MiB, measured
    with ``benchmarks/distributed.py``), and the copy is at most a bucket.
    """
    if not active() or not tensors:
        return
    W = world_size()
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_contiguous() and t.numel() * t.element_size() >= _IN_PLACE_BYTES:
            _reduce_mean(t, weight, W)
        else:
            groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= _BUCKET_BYTES:
                _reduce_bucket(bucket, weight, W)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket, weight, W)


def _reduce_mean(t: torch.Tensor, weight: float, W: int) -> None:
    if weight != 1.0:
        t.mul_(weight)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t.div_(W)


def _reduce_bucket(bucket: list[torch.Tensor], weight: float, W: int) -> None:
    if len(bucket) == 1 and bucket[0].is_contiguous():
        _reduce_mean(bucket[0], weight, W)
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    _reduce_mean(flat, weight, W)
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


# --- sharded data ------------------------------------------------------------------------------------------
class Shard(tuple):
    """A batch that is already this process's shard, with its weight ``n_r W / N`` (``None``: the global size
    is found with one all-reduce of the shard sizes)."""

    weight: float | None

    def __new__(cls, batch: Iterable, weight: float | None) -> Shard:
        obj = super().__new__(cls, batch)
        obj.weight = weight
        return obj


class _ShardBatches(torch.utils.data.Sampler):
    """This process's slice of every global batch the original loader's batch sampler yields (the same on every
    process: same seed, same draws), with the weights queued for :class:`_ShardedLoader`."""

    def __init__(self, batch_sampler: Iterable, sampler: Any) -> None:
        self.batch_sampler, self.sampler = batch_sampler, sampler
        self.weights: deque[float] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        W = world_size()
        for indices in self.batch_sampler:
            indices = list(indices)
            start, stop = _bounds(len(indices))
            self.weights.append((stop - start) * W / len(indices))
            yield indices[start:stop]

    def __len__(self) -> int:
        return len(self.batch_sampler)


class _ShardedLoader:
    """A rebuilt ``DataLoader`` that loads only this process's samples; yields :class:`Shard` batches."""

    def __init__(self, loader: torch.utils.data.DataLoader, owner: ShardedData) -> None:
        self.owner = owner
        self.batches = _ShardBatches(loader.batch_sampler, loader.sampler)
        extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
        self.loader = torch.utils.data.DataLoader(
            loader.dataset, batch_sampler=self.batches, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator, persistent_workers=loader.persistent_workers,
            in_order=getattr(loader, "in_order", True), **extra,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Shard]:
        if hasattr(self.batches.sampler, "set_epoch"):
            self.batches.sampler.set_epoch(self.owner.epoch)
        self.owner.epoch += 1
        self.batches.weights.clear()
        for batch in self.loader:  # batches come in sampler order, so the weights queue matches them
            yield Shard(batch, self.batches.weights.popleft())


class _KeywordShards:
    """The iterable of a recipe function called with ``rank=`` and ``world_size=``: its batches are shards."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Shard]:
        for batch in self.iterable:
            yield Shard(batch, None)


def _takes_shard_keywords(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return all(name in params and params[name].kind in kinds for name in ("rank", "world_size"))


def _shardable(loader: Any) -> bool:
    return (
        isinstance(loader, torch.utils.data.DataLoader)
        and loader.batch_sampler is not None
        and not isinstance(loader.dataset, torch.utils.data.IterableDataset)
    )


class ShardedData:
    """``data`` (a recipe's ``train_data``/``val_data``, a ``DataLoader`` or an iterable) as this process reads
    it under torchrun: callable like a recipe function (once per epoch), see the module's docstring."""

    def __init__(self, data: Any, what: str) -> None:
        self.data, self.what = data, what
        self.epoch = 0  # passed to a sampler's set_epoch
        self.sharded = _takes_shard_keywords(data) if callable(data) else _shardable(data)
        self._noticed = False
        self._rebuilt: tuple[Any, _ShardedLoader] | None = None  # a given loader is rebuilt once, not per epoch

    def __call__(self) -> Iterable:
        data = self.data
        if callable(data) and not isinstance(data, torch.utils.data.DataLoader):
            if _takes_shard_keywords(data):
                return _KeywordShards(data(rank=rank(), world_size=world_size()))
            data = data()
        if _shardable(data):
            self.sharded = True
            if self._rebuilt is None or self._rebuilt[0] is not data:
                self._rebuilt = (data, _ShardedLoader(data, self))
            return self._rebuilt[1]
        self.sharded = False
        if not self._noticed and is_main():
            warnings.warn(
                f"recon: {self.what} is not a DataLoader and takes no rank/world_size: every one of the "
                f"{world_size()} processes reads the full global batch and keeps its slice",
                RuntimeWarning,
                stacklevel=2,
            )
        self._noticed = True
        return data


def shard_data(data: Any, what: str = "val_data", epoch: int = 0) -> Any:
    """``data`` as a :class:`ShardedData` under torchrun (each process loads only its shard where it can),
    starting at ``epoch`` (a resumed run's, for ``set_epoch``); the data itself outside torchrun or when None."""
    if data is None or not active() or isinstance(data, ShardedData):
        return data
    sharded = ShardedData(data, what)
    sharded.epoch = epoch
    return sharded


def is_sharded(data: Any) -> bool:
    """Whether each process reads a different part of ``data`` (so evaluation results must be reduced)."""
    return isinstance(data, ShardedData) and data.sharded


# --- evaluation across processes ----------------------------------------------------------------------------
def sum_(values: Sequence[float]) -> list[float]:
    """The sums over processes of a list of numbers (the same length on every process), in float64."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


class GatheredMetric:
    """A stateful metric (``reset/update/compute``) evaluated on sharded data: ``update`` keeps the
    ``(output, target)`` pairs on the CPU; ``compute`` gathers every process's pairs and replays them into the
    metric in rank order, so a whole-set metric (a confusion-matrix mIoU, a median) equals one process's over the
    whole set. Costs the outputs' memory on the host; torchmetrics metrics sync their own state instead."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.pairs: list[tuple[Any, Any]] = []

    def reset(self) -> None:
        self.metric.reset()
        self.pairs = []

    def update(self, output: Any, target: Any) -> None:
        from recon._outputs import move_to

        self.pairs.append((move_to(output, "cpu"), move_to(target, "cpu")))

    def compute(self) -> Any:
        everyone: list[Any] = [None] * world_size()
        dist.all_gather_object(everyone, self.pairs)
        self.metric.reset()
        for pairs in everyone:
            for output, target in pairs:
                self.metric.update(output, target)
        return self.metric.compute()


def gathered(metric: Any) -> Any:
    """``metric`` wrapped in :class:`GatheredMetric` unless it synchronises itself (torchmetrics)."""
    if type(metric).__module__.startswith("torchmetrics") or hasattr(metric, "sync_on_compute"):
        return metric
    return GatheredMetric(metric)


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


def init_distributed(device: torch.device | str) -> torch.device:
    """Join the process group ``torchrun`` describes (a no-op outside torchrun) and return this process's device.

    NCCL on CUDA (each process on ``cuda:LOCAL_RANK`` when ``device`` has no index), gloo on CPU; see docs/scaling.md,
    "Running on several processes or GPUs". Call it before building the model; ``recon.train`` and
    ``recon.profile`` then shard each batch across the processes.
    """
    device = torch.device(device)
    init_from_env(device)
    return local_device(device)


def is_main_process() -> bool:
    """Whether this process should write files and print: rank 0 under torchrun, and always outside it."""
    return is_main()
