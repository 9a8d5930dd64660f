"""Task gradients in chunks of tasks: memory that does not grow K-fold (issue "forty tasks").

With K tasks and P shared parameters the ``(K, P)`` matrix J of :func:`recon._backward.task_gradients` grows
with K, and its batched path (one vmap over the K task passes) holds K copies of the backward's intermediates.
Here the tasks are cut into chunks of at most ``size``; a chunk's gradients ``J_a`` (``size x P``) are made at
once (one batched pass over the chunk, or its passes one by one), and the Gram matrices are accumulated block by
block, ``G = [J_a J_b^T]_{a,b}``, per shared parameter, so that any layer's Gram matrix (the sum of its
parameters') and the whole one (the sum of all) come out of one schedule.

Two chunks are held at a time, so the peak is ``2 x size x P`` plus ``(shared parameters, K, K)``; the price is
recomputation, since a block needs both of its chunks: with m chunks the schedule makes ``m + (m-1)(m-2)/2``
chunk passes (chunk 0 pinned while 1..m-1 stream, then the chunk streamed last stays pinned while the ones not
yet paired with it stream again, and so on).

The update of a Gram method (``w @ J`` with ``w`` from ``G``: MGDA, PCGrad, CAGrad, IMTL-G, GradVac, GradOPS,
Aligned-MTL, UPGrad) is then one more backward of ``sum_k w_k L_k`` over the shared parameters, which equals
``w @ J`` by linearity of the gradient; the mean and the sum accumulate ``w_a @ J_a`` while the chunks are first
made. Methods that need J itself (GradDrop's signs, Nash-MTL's state, torchjd aggregators, callables) get the
whole J assembled chunk by chunk (:meth:`TaskChunks.whole`): only the batched pass's intermediates stay bounded.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from recon._backward import (
    BackwardResult,
    Batched,
    TaskGradients,
    _accumulate,
    _write_update,
    reduce_and_apply,
    task_gradients,
)
from recon._errors import ReconError

__all__ = ["TaskChunks", "apply_chunked", "chunk_bounds", "default_task_chunk", "gram_only", "resolve_task_chunk"]

_SHARE = 0.25  # of the free memory on the device that J may take


def chunk_bounds(n_tasks: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: the tasks cut into chunks of at most ``size``, in order."""
    return [(a, min(a + size, n_tasks)) for a in range(0, n_tasks, size)]


