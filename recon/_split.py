"""Stage 2: rewrite a model with torch.fx so that chosen shared layers become per-task branches.

``split(model, layers)`` traces the model (``_graph``), gives each chosen layer one copy per task that uses it
(kept at the layer's own path: ``layer1.0.bn1.seg``), and emits a new graph in which

* computation that is not downstream of a branched layer runs once, as before;
* every node downstream of a branched layer runs once per task that it feeds, each task's copy reading that
  task's branch; shared layers downstream keep shared weights (they are called once per task);
* a layer called at several places is branched at every call site; ``get_attr`` reads of a branched layer's
  parameters or buffers read the task's copy;
* an in-place operation that a task's copy would apply to a tensor shared by all tasks writes into a per-task
  clone instead, so the tasks do not see each other's writes;
* a shared BatchNorm that runs once per task for two or more tasks keeps its shared ``weight``/``bias`` but
  gets one set of running statistics per task (:class:`TaskStatsBatchNorm`), so that in eval mode each task
  is normalised with the statistics of its own features, not with an average over the tasks.

A branched layer that lives inside a leaf module (a module fx records as one opaque call, such as
``nn.TransformerEncoderLayer``) is handled by calling that module once per task under a *task scope*: the
layer's path holds a :class:`TaskBranches` container that forwards to the current task's copy.

Never pickle the result: rebuild it with :func:`load_split` from a fresh model and a :class:`SplitPlan`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from recon._capture import capture as capture_graph
from recon._capture import check_outputs, recaptured
from recon._errors import ReconError, did_you_mean
from recon._graph import (
    LeafSpec,
    layer_names,
    modules_in_call,
    mutated_input,
    node_tasks,
    output_tasks,
    to_digraph,
)

__all__ = [
    "SplitPlan",
    "TaskBranches",
    "TaskStatsBatchNorm",
    "call_for_task",
    "current_task",
    "load_split",
    "plan_of",
    "shared_parameters",
    "split",
    "task_parameters",
    "task_scope",
]

META_KEY = "recon"
INITS = ("reinit", "copy")


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


# ------------------------------------------------------------------------------------------------ plan
@dataclasses.dataclass
class SplitPlan:
    """What :func:`split` did, as a small JSON object (``split/plan.json``): enough to rebuild the model.

    ``layers`` are in score order when they come from a profile. ``groups`` maps a layer to its task groups
    (``{layer: [[task, ...], ...]}``; a layer not in it has one copy per task, and a plan written before groups
    existed has none). ``S``, ``top_k``, ``scores``, ``budget_params`` and ``budget_flops`` record how they
    were chosen (:func:`recon.plan_split`); ``capture``, ``leaf_modules`` and ``concrete_args`` how the model
    was captured. Unknown keys read from JSON are kept in ``extra`` and written back.
    """

    tasks: list[str]
    layers: list[str]
    init: str = "reinit"
    S: float | None = None
    top_k: int | None = None
    scores: dict[str, float] | None = None
    groups: dict[str, list[list[str]]] | None = None
    budget_params: float | None = None
    budget_flops: float | None = None
    leaf_modules: list[str] = dataclasses.field(default_factory=list)
    concrete_args: dict[str, Any] | None = None
    model_class: str | None = None
    capture: str | None = None  # how the graph was captured: "fx", "export", "fx+leaves[...]" (None: an older plan, fx)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data = {k: v for k, v in data.items() if v is not None or k in ("tasks", "layers", "init")}
        data.update(self.extra)
        return data

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), indent=2) + "\n"
        except TypeError as exc:
            raise ReconError(
                f"the split plan is not JSON-serialisable ({exc}); give concrete_args JSON values, or pass "
                "them again to recon.load_split"
            ) from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitPlan:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = [k for k in ("tasks", "layers") if k not in data]
        if missing:
            raise ReconError(f"the split plan has no {missing}; write it with recon split (plan.json)")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        plan = cls(**known, extra=extra)
        plan.tasks, plan.layers = list(plan.tasks), list(plan.layers)
        plan.leaf_modules = list(plan.leaf_modules or [])
        if plan.groups is not None:
            if not isinstance(plan.groups, Mapping) or set(plan.groups) - set(plan.layers):
                raise ReconError("the split plan's 'groups' must map branched layers to lists of task lists")
            plan.groups = {k: [list(g) for g in v] for k, v in plan.groups.items()}
        if plan.init not in INITS:
            raise ReconError(f"the split plan has init={plan.init!r}; use one of {list(INITS)}")
        return plan

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> SplitPlan:
        if isinstance(text, Mapping):
            return cls.from_dict(text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReconError(f"the split plan is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ReconError("the split plan must be a JSON object with 'tasks' and 'layers'")
        return cls.from_dict(data)

    def layer_spec(self) -> list[str] | dict[str, list[list[str]] | None]:
        """What :func:`split` takes: the layers, or ``{layer: groups}`` when the plan has groups."""
        if not self.groups:
            return list(self.layers)
        return {layer: self.groups.get(layer) for layer in self.layers}

    def save(self, path: str | os.PathLike) -> Path:
        from recon._io import write_text

        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SplitPlan:
        path = Path(path)
        if not path.is_file():
            raise ReconError(f"no split plan at {path}; run `recon split` first or give the path to plan.json")
        return cls.from_json(path.read_text(encoding="utf-8"))


def plan_of(net: fx.GraphModule) -> SplitPlan:
    """The :class:`SplitPlan` of a model made by :func:`split` (``S``/``top_k``/``scores`` left empty)."""
    meta = getattr(net, "meta", {}).get(META_KEY) if isinstance(net, fx.GraphModule) else None
    if not meta:
        raise ReconError("this model was not made by recon.split; split it first")
    return SplitPlan(
        tasks=list(meta["tasks"]),
        layers=list(meta["layers"]),
        init=meta["init"],
        groups={k: [list(g) for g in v] for k, v in meta.get("groups", {}).items()},
        leaf_modules=list(meta["leaf_modules"]),
        concrete_args=meta["concrete_args"],
        model_class=meta["model_class"],
        capture=meta.get("capture", "fx"),
    )


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


def _validate_layers(layers: Sequence[str], usage: Mapping[str, frozenset[str]], model_name: str) -> list[str]:
    shared = [n for n, t in usage.items() if len(t) >= 2 and n]
    valid = f"the shared layers of {model_name} are: {shared}" if shared else f"{model_name} has no shared layer"
    seen: set[str] = set()
    for layer in layers:
        if not isinstance(layer, str):
            raise ReconError(f"layer names must be strings, got {layer!r}; {valid}")
        if layer in seen:
            raise ReconError(f"layer {layer!r} is listed twice; {valid}")
        seen.add(layer)
        if layer == "":
            raise ReconError(
                f"the model's own (root) parameters cannot be branched; move them into a submodule; {valid}"
            )
        if layer not in usage:
            hint = did_you_mean(layer, usage)
            raise ReconError(f"unknown layer {layer!r}{hint} (not a module that owns parameters); {valid}")
        if len(usage[layer]) < 2:
            used = sorted(usage[layer])
            who = f"only task {used[0]!r}" if used else "no task"
            raise ReconError(f"layer {layer!r} is used by {who}, so it is not shared; {valid}")
    return list(layers)


def _skip_tensors(model: nn.Module, layers: Sequence[str]) -> dict[int, Any]:
    """A deepcopy memo that leaves the own tensors of the layers to branch uncopied: they are replaced by
    fresh per-task copies anyway, so copying them first would only cost time and memory."""
    chosen: dict[int, nn.Module] = {}
    for name in layers:
        try:
            module = model.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            continue
        if module is not None:
            chosen[id(module)] = module

    def own(module: nn.Module) -> list[torch.Tensor]:
        return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]

    memo = {id(t): t for module in chosen.values() for t in own(module)}
    for module in model.modules():  # a tensor tied to a layer that stays must be copied as usual
        if id(module) not in chosen:
            for t in own(module):
                memo.pop(id(t), None)
    return memo


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(model.get_submodule(parent), last, new)


def _branch_owner(target: str, branched: frozenset[str]) -> tuple[str, str] | None:
    owner, _, attr = target.rpartition(".")
    return (owner, attr) if owner in branched else None


def _node_uses_branch(gm: fx.GraphModule, node: fx.Node, branched: frozenset[str]) -> set[str]:
    if node.op == "get_attr":
        hit = _branch_owner(str(node.target), branched)
        return {hit[0]} if hit else set()
    if node.op == "call_module":
        return {n for n in modules_in_call(gm, str(node.target)) if n in branched}
    return set()


Groups = dict[str, list[list[str]]]
NODE_KEY = "recon_split"  # per-node facts of the analysis, in ``node.meta`` (as fx passes keep theirs)


@dataclasses.dataclass
class NodeFacts:
    """What the analysis knows about one node of the traced graph (``node.meta["recon_split"]``).

    * ``uses``: the branched layers the node calls or reads directly;
    * ``upstream``: the branched layers at or upstream of it (``down`` = it has any);
    * ``classes``: ``{representative: [tasks]}``, one entry per copy of the node in the new graph: the tasks
      it feeds, grouped by the copy they took at every branched layer upstream (first task in task order
      represents its class); empty when the node is not downstream of a branch (it runs once, shared);
    * ``mutates``: the input an in-place operation writes into (None if it does not).
    """

    uses: frozenset[str]
    upstream: frozenset[str]
    classes: dict[str, list[str]]
    mutates: fx.Node | None = None

    @property
    def down(self) -> bool:
        return bool(self.upstream)


@dataclasses.dataclass
class _Analysis:
    """The whole-graph facts :func:`split` branches and emits from (nothing changed yet)."""

    tasks: list[str]
    groups: Groups
    route: dict[str, dict[str, str]]  # layer -> {task: copy name}
    stats_calls: dict[tuple[fx.Node, str], set[int]]
    stats_bns: dict[int, tuple[nn.Module, str, list[str], bool]]


def _normalise_groups(
    layers: Iterable[str] | Mapping[str, Any], usage: Mapping[str, frozenset[str]], tasks: Sequence[str], model: str
) -> Groups:
    """``{layer: groups}``: each group a list in task order, groups ordered by their first task.

    A list of names means one group per task that uses the layer; a dict value of ``None`` does too. A dict
    value must be a partition of the tasks that use the layer.
    """
    spec = dict(layers) if isinstance(layers, Mapping) else dict.fromkeys(layers)
    names = _validate_layers(list(layers), usage, model)
    order = {t: i for i, t in enumerate(tasks)}
    out: Groups = {}
    for layer in names:
        users = [t for t in tasks if t in usage[layer]]
        given = spec[layer]
        if given is None:
            out[layer] = [[t] for t in users]
            continue
        if isinstance(given, str) or not all(isinstance(g, (list, tuple)) and g for g in given):
            raise ReconError(
                f"groups of layer {layer!r} must be a list of non-empty task lists, e.g. {[[t] for t in users]}"
            )
        flat = [t for g in given for t in g]
        unknown = [t for t in flat if t not in order]
        if unknown:
            raise ReconError(f"unknown task(s) {unknown} in the groups of layer {layer!r}; the tasks are {list(tasks)}")
        if sorted(flat, key=order.get) != users:
            raise ReconError(
                f"the groups of layer {layer!r} ({[list(g) for g in given]}) are not a partition of the tasks that "
                f"use it {users}; list each of them in exactly one group"
            )
        out[layer] = sorted((sorted(g, key=order.get) for g in given), key=lambda g: order[g[0]])
    return out


def _routes(groups: Groups) -> dict[str, dict[str, str]]:
    return {layer: {t: g[0] for g in gs for t in g} for layer, gs in groups.items()}


def _classes(tasks: list[str], upstream: frozenset[str], route: Mapping[str, Mapping[str, str]]) -> dict:
    """Tasks grouped by the copy they take at every layer of ``upstream``; keyed by each class's first task."""
    classes: dict[tuple, list[str]] = {}
    for t in tasks:
        classes.setdefault(tuple(route[layer].get(t, t) for layer in sorted(upstream)), []).append(t)
    return {members[0]: members for members in classes.values()}


