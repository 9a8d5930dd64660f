"""Branching, the second pass of :func:`recon.split`: module surgery that gives each branched layer its copies.

* :class:`TaskBranches`: the per-task (per-group) copies of one layer, at the layer's own path, and the
  *task scope* (:func:`task_scope`, :func:`call_for_task`) that routes a call inside a leaf to a task's copy;
* :class:`TaskStatsBatchNorm`: a shared BatchNorm with one set of running statistics per task that runs it;
* :func:`branch`: applies the analysis (:mod:`recon._split_analysis`) to the model copy, changing only modules.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from recon._errors import ReconError

if TYPE_CHECKING:
    from recon._split_analysis import Analysis

__all__ = [
    "TaskBranches",
    "TaskStatsBatchNorm",
    "branch",
    "call_for_task",
    "current_task",
    "task_scope",
]


# ------------------------------------------------------------------------------------------ task scope
_local = threading.local()


def current_task() -> str | None:
    """The task whose branch a :class:`TaskBranches` container forwards to right now (None outside)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextmanager
def task_scope(task: str) -> Iterator[None]:
    """Within this block, every :class:`TaskBranches` container forwards to ``task``'s copy."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(task)
    try:
        yield
    finally:
        stack.pop()


def call_for_task(module: nn.Module, task: str, /, *args: Any, **kwargs: Any) -> Any:
    """Call ``module`` with ``task``'s branches: used for leaf modules that contain a branched layer."""
    with task_scope(task):
        return module(*args, **kwargs)


call_for_task._recon_task_call = True  # type: ignore[attr-defined]  # recognised by _graph's analysis