def _free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def default_task_chunk(n_tasks: int, n_params: int, device: torch.device, *, itemsize: int = 4) -> int:
    """``task_chunk="auto"``: the whole K when ``K x P`` fits in a quarter of the device's free memory (on the CPU
    the available RAM), else the largest chunk of which two fit there."""
    row = max(1, n_params * itemsize)
    budget = _SHARE * _free_bytes(device)
    if n_tasks * row <= budget:
        return n_tasks
    return max(1, min(n_tasks, int(budget // (2 * row))))


def resolve_task_chunk(task_chunk: int | str | None, n_tasks: int) -> int | None:
    """``task_chunk`` checked: ``None``/``"auto"`` (decided per step from the free memory: ``None``) or a positive
    integer (``>= K`` means no chunks)."""
    if task_chunk is None or task_chunk == "auto":
        return None
    if isinstance(task_chunk, bool) or not isinstance(task_chunk, int) or task_chunk < 1:
        raise ReconError(f"task_chunk = {task_chunk!r} must be a positive integer or 'auto' (tasks per chunk)")
    return min(task_chunk, n_tasks)


def gram_only(method: Any) -> bool:
    """Whether ``method``'s update needs only the Gram matrix (or constant weights), not J itself."""
    from recon.methods import GramMethod
    from recon.methods._gradient import Mean, Sum

    return isinstance(method, (Mean, Sum)) or (
        isinstance(method, GramMethod) and type(method).forward is GramMethod.forward
    )


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Small block products on the CPU with one intra-op thread (see :mod:`recon._gram`: a parallel region per
    block can stall on a busy machine); the caller's setting is restored."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TaskChunks:
    """One step's K task gradients, made ``size`` tasks at a time (see the module docstring).

    ``rows``/``own`` hold the gradients of the parameters outside J as :class:`TaskGradients` does (global task
    indices); ``weights`` (``(K,)``), when given, accumulates ``update = weights @ J`` while chunks are first
    made; ``passes`` counts chunk passes.
    """

    def __init__(
        self,
        values: Sequence[Tensor],
        params: Sequence[Tensor],
        shared_idx: Sequence[int],
        *,
        size: int,
        batched: Batched = "auto",
        weights: Tensor | None = None,
    ) -> None:
        self.values, self.params, self.shared_idx = list(values), params, list(shared_idx)
        self.K = len(self.values)
        self.bounds = chunk_bounds(self.K, size)
        self.batched = batched
        self.rows: list[list[Tensor | None]] = [[None] * len(params) for _ in range(self.K)]
        self.own: list[tuple[int, int]] = []
        self.weights, self.update = weights, None
        self.passes = 0
        self._seen: set[int] = set()
        self._grams: Tensor | None = None
        sizes = [params[i].numel() for i in self.shared_idx]
        self._spans = [(sum(sizes[:j]), n) for j, n in enumerate(sizes)]

    def _make(self, a: int) -> Tensor | None:
        start, stop = self.bounds[a]
        grads = task_gradients(
            self.values[start:stop], self.params, shared_idx=self.shared_idx, retain_graph=True,
            batched=self.batched, group=(start, stop),
        )  # fmt: skip
        self.passes += 1
        if a not in self._seen:  # what is kept from a chunk, once
            self._seen.add(a)
            for i, k in grads.own:
                self.rows[start + k][i] = grads.rows[k][i]
                self.own.append((i, start + k))
            if self.weights is not None and grads.J is not None:
                part = self.weights[start:stop].to(grads.J.dtype) @ grads.J
                self.update = part if self.update is None else self.update.add_(part)
        return grads.J

    def param_grams(self) -> Tensor:
        """``(shared parameters, K, K)`` float32: each shared parameter's Gram matrix of the task gradients."""
        if self._grams is not None:
            return self._grams
        device = self.params[self.shared_idx[0]].device if self.shared_idx else torch.device("cpu")
        grams = torch.zeros((len(self.shared_idx), self.K, self.K), dtype=torch.float32, device=device)
        self._grams = grams
        if not self.shared_idx:
            self.make_all()
            return grams
        a, Ja = 0, self._make(0)
        self._block(a, Ja, a, Ja)
        todo = list(range(1, len(self.bounds)))
        while todo:
            Jb = None
            for b in todo:
                Jb = None  # (release the previous one before making the next: two chunks at a time)
                Jb = self._make(b)
                self._block(a, Ja, b, Jb)
            a, Ja, todo = todo[-1], Jb, todo[:-1]  # the chunk streamed last stays, pinned
            self._block(a, Ja, a, Ja)
        return grams

    def _block(self, a: int, Ja: Tensor, b: int, Jb: Tensor) -> None:
        (sa, ea), (sb, eb) = self.bounds[a], self.bounds[b]
        dtype = torch.promote_types(Ja.dtype, torch.float32)
        with torch.no_grad(), one_thread(Ja.device):
            for j, (offset, n) in enumerate(self._spans):
                block = (Ja[:, offset : offset + n].to(dtype) @ Jb[:, offset : offset + n].to(dtype).T).float()
                self._grams[j, sa:ea, sb:eb] = block
                if a != b:
                    self._grams[j, sb:eb, sa:ea] = block.T

    def make_all(self) -> None:
        """Make every chunk not made yet (their rows, and the update of constant ``weights``)."""
        for a in range(len(self.bounds)):
            if a not in self._seen:
                self._make(a)

    def gram(self) -> Tensor:
        """``(K, K)``: the Gram matrix ``J J^T`` of all shared parameters."""
        return self.param_grams().sum(dim=0)

    def whole(self) -> TaskGradients:
        """The whole J, made chunk by chunk, as :func:`recon._backward.task_gradients` returns it."""
        J = None
        for a, (start, stop) in enumerate(self.bounds):
            Ja = self._make(a)
            if Ja is not None:
                J = Ja.new_empty((self.K, Ja.shape[1])) if J is None else J
                J[start:stop] = Ja
        return TaskGradients(J, self.rows, self.own, self.shared_idx)


def apply_chunked(chunks: TaskChunks, method: Any, loss_values: Tensor) -> BackwardResult:
    """Fill ``.grad`` as :func:`recon._backward.apply_task_gradients` does, for a Gram-only method
    (:func:`gram_only`), from the chunks' Gram matrix: the shared parameters get ``sum_k w_k dL_k`` from one
    backward of the weighted losses (constant weights: the update accumulated while the chunks were made), the
    others each task's own gradient."""
    params = chunks.params
    shared = tuple(params[i] for i in chunks.shared_idx)
    weights = chunks.weights
    if shared and weights is None:
        weights = method.weights(chunks.gram())
        total = (weights.to(chunks.values[0].dtype) * torch.stack(chunks.values)).sum()
        for p, g in zip(shared, torch.autograd.grad(total, shared, allow_unused=True), strict=True):
            if g is not None:
                _accumulate(p, g)
    elif shared:
        chunks.make_all()
        with torch.no_grad():
            _write_update(chunks.update, shared)
    if weights is not None:
        method._set_last_weights(weights)
    chunks.make_all()  # (no shared parameter: the rows are all there is)
    with torch.no_grad():
        for i, k in chunks.own:
            g = chunks.rows[k][i]
            _accumulate(params[i], g.to_dense() if g.layout != torch.strided else g)
    return BackwardResult(weights, shared, loss_values)


def constant_weights(method: Any, n_tasks: int, like: Tensor) -> Tensor | None:
    """The mean's and the sum's weights (``1/K``, ``1``), which need no Gram matrix; None for the others."""
    from recon.methods._gradient import Mean, Sum

    if isinstance(method, (Mean, Sum)):
        return torch.full((n_tasks,), 1.0 / n_tasks if isinstance(method, Mean) else 1.0, device=like.device)
    return None


def chunked_backward(
    values: Sequence[Tensor], params: Sequence[Tensor], shared_idx: Sequence[int], method: Any,
    loss_values: Tensor, *, size: int, batched: Batched,
) -> BackwardResult | None:  # fmt: skip
    """:func:`recon.backward` with the task gradients made ``size`` tasks at a time; None when ``size`` covers
    every task (nothing to chunk)."""
    size = resolve_task_chunk(size, len(values))
    if size is None or size >= len(values):
        return None
    if gram_only(method):
        weights = constant_weights(method, len(values), loss_values)
        chunks = TaskChunks(values, params, shared_idx, size=size, batched=batched, weights=weights)
        return apply_chunked(chunks, method, loss_values)
    warn_needs_matrix(method, size)
    grads = TaskChunks(values, params, shared_idx, size=size, batched=batched).whole()
    return reduce_and_apply(grads, params, method, loss_values)


_WARNED: set[str] = set()


def warn_needs_matrix(method: Any, size: int) -> None:
    """Once per method: it needs J itself, so the chunks only bound the batched pass, not J."""
    name = type(method).__name__
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"recon: {name} needs the whole task-gradient matrix J, not only its Gram matrix: the task gradients "
            f"are made {size} tasks at a time but all K rows are held",
            RuntimeWarning,
            stacklevel=3,
        )