def _analyse(
    gm: fx.GraphModule, src: nn.Module, tasks: Sequence[str] | None, layers: Any, model: str, captured: Any
) -> _Analysis:
    """Analysis: which nodes run per task class, which BatchNorms need per-task statistics (node.meta)."""
    digraph = to_digraph(gm)
    reach = node_tasks(gm, tasks, digraph)
    task_list = list(output_tasks(gm, tasks))
    usage = captured.layer_tasks(task_list, layer_names(src))
    groups = _normalise_groups(layers, usage, task_list, model)
    route = _routes(groups)
    branched = frozenset(groups)
    if branched:
        _check_tasks_as_names(task_list)
    modules = dict(gm.named_modules())
    run: dict[fx.Node, list[str]] = {}  # every task a node downstream of a branch runs for
    for n in gm.graph.nodes:
        uses = frozenset(_node_uses_branch(gm, n, branched))
        upstream = uses.union(*(n_.meta[NODE_KEY].upstream for n_ in digraph.predecessors(n)))
        facts = n.meta[NODE_KEY] = NodeFacts(uses, upstream, {})
        if n.op == "output" or not upstream:
            continue
        facts.mutates = mutated_input(n, modules)
        run[n] = [t for t in task_list if t in reach[n]]
        if not run[n] and n.is_impure():
            needed = [a for a in n.all_input_nodes if a.meta[NODE_KEY].down]
            run[n] = [t for t in task_list if all(t in run[a] for a in needed)]
        facts.classes = _classes(run[n], upstream, route)
    reps = {n: list(n.meta[NODE_KEY].classes) for n in run}
    stats_calls, stats_bns = _batchnorm_calls(gm, reps, task_list, branched)
    return _Analysis(task_list, groups, route, stats_calls, stats_bns)