class TaskBranches(nn.Module):
    """The per-task copies of one branched layer, at the layer's own path (``net.layer1.0.bn1.seg``).

    Children named after a task are that task's copy; any other child is a submodule of the original layer
    that stays shared (its copies reach it without registering it twice). Calling the container, or reading
    an attribute it does not have (``.weight``), goes to the copy of the current :func:`task_scope`; the
    rewritten graph calls the copies directly wherever it can.
    """

    def __init__(
        self,
        copies: Mapping[str, nn.Module],
        shared: Mapping[str, nn.Module] | None = None,
        route: Mapping[str, str] | None = None,
    ):
        super().__init__()
        clash = sorted(set(copies) & set(shared or {}))
        if clash:
            raise ReconError(f"task name(s) {clash} clash with submodules of the layer to branch; rename the task(s)")
        for name, module in (shared or {}).items():
            self.add_module(name, module)
        for task, module in copies.items():
            self.add_module(task, module)
        self._recon_tasks = tuple(copies)
        # task -> the copy that serves it: a task group's copy is named after the group's first task
        self._recon_route = {**{t: t for t in copies}, **dict(route or {})}

    @property
    def route(self) -> dict[str, str]:
        """``{task: name of the copy it uses}`` (identity for a per-task split)."""
        return dict(self._recon_route)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._recon_tasks

    def __getitem__(self, task: str) -> nn.Module:
        if task not in self._recon_route:
            raise KeyError(f"no branch for task {task!r}; branches: {list(self._recon_tasks)}")
        return self._modules[self._recon_route[task]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._recon_tasks)

    def __len__(self) -> int:
        return len(self._recon_tasks)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        task = current_task()
        if task not in self._recon_route:
            raise RuntimeError(
                f"this layer has one branch per task {list(self._recon_tasks)}; call it as net.<path>.<task>"
                f"(...) or inside recon's task_scope(task) (current task: {task!r})"
            )
        return self._modules[self._recon_route[task]](*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            route = self.__dict__.get("_recon_route")
            task = current_task()
            if not route or task not in route:
                raise
            return getattr(self._modules[route[task]], name)

    def extra_repr(self) -> str:
        return f"tasks={list(self._recon_tasks)}"


# ------------------------------------------------------------------------------- per-task BN statistics
_STATS = ("running_mean", "running_var", "num_batches_tracked")


class TaskStatsBatchNorm(_BatchNorm):
    """A shared BatchNorm with one set of running statistics per task that runs it.

    :func:`split` turns a shared BatchNorm that runs once per task (it sits downstream of a branched layer)
    into one of these, in place: the module at the BatchNorm's path is still an instance of the original
    class (``TaskStatsBatchNorm2d`` subclasses ``nn.BatchNorm2d``; a subclass of your own BatchNorm class is
    made as needed), ``weight`` and ``bias`` are the same shared parameters under the same ``state_dict``
    keys, and each task gets its own buffers::

        layer2.0.bn1.weight                     shared affine parameters, as before
        layer2.0.bn1.bias
        layer2.0.bn1.running_mean_seg           task seg's statistics
        layer2.0.bn1.running_var_seg
        layer2.0.bn1.num_batches_tracked_seg
        layer2.0.bn1.running_mean_depth         task depth's statistics ...

    The rewritten graph calls it as ``call_for_task(bn, task, x)``: inside a :func:`task_scope` it normalises
    (in eval mode) and updates (in train mode) that task's statistics only. The shared ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are kept only where the graph still runs the module once for
    all tasks (a call upstream of every branched layer, or a read of a buffer); otherwise they are ``None``
    and a call outside a task scope is an error. A ``state_dict`` that holds one shared set (saved before
    per-task statistics existed, or by the unsplit model) loads into every task's statistics.

    Convert to ``nn.SyncBatchNorm`` (``convert_sync_batchnorm``) before splitting, not after: the conversion
    builds plain modules from the shared buffers and would drop the per-task ones.
    """

    _recon_tasks: tuple[str, ...] = ()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks with their own running statistics, in task order."""
        return self._recon_tasks

    def running_stats(self, task: str) -> dict[str, torch.Tensor]:
        """``{"running_mean": ..., "running_var": ..., "num_batches_tracked": ...}`` of ``task`` (live buffers)."""
        if task not in self._recon_tasks:
            raise KeyError(f"no running statistics for task {task!r}; tasks: {list(self._recon_tasks)}")
        return {k: self._buffers[f"{k}_{task}"] for k in _STATS}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        task = current_task()
        if task in self._recon_tasks:
            buffers = self._buffers
            shared = {k: buffers[k] for k in _STATS}
            buffers.update({k: buffers[f"{k}_{task}"] for k in _STATS})  # the original forward, on task's stats
            try:
                return super().forward(input)
            finally:
                buffers.update(shared)
        if self._buffers.get("running_mean") is None:
            raise RuntimeError(
                f"this BatchNorm keeps one set of running statistics per task {list(self._recon_tasks)}; call it "
                f"as recon's call_for_task(module, task, x) or inside task_scope(task) (current task: {task!r})"
            )
        return super().forward(input)

    def reset_running_stats(self) -> None:
        for suffix in ("", *(f"_{t}" for t in self._recon_tasks)):
            mean, var, count = (self._buffers.get(k + suffix) for k in _STATS)
            if mean is not None:
                mean.zero_()
            if var is not None:
                var.fill_(1)
            if count is not None:
                count.zero_()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for k in _STATS:  # one shared set (an older checkpoint, or the unsplit model's): a copy for every task
            old = prefix + k
            if old in state_dict and not any(f"{old}_{t}" in state_dict for t in self._recon_tasks):
                for t in self._recon_tasks:
                    state_dict[f"{old}_{t}"] = state_dict[old].clone()
                if self._buffers.get(k) is None:
                    del state_dict[old]
        # the buffers are all there (BatchNorm's pre-2018 fix-up would add a num_batches_tracked key)
        local_metadata = {**local_metadata, "version": max(local_metadata.get("version") or 2, 2)}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tasks={list(self._recon_tasks)}"


class TaskStatsBatchNorm1d(TaskStatsBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with per-task running statistics (see :class:`TaskStatsBatchNorm`)."""


class TaskStatsBatchNorm2d(TaskStatsBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-task running statistics (see :class:`TaskStatsBatchNorm`)."""


class TaskStatsBatchNorm3d(TaskStatsBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with per-task running statistics (see :class:`TaskStatsBatchNorm`)."""


class TaskStatsSyncBatchNorm(TaskStatsBatchNorm, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with per-task running statistics (see :class:`TaskStatsBatchNorm`)."""


_TASK_STATS_CLASSES: dict[type, type] = {
    nn.BatchNorm1d: TaskStatsBatchNorm1d,
    nn.BatchNorm2d: TaskStatsBatchNorm2d,
    nn.BatchNorm3d: TaskStatsBatchNorm3d,
    nn.SyncBatchNorm: TaskStatsSyncBatchNorm,
}


def _task_stats_class(cls: type) -> type:
    """The per-task-statistics subclass of a BatchNorm class (made once for a class of the user's own)."""
    if issubclass(cls, TaskStatsBatchNorm):
        return cls
    if cls not in _TASK_STATS_CLASSES:
        _TASK_STATS_CLASSES[cls] = type(
            f"TaskStats{cls.__name__}",
            (TaskStatsBatchNorm, cls),
            {"__module__": __name__, "__doc__": f"{cls.__name__} with per-task running statistics."},
        )
    return _TASK_STATS_CLASSES[cls]


def _tracks_stats(module: nn.Module) -> bool:
    """A BatchNorm whose running statistics a forward in train mode updates."""
    if isinstance(module, TaskStatsBatchNorm):
        return True
    return (
        isinstance(module, _BatchNorm)
        and bool(module.track_running_stats)
        and module._buffers.get("running_mean") is not None
    )


def _give_task_stats(bn: nn.Module, name: str, tasks: Sequence[str], keep_shared: bool, init: str) -> None:
    """Turn ``bn`` (in place) into a :class:`TaskStatsBatchNorm` with statistics for ``tasks``: new ones are
    copies of its shared statistics (``init="copy"``) or fresh (``"reinit"``: mean 0, variance 1, count 0)."""
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        raise ReconError(
            f"BatchNorm {name!r} is lazy and not initialised yet, so recon cannot give each task its own running "
            "statistics; run one forward pass through the model before splitting it"
        )
    known = tuple(getattr(bn, "_recon_tasks", ()))
    per_task = {f"{k}_{t}" for k in _STATS for t in known}
    old = bn._buffers
    shared = {k: old.get(k) for k in _STATS}
    buffers: dict[str, torch.Tensor | None] = {}
    for key, value in old.items():
        if key in _STATS:
            buffers[key] = value if keep_shared else None
        elif key not in per_task:
            buffers[key] = value
    for t in tasks:
        for k in _STATS:
            if t in known:
                buffers[f"{k}_{t}"] = old[f"{k}_{t}"]
            elif init == "copy" and shared[k] is not None:
                buffers[f"{k}_{t}"] = shared[k].detach().clone()
            else:
                like = next(v for v in (shared[k], *(old[f"{k}_{u}"] for u in known)) if v is not None)
                buffers[f"{k}_{t}"] = torch.ones_like(like) if k == "running_var" else torch.zeros_like(like)
    bn.__class__ = _task_stats_class(type(bn))
    bn._buffers = buffers
    bn._non_persistent_buffers_set = set(bn._non_persistent_buffers_set) | {
        f"{k}_{t}" for k in _STATS if k in bn._non_persistent_buffers_set for t in tasks
    }
    bn._recon_tasks = tuple(tasks)


# ----------------------------------------------------------------------------------------------- split
def _reset(module: nn.Module, name: str) -> None:
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    if not callable(reset):
        cls = type(module).__name__
        raise ReconError(
            f"layer {name!r} ({cls}) has no reset_parameters(), so init='reinit' cannot re-initialise its "
            f"copies; use init='copy' or give {cls} a reset_parameters() method"
        )
    with torch.no_grad():
        reset()


def _task_copy(layer: nn.Module, name: str, task: str, init: str) -> nn.Module:
    """A copy of ``layer`` with its own parameters and buffers; its submodules stay the shared ones."""
    if not layer._modules:
        new = copy.deepcopy(layer)
        if init == "reinit":
            _reset(new, name)
        return new
    source = layer
    if init == "reinit":  # reset a full private copy, so shared children are never touched
        source = copy.deepcopy(layer)
        with task_scope(task):  # a child that is branched itself resolves to this task's copy
            _reset(source, name)
    new = copy.copy(layer)
    new.__dict__ = dict(layer.__dict__)
    for attr, value in layer.__dict__.items():  # hook dicts and the like must not be shared
        if isinstance(value, dict) and attr != "_modules":
            new.__dict__[attr] = value.copy()
    with torch.no_grad():
        new._parameters = {
            k: None if p is None else nn.Parameter(source._parameters[k].detach().clone(), p.requires_grad)
            for k, p in layer._parameters.items()
        }
        new._buffers = {k: None if b is None else source._buffers[k].clone() for k, b in layer._buffers.items()}
    new._non_persistent_buffers_set = set(layer._non_persistent_buffers_set)
    children, new._modules = layer._modules, {}
    for child_name, child in children.items():  # reachable as attributes, registered only once (shared)
        object.__setattr__(new, child_name, child)
    return new


def _check_tasks_as_names(tasks: Sequence[str]) -> None:
    probe = TaskBranches({})
    for task in tasks:
        if hasattr(probe, task) or task in dir(nn.Module):
            raise ReconError(
                f"task name {task!r} clashes with an nn.Module attribute, so it cannot name a branch; rename the task"
            )


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(model.get_submodule(parent), last, new)


def branch(src: nn.Module, facts: Analysis, init: str) -> None:
    """Branching: one copy per task group at each branched layer's path (deepest first); per-task
    running statistics for the shared BatchNorms that run per task class."""
    aliases = _aliases(src)
    made: dict[tuple[int, str], nn.Parameter] = {}  # (original parameter, copy): a tied weight's one copy
    for layer in sorted(facts.groups, key=lambda name: name.count("."), reverse=True):
        original = src.get_submodule(layer)
        copies = {g[0]: _task_copy(original, layer, g[0], init) for g in facts.groups[layer]}
        for name, new in copies.items():
            for key, p in original._parameters.items():
                if p is not None:
                    new._parameters[key] = made.setdefault((id(p), name), new._parameters[key])
        container = TaskBranches(copies, shared=dict(original._modules), route=facts.route[layer])
        container.training = original.training
        for path in aliases[id(original)]:
            _replace(src, path, container)
    for bn, name, bn_tasks, keep_shared in facts.stats_bns.values():
        _give_task_stats(bn, name, bn_tasks, keep_shared, init)
