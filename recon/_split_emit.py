"""Emission, the third pass of :func:`recon.split`: the new graph, from the facts the analysis left in ``node.meta``.

Each node that is not downstream of a branched layer is copied once; each node downstream of one is emitted
once per task class (``NodeFacts.classes``), reading that class's copies; an in-place write into a tensor
other classes share goes to a per-class clone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch.fx as fx

from recon._branches import call_for_task
from recon._errors import ReconError
from recon._split_analysis import NODE_KEY, Analysis, NodeFacts, _branch_owner

__all__ = ["emit"]


def emit(gm: fx.GraphModule, facts: Analysis) -> fx.Graph:
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
    facts: Analysis,
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