def _branch(src: nn.Module, facts: _Analysis, init: str) -> None:
    """Branching: one copy per task group at each branched layer's path (deepest first); per-task
    running statistics for the shared BatchNorms that run per task class."""
    aliases = _aliases(src)
    for layer in sorted(facts.groups, key=lambda name: name.count("."), reverse=True):
        original = src.get_submodule(layer)
        copies = {g[0]: _task_copy(original, layer, g[0], init) for g in facts.groups[layer]}
        container = TaskBranches(copies, shared=dict(original._modules), route=facts.route[layer])
        container.training = original.training
        for path in aliases[id(original)]:
            _replace(src, path, container)
    for bn, name, bn_tasks, keep_shared in facts.stats_bns.values():
        _give_task_stats(bn, name, bn_tasks, keep_shared, init)


def _emit(gm: fx.GraphModule, facts: _Analysis) -> fx.Graph:
    """Emission: the new graph, each node downstream of a branch once per task class (node.meta facts)."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    shared_env: dict[fx.Node, fx.Node] = {}
    task_env: dict[str, dict[fx.Node, fx.Node]] = {t: {} for t in facts.tasks}
    module_nodes: dict[str, fx.Node] = {}  # get_attr of a module, for call_for_task
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        info: NodeFacts = n.meta[NODE_KEY]
        if not info.down:
            shared_env[n] = new = graph.node_copy(n, lambda a: shared_env[a])
            if isinstance(new.type, str):  # string annotations print as odd globals; drop them
                new.type = None
            new.meta.pop(NODE_KEY, None)
            continue
        for rep, members in info.classes.items():
            new = _emit_copy(graph, n, info, rep, facts, shared_env, task_env, module_nodes)
            for t in members:
                task_env[t][n] = new
    out_type = None if isinstance(out_node.type, str) else out_node.type
    graph.output(_map_output(out_node.args[0], facts.tasks, shared_env, task_env), type_expr=out_type)
    graph.lint()
    return graph


def _emit_copy(
    graph: fx.Graph,
    n: fx.Node,
    info: NodeFacts,
    rep: str,
    facts: _Analysis,
    shared_env: dict[fx.Node, fx.Node],
    task_env: dict[str, dict[fx.Node, fx.Node]],
    module_nodes: dict[str, fx.Node],
) -> fx.Node:
    """The copy of node ``n`` for the task class represented by ``rep``."""
    env = task_env[rep]

    def get(a: fx.Node) -> fx.Node:
        return env[a] if a in env else shared_env[a]

    args = fx.node.map_arg(n.args, get)
    kwargs = fx.node.map_arg(n.kwargs, get)
    mutated = info.mutates
    if mutated is not None and _shared_beyond(mutated, rep, info.classes[rep]):
        # an in-place write into a tensor that tasks outside this class share: give this class its own clone
        clone = graph.create_node("call_method", "clone", (get(mutated),), name=f"{mutated.name}_{rep}")
        args = (clone, *args[1:])
        for t in info.classes[rep]:
            task_env[t][mutated] = clone
    name = n.name if len(info.classes) == 1 and rep in n.name.split("_") else f"{n.name}_{rep}"
    if n.op == "call_module":
        scoped = bool(facts.stats_calls.get((n, rep), set()) & facts.stats_bns.keys())
        own = facts.route[str(n.target)][rep] if str(n.target) in info.uses else None
        new = _emit_module_call(graph, str(n.target), rep, own, args, kwargs, info.uses, name, module_nodes, scoped)
    elif n.op == "get_attr":
        hit = _branch_owner(str(n.target), frozenset(facts.groups))
        target = f"{hit[0]}.{facts.route[hit[0]][rep]}.{hit[1]}" if hit else n.target
        new = graph.create_node("get_attr", target, name=name)
    else:
        new = graph.create_node(n.op, n.target, args, kwargs, name=name, type_expr=n.type)
    new.meta = {k: v for k, v in n.meta.items() if k != NODE_KEY}
    return new


def _shared_beyond(node: fx.Node, rep: str, members: Sequence[str]) -> bool:
    """Whether the value of ``node`` that task ``rep`` reads is also read by tasks outside ``members``."""
    classes = node.meta[NODE_KEY].classes
    if not classes:
        return True  # computed once for all tasks
    mine = next((c for c in classes.values() if rep in c), [])
    return not set(mine) <= set(members)


def _prior(model: nn.Module) -> dict[str, Any] | None:
    """What an earlier :func:`split` recorded on ``model`` (None for a model that was not split)."""
    prior = model.meta.get(META_KEY) if isinstance(model, fx.GraphModule) else None
    if prior and any(len(g) > 1 for gs in prior.get("groups", {}).values() for g in gs):
        raise ReconError(
            "this model was split with task groups, and splitting it again is not supported; split the original "
            "model once with every layer: recon.split(model, {layer: groups, ...})"
        )
    return prior


def split(
    model: nn.Module,
    layers: Iterable[str] | Mapping[str, Sequence[Sequence[str]] | None],
    *,
    tasks: Sequence[str] | None = None,
    init: str = "reinit",
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
    capture: str = "auto",
) -> fx.GraphModule:
    """Rewrite ``model`` so that each of ``layers`` becomes one copy per task (or per task group) that uses it.

    ``layers`` is a list of layer names (one copy per task that uses the layer), or a dict
    ``{layer: [[task, ...], ...]}`` mapping a layer to a partition of the tasks that use it: one copy per
    group, named after the group's first task in task order (``net.get_submodule("layer2.conv1.seg")`` serves
    every task of seg's group; a value of ``None`` means one group per task). A node downstream of branched
    layers runs once per class of tasks that took the same copy at every branched layer upstream of it, so
    tasks that never diverged share the computation. A branched layer adds (groups - 1) x its parameters.

    Returns a ``torch.fx.GraphModule`` with the model's call signature and output structure; ``model`` is
    not changed. ``tasks`` names the outputs of a model that returns a tuple/list (in order); dict outputs
    name themselves. ``init="copy"`` starts every copy as the original layer (the split model computes the
    same function); ``"reinit"`` calls each copy's ``reset_parameters()``. ``leaf_modules`` and
    ``concrete_args`` go to the tracer (:func:`recon._graph.trace`). ``example_inputs`` (a tuple of positional
    arguments, or ``(args, kwargs)``) lets recon capture models that symbolic tracing cannot, with
    ``torch.export``, and check the captured graph and (``init="copy"``) the split model against the eager model
    on that batch; ``capture`` picks the way (``"auto"``, ``"fx"``, ``"export"``: :func:`recon._capture.capture`).

    A shared BatchNorm run per task class for 2+ classes gets running statistics per class, keyed by the
    class's first task (:class:`TaskStatsBatchNorm`; ``net.meta["recon"]["task_stats"]``): copies with
    ``init="copy"``, fresh ones with ``"reinit"``. Three passes: analysis (per-node :class:`NodeFacts` in
    ``node.meta["recon_split"]``), branching (module surgery), emission (the new graph).

    Raises :class:`~recon._errors.ReconError` for unknown, unshared or repeated layer names (listing the
    shared ones), groups that are not a partition of the layer's tasks, and :class:`~recon._graph.TraceError`
    for a model fx cannot trace, or one whose graph depends on train/eval mode.
    """
    if init not in INITS:
        raise ReconError(f"init={init!r} is not one of {list(INITS)}")
    layers = [layers] if isinstance(layers, str) else dict(layers) if isinstance(layers, Mapping) else list(layers)
    leaf_modules = list(leaf_modules or ())
    if not isinstance(model, nn.Module):
        raise ReconError(f"recon.split expects an nn.Module, got {type(model).__name__}")
    prior = _prior(model)
    src = copy.deepcopy(model, _skip_tensors(model, list(layers)))
    if isinstance(src, fx.GraphModule):
        captured = recaptured(src, prior, example_inputs)
        if tasks is None and prior:
            tasks = prior["tasks"]
    else:
        captured = capture_graph(
            src, example_inputs=example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, mode=capture
        )
    gm, leaves = captured.gm, captured.leaves
    model_class = prior["model_class"] if prior else type(model).__name__
    facts = _analyse(gm, src, tasks, layers, model_class, captured)
    _branch(src, facts, init)
    graph = _emit(gm, facts)

    names = list(facts.groups)
    net = fx.GraphModule(src, graph, f"{model_class}Split" if names else model_class)
    _adopt_hierarchy(net, src)
    net.meta[META_KEY] = {  # what plan_of and a later split read back
        "tasks": facts.tasks,
        "layers": (list(prior["layers"]) if prior else []) + names,
        "groups": {**(prior.get("groups", {}) if prior else {}), **facts.groups},
        "init": init,
        "leaf_modules": leaves,
        "concrete_args": concrete_args,
        "model_class": model_class,
        "branches": {layer: [g[0] for g in gs] for layer, gs in facts.groups.items()},
        "task_stats": {name: list(bn_tasks) for _, name, bn_tasks, _ in facts.stats_bns.values()},
        "capture": captured.how,
        "example": captured.example,
    }
    if captured.example is not None and init == "copy":  # never hand over a model that computes otherwise
        check_outputs(net, model, captured.example, what="the split model", expected=captured.expected)
    return net


def _batchnorm_calls(
    gm: fx.GraphModule,
    copy_tasks: Mapping[fx.Node, list[str]],
    task_list: Sequence[str],
    branched: frozenset[str],
) -> tuple[dict[tuple[fx.Node, str], set[int]], dict[int, tuple[nn.Module, str, list[str], bool]]]:
    """Which BatchNorms with running statistics each node runs, and which of them need per-task statistics.

    Returns ``{(node, task): {id of BatchNorm}}`` for the per-task copies of the module calls downstream of a
    branch, and ``{id: (module, path, tasks, keep_shared)}`` for the shared BatchNorms that run per task for
    two or more tasks (or that a previous split gave per-task statistics already). ``keep_shared`` says that
    the graph also uses the shared statistics: a call that runs once for all tasks, or a read of a buffer.
    A branched BatchNorm is not among them: each of its copies has statistics of its own already.
    """
    skip = {id(gm.get_submodule(name)) for name in branched}
    found: dict[int, tuple[nn.Module, str]] = {}
    tasks_of: dict[int, set[str]] = {}
    shared_use: set[int] = set()
    calls: dict[tuple[fx.Node, str], set[int]] = {}

    def bns(target: str, task: str | None) -> set[int]:
        ids = set()
        for name in modules_in_call(gm, target, task):
            module = gm.get_submodule(name)
            if id(module) not in skip and _tracks_stats(module):
                found.setdefault(id(module), (module, name))
                ids.add(id(module))
        return ids

    task_call_modules: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "_recon_task_call", False):  # a split model, split again
            module_node, task = n.args[0], n.args[1]
            if isinstance(module_node, fx.Node) and module_node.op == "get_attr" and isinstance(task, str):
                task_call_modules.add(module_node)
                for i in bns(str(module_node.target), task):
                    tasks_of.setdefault(i, set()).add(task)
    for n in gm.graph.nodes:
        if n.op == "call_module" and n in copy_tasks:
            for t in copy_tasks[n]:
                calls[(n, t)] = bns(str(n.target), t)
                for i in calls[(n, t)]:
                    tasks_of.setdefault(i, set()).add(t)
        elif n.op == "call_module":
            shared_use |= bns(str(n.target), None)
        elif n.op == "get_attr":
            target = str(n.target)
            owner, _, attr = target.rpartition(".")
            for path, only_calls in ((target, n in task_call_modules and not _other_users(n)), (owner, False)):
                try:
                    module = gm.get_submodule(path)
                except AttributeError:
                    continue
                if _tracks_stats(module) and not only_calls and (path == target or attr in _STATS):
                    shared_use.add(id(module))
    chosen: dict[int, tuple[nn.Module, str, list[str], bool]] = {}
    for i, (module, name) in found.items():
        tasks = tasks_of.get(i, set()) | set(getattr(module, "_recon_tasks", ()))
        if len(tasks) >= 2 or isinstance(module, TaskStatsBatchNorm):
            chosen[i] = (module, name, [t for t in task_list if t in tasks], i in shared_use)
    return calls, chosen


def _other_users(node: fx.Node) -> bool:
    """Whether ``node`` (a module) is used other than as the module of a ``call_for_task``."""
    return any(not (getattr(u.target, "_recon_task_call", False) and u.args[0] is node) for u in node.users)


def _emit_module_call(
    graph: fx.Graph,
    target: str,
    task: str,
    own: str | None,
    args: tuple,
    kwargs: dict,
    used: Iterable[str],
    name: str,
    module_nodes: dict[str, fx.Node],
    scoped: bool = False,
) -> fx.Node:
    """The call of module ``target`` for ``task``: of its copy ``own`` if the module is branched, and within
    the task's scope (``call_for_task``) if a branched layer or a per-task-statistics BatchNorm is inside."""
    inner = scoped or any(u != target for u in used)
    path = f"{target}.{own}" if own is not None else target
    if not inner:
        return graph.create_node("call_module", path, args, kwargs, name=name)
    if path not in module_nodes:
        module_nodes[path] = graph.get_attr(path)
    module = module_nodes[path]
    return graph.create_node("call_function", call_for_task, (module, task, *args), kwargs, name=name)


