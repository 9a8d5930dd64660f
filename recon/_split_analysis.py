"""Analysis, the first pass of :func:`recon.split`: per-node facts in ``node.meta``, nothing changed yet.

For every node of the captured graph, :func:`analyse` records a :class:`NodeFacts` under
``node.meta["recon_split"]``: the branched layers it uses and has upstream, and the task classes it runs for
in the split graph (one copy of the node per class); and, for the whole graph, which shared BatchNorms need
running statistics per task (:class:`~recon._branches.TaskStatsBatchNorm`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from recon._branches import _STATS, TaskStatsBatchNorm, _check_tasks_as_names, _tracks_stats
from recon._errors import ReconError, did_you_mean
from recon._graph import (
    layer_names,
    modules_in_call,
    mutated_input,
    node_tasks,
    output_tasks,
    tie_groups,
    to_digraph,
)

__all__ = ["NODE_KEY", "Analysis", "NodeFacts", "analyse"]


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
class Analysis:
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


def _with_ties(groups: Groups, ties: Mapping[str, list[str]]) -> Groups:
    """Every layer tied to a branched one is branched with the same groups: a tied weight is one layer, and its
    copies keep the tie within each group (:func:`recon._branches.branch` shares their parameters)."""
    out = dict(groups)
    for layer, part in groups.items():
        for member in ties.get(layer, ()):
            out.setdefault(member, [list(g) for g in part])
    return out


def _routes(groups: Groups) -> dict[str, dict[str, str]]:
    return {layer: {t: g[0] for g in gs for t in g} for layer, gs in groups.items()}


def _classes(tasks: list[str], upstream: frozenset[str], route: Mapping[str, Mapping[str, str]]) -> dict:
    """Tasks grouped by the copy they take at every layer of ``upstream``; keyed by each class's first task."""
    classes: dict[tuple, list[str]] = {}
    for t in tasks:
        classes.setdefault(tuple(route[layer].get(t, t) for layer in sorted(upstream)), []).append(t)
    return {members[0]: members for members in classes.values()}


def analyse(
    gm: fx.GraphModule, src: nn.Module, tasks: Sequence[str] | None, layers: Any, model: str, captured: Any
) -> Analysis:
    """Analysis: which nodes run per task class, which BatchNorms need per-task statistics (node.meta)."""
    digraph = to_digraph(gm)
    reach = node_tasks(gm, tasks, digraph)
    task_list = list(output_tasks(gm, tasks))
    usage = captured.layer_tasks(task_list, layer_names(src))
    groups = _with_ties(_normalise_groups(layers, usage, task_list, model), tie_groups(gm))
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
    return Analysis(task_list, groups, route, stats_calls, stats_bns)


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
