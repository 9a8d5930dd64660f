"""The one multi-task step engine that ``recon.profile`` and ``recon.train`` configure.

A step is: check the batch -> keep this process's shard (:func:`recon._distributed.shard`) -> forward and the
per-task losses (:meth:`StepEngine.forward_losses`) -> the K task gradients (:meth:`StepEngine.task_gradients`,
one backward per task, accumulated straight into the ``(K, P)`` matrix J once the shared parameters are known)
-> average them across processes -> one non-finite check -> the method's update -> the optimizer step.
Observers see the step without changing it: the profiler's cosine recorder and loss log, the training loop's
conflict meter and epoch end (evaluation, metrics.csv, checkpoint), the progress bar.

Under ``torchrun`` a process's share of the global batch is weighted one way only: its losses are multiplied by
``n_r * W / N`` (:func:`recon._distributed.shard`) before any backward pass, so every later average across
processes is a plain mean and equals the global batch's value (gradients, loss values, loss-weighting methods'
single backward alike). The loss values are averaged before the check, so every process takes the same
decision on a non-finite loss.

Mixed precision plugs in through one object, :class:`Precision`: its ``autocast()`` wraps the forward and the
losses, ``scale`` the losses before the task-gradient passes, ``unscale`` the averaged gradients (returning
False to skip a step with overflowing gradients) and ``step`` the optimizer step. :class:`FullPrecision` is the
identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from recon import _distributed
from recon._backward import TaskGradients, apply_task_gradients, backward, task_gradients
from recon._chunks import (
    TaskChunks,
    apply_chunked,
    constant_weights,
    default_task_chunk,
    gram_only,
    resolve_task_chunk,
    warn_needs_matrix,
)
from recon._errors import ReconError, check_finite
from recon._outputs import call_model, move_to, task_outputs
from recon._recipe import batches, check_batch, compute_losses
from recon._usage import group_copies
from recon.methods._base import LossWeighting

__all__ = ["FullPrecision", "MeanLoss", "Observer", "Precision", "StepEngine"]


class MeanLoss(LossWeighting):
    """Equal loss weights ``1/K``: the cheap step of a sampled profile, one backward of the mean loss."""

    def forward(self, losses: Tensor, /) -> Tensor:
        return torch.full_like(losses.detach(), 1.0 / losses.numel())


class Precision(Protocol):
    """Where mixed precision plugs into a step (autocast around the forward, a gradient scaler around the
    task-gradient passes and the optimizer step)."""

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def scale(self, values: Sequence[Tensor]) -> list[Tensor]: ...

    def unscale(self, grads: TaskGradients, *, update: bool = True) -> bool: ...

    def step(self, optimizer: torch.optim.Optimizer) -> None: ...


class FullPrecision:
    """The identity :class:`Precision`: no autocast, no loss scaling, a plain optimizer step."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def scale(self, values: Sequence[Tensor]) -> list[Tensor]:
        return list(values)

    def unscale(self, grads: TaskGradients, *, update: bool = True) -> bool:
        return True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()


class Observer:
    """Hooks of :class:`StepEngine`; each one is a no-op here. ``wants_gradients``: the observer reads the
    step's averaged task gradients in :meth:`on_gradients` (free with gradient methods, which compute them
    anyway; one more backward per task with the others)."""

    wants_gradients = False

    def on_gradients(self, engine: StepEngine, grads: TaskGradients) -> None:
        """The step's task gradients, averaged across processes, before the method consumes ``grads.J``."""

    def on_step(self, engine: StepEngine, losses: list[float]) -> None:
        """After the optimizer step; ``losses``: the step's K loss values (global batch)."""

    def on_epoch_end(self, engine: StepEngine, epoch: int, n_steps: int) -> None:
        """After a full pass over the data (``epoch`` counts from 0; ``n_steps`` batches in it)."""