def _map_output(
    value: Any,
    tasks: list[str],
    shared_env: dict[fx.Node, fx.Node],
    task_env: dict[str, dict[fx.Node, fx.Node]],
) -> Any:
    def for_task(task: str, v: Any) -> Any:
        env = task_env[task]
        return fx.node.map_arg(v, lambda a: env[a] if a in env else shared_env[a])

    def for_other(key: Any, v: Any) -> Any:
        def get(a: fx.Node) -> fx.Node:
            if a not in shared_env:
                raise ReconError(
                    f"output {key!r} is not a task but is computed after a branched layer, so it has one "
                    f"value per task; return it under a task name, or branch layers after it only"
                )
            return shared_env[a]

        return fx.node.map_arg(v, get)

    if isinstance(value, Mapping):
        return {k: for_task(k, v) if k in tasks else for_other(k, v) for k, v in value.items()}
    items = [for_task(t, v) for t, v in zip(tasks, value, strict=True)]
    if hasattr(value, "_fields"):
        return type(value)(*items)
    return list(items) if isinstance(value, list) else tuple(items)


def _adopt_hierarchy(net: fx.GraphModule, src: nn.Module) -> None:
    """Give ``net`` the full module tree of ``src`` (fx keeps only what the graph references, under stubs),
    so unused layers, class names and the state_dict keys and their order stay those of the model."""
    fx_buffers = {k: v for k, v in net._buffers.items() if k not in src._buffers}  # fx's tensor constants
    net._modules.clear()
    net._modules.update(src._modules)
    net._parameters.clear()
    net._parameters.update(src._parameters)
    net._buffers.clear()
    net._buffers.update(src._buffers)
    net._buffers.update(fx_buffers)
    net._non_persistent_buffers_set = set(src._non_persistent_buffers_set)


