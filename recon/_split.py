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

The three passes live in their own modules: analysis (:mod:`recon._split_analysis`, facts in
``node.meta``), branching (:mod:`recon._branches`, module surgery), emission (:mod:`recon._split_emit`, the new
graph); :mod:`recon._split_plan` holds the plan. Never pickle the result: rebuild it with :func:`load_split`
from a fresh model and a :class:`SplitPlan`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from recon._branches import (
    TaskBranches,
    TaskStatsBatchNorm,
    branch,
    call_for_task,
    current_task,
    task_scope,
)
from recon._capture import capture as capture_graph
from recon._capture import check_outputs, recaptured
from recon._errors import ReconError
from recon._graph import LeafSpec, graph_constants, graph_module, layer_names, output_tasks
from recon._split_analysis import analyse
from recon._split_emit import emit
from recon._split_plan import INITS, META_KEY, SplitPlan, plan_of

__all__ = [
    "INITS",
    "META_KEY",
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
    if isinstance(model, fx.GraphModule):
        src = copy.deepcopy(model, _skip_tensors(model, list(layers)))
        captured = recaptured(src, prior, example_inputs)
        if tasks is None and prior:
            tasks = prior["tasks"]
    else:  # capture the model itself (once per command: the capture is shared), then rewrite a copy of it
        captured = capture_graph(
            model, example_inputs=example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, mode=capture
        )
        src = copy.deepcopy(model, _skip_tensors(model, list(layers)))
        captured = captured.on(src)
    gm, leaves = captured.gm, captured.leaves
    model_class = prior["model_class"] if prior else type(model).__name__
    facts, graph = _rewrite(gm, src, tasks, layers, model_class, captured, init)
    names = list(facts.groups)
    net = graph_module(src, graph, f"{model_class}Split" if names else model_class, graph_constants(graph, src, gm))
    net.meta[META_KEY] = {  # what plan_of and a later split read back
        "tasks": facts.tasks,
        "layers": (list(prior["layers"]) if prior else []) + names,
        "groups": {**(prior.get("groups", {}) if prior else {}), **facts.groups},
        "init": init,
        "leaf_modules": leaves,
        "concrete_args": captured.concrete_args if prior is None else prior.get("concrete_args"),
        "model_class": model_class,
        "branches": {layer: [g[0] for g in gs] for layer, gs in facts.groups.items()},
        "task_stats": {name: list(bn_tasks) for _, name, bn_tasks, _ in facts.stats_bns.values()},
        "capture": captured.how,
        "example": captured.example,
    }
    if captured.example is not None and init == "copy":  # never hand over a model that computes otherwise
        check_outputs(net, model, captured.example, what="the split model", expected=captured.expected)
    return net


def _rewrite(gm: fx.GraphModule, src: nn.Module, tasks: Any, layers: Any, model_class: str, captured: Any, init: str):
    """The three passes; an error that is not a :class:`ReconError` is reported as one, naming the module."""
    try:
        facts = analyse(gm, src, tasks, layers, model_class, captured)
        branch(src, facts, init)
        return facts, emit(gm, facts)
    except ReconError:
        raise
    except Exception as exc:  # a bug or a graph recon does not handle: one line, never a raw traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ReconError(
            f"recon cannot split {model_class} (captured with {captured.how}): {type(exc).__name__}: {first}"
        ) from exc


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
    or ``example_inputs``): a parameter belongs to the tasks whose outputs reach it. A frozen parameter
    (``requires_grad=False``) belongs to no task.
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
    # a frozen parameter (requires_grad=False) is trained by no task: neither shared nor a task's own
    rows = [(n, p, frozenset(by_param.get(id(p), ()) if p.requires_grad else ())) for n, p in net.named_parameters()]
    return task_list, rows


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