class ProgressObserver(Observer):
    """Advances a :func:`recon._progress.progress_bar` with the step's losses."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def on_step(self, engine: StepEngine, losses: list[float]) -> None:
        self.bar.advance(dict(zip(engine.tasks, losses, strict=True)))


class StepEngine:
    """One multi-task training step, repeated over epochs, for any module and any ``recon.methods`` method.

    Args:
        model: the network; its parameters that require grad are the ones the step updates.
        losses: ``{task: loss_fn(output, target)}`` for the trained ``tasks``.
        tasks: the trained tasks (the order of J's rows).
        method: a resolved and bound ``recon.methods`` method.
        optimizer: steps after every update.
        device: where batches go.
        output_tasks: the model's outputs in order (for tuple outputs; default ``tasks``).
        where: how error messages name the data (``"data"``, ``"train_data"``).
        precision: mixed precision hooks (default :class:`FullPrecision`; :class:`recon._precision.Precision`).
        batched: how the K task gradients are computed (:func:`recon._backward.task_gradients`).
        observers: see :class:`Observer`.
        step: the number of steps already done (a resumed run's).
        every: sampled task gradients (issue "forty tasks"): the K task gradients, and the observers that read
            them, only on steps ``step % every == 0``; a gradient method's other steps run one backward of the
            mean loss (:class:`MeanLoss`), the other methods' their own backward without the observers' K passes.
        task_chunk: the task gradients made this many tasks at a time (:mod:`recon._chunks`; ``None`` or
            ``"auto"``: from the free memory of the device, the whole K when it fits).
    """

    def __init__(
        self,
        model: nn.Module,
        losses: Mapping[str, Callable],
        tasks: Sequence[str],
        *,
        method: Any,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        output_tasks: Sequence[str] | None = None,
        where: str = "data",
        precision: Precision | None = None,
        observers: Iterable[Observer] = (),
        step: int = 0,
        batched: Any = "auto",
        every: int = 1,
        task_chunk: int | str | None = None,
    ) -> None:
        self.model = model
        self.tasks = list(tasks)
        self.losses = {t: losses[t] for t in self.tasks}
        self.output_tasks = list(output_tasks) if output_tasks is not None else self.tasks
        self.method = method
        self.optimizer = optimizer
        self.device = device
        self.where = where
        self.precision: Precision = precision if precision is not None else FullPrecision()
        self.observers = list(observers)
        self.step = step
        self.batched = batched
        self.every = every
        self.task_chunk = resolve_task_chunk(task_chunk, len(self.tasks))
        self._chunk: int | None = None  # the chunk size in use, once the shared set is known
        self._mean_loss = MeanLoss().bind(self.tasks)
        self.names, self.params = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.params.append(p)
        #: indices (into ``params``) of the parameters whose task gradients go into J; found on the first step
        #: unless set before it (the profiler sets it from the torch.fx graph)
        self.shared_idx: list[int] | None = None
        #: the group copies of a split model (parameter index -> its group's task indices): trained as groups
        self.copies = group_copies(model, self.tasks, self.params)
        # gradient methods read J; loss-weighting, representation and custom methods run recon.backward
        kind, custom = getattr(method, "kind", "gradient"), getattr(method, "custom_backward", None)
        self._through_j = kind == "gradient" and custom is None
        self._shared: tuple[nn.Parameter, ...] | None = None
        #: False once the precision hook reports overflowing task gradients: the step's update is skipped
        self.step_ok = True

    # --- the pieces of a step ------------------------------------------------------------------------------
    def forward_losses(self, batch: Any) -> dict[str, Tensor]:
        """Check the batch, keep this process's shard, forward, per-task losses (weighted by the shard's share)."""
        inputs, targets = check_batch(batch, self.tasks, self.where)
        inputs, targets, weight = _distributed.shard(inputs, targets, batch)
        with self.precision.autocast():
            outputs = task_outputs(call_model(self.model, move_to(inputs, self.device)), self.output_tasks)
            values = compute_losses(self.losses, outputs, move_to(targets, self.device), "losses")
        if weight != 1.0:  # uneven shards: the plain mean over processes of weight * loss is the global batch's
            values = {t: v * weight for t, v in values.items()}
        return values

    def task_gradients(
        self, values: Mapping[str, Tensor], *, keep_graph: bool = False, update: bool = True
    ) -> TaskGradients:
        """The K tasks' gradients (one backward each; straight into J once the shared set is known), averaged
        across processes and unscaled."""
        scaled = self.precision.scale([values[t] for t in self.tasks])
        size = self.chunk_size()
        if size is not None:  # a method that needs J itself: made in chunks, held whole
            warn_needs_matrix(self.method, size)
            grads = TaskChunks(scaled, self.params, self.shared_idx, size=size, batched=self.batched).whole()
        else:
            grads = task_gradients(
                scaled, self.params, shared_idx=self.shared_idx, retain_graph=keep_graph, batched=self.batched,
                copies=self.copies,
            )  # fmt: skip
        if self.shared_idx is None:
            self.shared_idx = grads.shared_idx
        _distributed.average_(grads.tensors())
        self.step_ok = self.precision.unscale(grads, update=update) and self.step_ok  # update: decides
        return grads

    def check_losses(self, values: Mapping[str, Tensor]) -> tuple[Tensor, list[float]]:
        """The K loss values of the global batch (averaged across processes), as a tensor and as floats; raises
        :class:`recon.NonFiniteLossError` on a NaN or infinite one, on every process alike (the step's one
        host synchronisation)."""
        loss_vector = torch.stack([values[t].detach() for t in self.tasks])
        _distributed.average_([loss_vector])
        row = loss_vector.tolist()
        check_finite(self.tasks, row, self.step)
        return loss_vector, row

    def chunk_size(self) -> int | None:
        """Tasks per chunk of task gradients, or None for all K at once: before the shared set is known, under
        torchrun, fp16 loss scaling or with group copies (their averaging, unscaling and per-class solves expect
        one J), or when the whole K fits (:func:`recon._chunks.default_task_chunk`)."""
        if self.shared_idx is None or _distributed.active() or getattr(self.precision, "scaling", False):
            return None
        if self.copies:
            return None
        if self._chunk is None:
            n_params = sum(self.params[i].numel() for i in self.shared_idx)
            K = len(self.tasks)
            self._chunk = self.task_chunk or default_task_chunk(K, n_params, self.device)
        return self._chunk if self._chunk < len(self.tasks) else None

    def records(self) -> bool:
        """Whether this step computes the K task gradients for the observers (always before the shared set is
        known: the first step of a run)."""
        return self.every == 1 or self.shared_idx is None or self.step % self.every == 0

    def update(self, values: Mapping[str, Tensor], loss_vector: Tensor) -> None:
        """Fill ``.grad`` with the method's update (observers see the task gradients first) and step, unless the
        precision hook found overflowing gradients (``step_ok`` False). On a step that does not record
        (:meth:`records`) the observers are skipped and a gradient method takes the cheap path."""
        recording = self.records()
        observing = [o for o in self.observers if o.wants_gradients] if recording else []
        self.step_ok = True
        size = self.chunk_size()
        if self._through_j and not recording:
            self._mean_loss_step(values)
        elif self._through_j and size is not None and gram_only(self.method):
            chunks = TaskChunks(
                [values[t] for t in self.tasks], self.params, self.shared_idx, size=size, batched=self.batched,
                weights=constant_weights(self.method, len(self.tasks), loss_vector),
            )  # fmt: skip
            for o in observing:
                o.on_gradients(self, chunks)
            apply_chunked(chunks, self.method, loss_vector)
        elif self._through_j:
            grads = self.task_gradients(values)
            if self.step_ok:  # an overflowing fp16 step is skipped whole: no cosines, no update
                for o in observing:
                    o.on_gradients(self, grads)
                apply_task_gradients(grads, self.params, self.method, loss_vector)
            del grads
        else:
            if observing:  # the observers' own K passes; the method's backward below decides the step
                grads = self.task_gradients(values, keep_graph=True, update=False)
                for o in observing if self.step_ok else ():
                    o.on_gradients(self, grads)
                del grads
            if self.step_ok:
                scaling = getattr(self.precision, "scaling", False)
                result = backward(
                    dict(values), self.model, self.method, shared=self._shared, step=self.step,
                    batched=self.batched, precision=self.precision if scaling else None,
                )  # fmt: skip
                self._shared = result.shared or None
                self.step_ok = result.finite
            else:
                self.precision.update(False)  # type: ignore[attr-defined]  # only a scaling precision overflows
        if self.step_ok:
            self.precision.step(self.optimizer)

    def _mean_loss_step(self, values: Mapping[str, Tensor]) -> None:
        """One backward of the mean loss, then the parameters outside J (heads, branches) scaled by K and a group
        copy's by ``K / |group|``: the same ``.grad`` as the mean method (the mean of the task gradients on the
        shared parameters, the group's mean on a group copy, each task's own gradient on the others) at the cost
        of one backward, not K."""
        scaling = getattr(self.precision, "scaling", False)
        result = backward(
            dict(values), self.model, self._mean_loss, step=self.step, precision=self.precision if scaling else None
        )
        self.step_ok = result.finite
        shared = set(self.shared_idx or ())
        K = len(self.tasks)
        for i, p in enumerate(self.params):
            # a group copy: its group's mean (recon._usage); a shared parameter: the mean; others: their own
            factor = K / len(self.copies[i]) if i in self.copies else (1 if i in shared else K)
            if factor != 1 and p.grad is not None:
                p.grad.mul_(factor)

    def run_step(self, batch: Any) -> list[float]:
        """One whole step on one global batch; returns the K loss values."""
        self.optimizer.zero_grad(set_to_none=True)
        values = self.forward_losses(batch)
        loss_vector, row = self.check_losses(values)
        self.update(values, loss_vector)
        self.optimizer.zero_grad(set_to_none=True)  # .grad is not kept between steps: memory for J
        self.step += 1
        for o in self.observers:
            o.on_step(self, row)
        return row

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self, data: Any, *, epochs: int | None, start_epoch: int = 0, max_steps: int | None = None) -> int:
        """Epochs ``start_epoch .. epochs - 1`` over ``data`` (endless with ``epochs=None``), stopping once
        ``self.step`` reaches ``max_steps`` or when a pass yields no batch (a used-up one-shot iterator).
        Returns the number of steps taken."""
        if isinstance(data, Iterator) and epochs is not None and epochs - start_epoch > 1:
            raise ReconError(
                f"{self.where} is a one-shot iterator (a generator) but {epochs - start_epoch} epochs were asked; "
                "give a list or a DataLoader, or a function that returns a fresh iterator"
            )
        first = self.step
        epoch = start_epoch
        while epochs is None or epoch < epochs:
            n = 0
            for batch in batches(data):
                if max_steps is not None and self.step >= max_steps:
                    return self.step - first
                self.run_step(batch)
                n += 1
            if n == 0 and epoch > start_epoch and epochs is not None:
                raise ReconError(
                    f"{self.where} yielded no batch in epoch {epoch + 1} of {epochs}: it is a one-shot iterator "
                    "(a generator) used up by the first pass; give a list or a DataLoader, or a function that "
                    "returns a fresh iterator"
                )
            for o in self.observers:
                o.on_epoch_end(self, epoch, n)
            if n == 0:
                break
            epoch += 1
        return self.step - first