# -------------------------------------------------------------------------------------------- rebuild
def load_split(
    model_or_builder: nn.Module | Callable[[], nn.Module],
    plan: SplitPlan | Mapping[str, Any] | str | os.PathLike,
    *,
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
) -> fx.GraphModule:
    """Rebuild a split model from a fresh model (or ``build_model``) and a plan (object, dict or path).

    The parameter names match those of the model :func:`split` made, so its ``state_dict`` loads into it.
    The model is captured the way the plan records (``capture``: ``"fx"``, ``"export"``, ``"fx+leaves[...]"``);
    a plan captured with ``torch.export`` needs ``example_inputs`` (a batch: the shapes may differ).
    """
    if isinstance(plan, SplitPlan):
        pass
    elif isinstance(plan, Mapping):
        plan = SplitPlan.from_dict(plan)
    elif isinstance(plan, (str, os.PathLike)):
        text = str(plan)
        plan = SplitPlan.from_json(text) if text.lstrip().startswith("{") else SplitPlan.load(plan)
    else:
        raise ReconError(f"plan must be a SplitPlan, a dict or a path to plan.json, got {type(plan).__name__}")
    model = model_or_builder
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise ReconError(f"load_split needs a model or a build_model function, got {type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise ReconError(f"build_model() returned {type(model).__name__}, not an nn.Module")
    how = plan.capture or "fx"
    if how == "export" and example_inputs is None:
        raise ReconError(
            "this split plan was captured with torch.export; pass example_inputs= (a batch of inputs, as a tuple)"
        )
    recorded = plan.extra.get("branches")
    try:
        net = split(
            model,
            plan.layer_spec(),
            tasks=plan.tasks,
            init=plan.init,
            leaf_modules=plan.leaf_modules,
            concrete_args=concrete_args if concrete_args is not None else plan.concrete_args,
            example_inputs=example_inputs,
            capture="export" if how == "export" else "fx",
        )
    except ReconError as exc:  # without a batch, every task seems to reach the layers inside a leaf
        if example_inputs is None and plan.leaf_modules and recorded:
            raise ReconError(f"{exc}; this plan branches inside leaf modules: pass example_inputs= (a batch)") from None
        raise
    if recorded and recorded != net.meta[META_KEY]["branches"]:  # leaves: routing inside them needs the batch
        raise ReconError(
            f"the rebuilt model branches {net.meta[META_KEY]['branches']} but the plan recorded {recorded}; "
            "pass example_inputs= (a batch) so that the tasks reaching layers inside leaves are found as before"
        )
    return net


# -------------------------------------------------------------------------------- parameters by task
def parameter_tasks(
    net: nn.Module,
    tasks: Sequence[str] | None = None,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
) -> tuple[list[str], list[tuple[str, nn.Parameter, frozenset[str]]]]:
    """``(tasks, [(name, parameter, tasks that use it)])`` over ``net.named_parameters()``.

    Usage is read off the graph that really runs: the fx or exported graph, and for parameters inside a leaf
    (a module the graph records as one call), autograd on the example batch (the one :func:`split` was given,
    or ``example_inputs``): a parameter belongs to the tasks whose outputs reach it.
    """
    if isinstance(net, fx.GraphModule):
        meta = net.meta.get(META_KEY) or {}
        captured = recaptured(net, meta, example_inputs)
        if tasks is None:
            tasks = meta.get("tasks")
    else:
        captured = capture_graph(
            net, example_inputs=example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args
        )
    try:
        task_list = list(output_tasks(captured.gm, tasks))
    except ReconError as exc:
        if tasks is None and "pass tasks=" in str(exc):
            raise ReconError(
                f"{exc}; or split it with recon.split(model, layers, tasks=[...]), whose result knows its tasks"
            ) from exc
        raise
    usage = captured.layer_tasks(task_list, layer_names(net))
    by_param: dict[int, set[str]] = {}
    for name, module in net.named_modules():
        for p in module._parameters.values():
            if p is not None:
                by_param.setdefault(id(p), set()).update(usage.get(name, ()))
    return task_list, [(n, p, frozenset(by_param.get(id(p), ()))) for n, p in net.named_parameters()]


def shared_parameters(
    net: nn.Module,
    *,
    tasks: Sequence[str] | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
) -> list[nn.Parameter]:
    """The parameters of ``net`` that two or more tasks use (``named_parameters()`` order).

    ``net`` is a model made by :func:`split` (which knows its tasks), or any model with dict outputs; a model
    with tuple outputs needs ``tasks``.
    """
    _, rows = parameter_tasks(
        net, tasks, leaf_modules=leaf_modules, concrete_args=concrete_args, example_inputs=example_inputs
    )
    return [p for _, p, used in rows if len(used) >= 2]


def task_parameters(
    net: nn.Module,
    task: str,
    *,
    tasks: Sequence[str] | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    example_inputs: Any = None,
) -> list[nn.Parameter]:
    """The parameters of ``net`` that only ``task`` uses (its branches and its head)."""
    task_list, rows = parameter_tasks(
        net, tasks, leaf_modules=leaf_modules, concrete_args=concrete_args, example_inputs=example_inputs
    )
    if task not in task_list:
        raise ReconError(f"unknown task {task!r}; the tasks are {task_list}")
    return [p for _, p, used in rows if used == {task}]
