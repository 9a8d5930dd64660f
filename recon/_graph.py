"""Graph analysis over a symbolically traced model (analysis only; the rewriting lives in ``_split``).

In the style of torch.fx passes, this module never changes a graph: it traces a model with clear errors,
finds which node produces each task's output, and answers "which tasks does this layer feed?" by
reachability in a networkx ``DiGraph`` over the fx nodes.

Vocabulary (docs/cli.md): a *layer* is a module that directly owns parameters, named as in
``model.named_modules()``; a parameter read through ``get_attr`` belongs to its owning module's name.
A *shared layer* is a layer used by two or more tasks.
"""

from __future__ import annotations

import inspect
import linecache
import operator
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from recon._errors import ReconError

__all__ = [
    "TraceError",
    "adopt_hierarchy",
    "graph_constants",
    "graph_module",
    "layer_names",
    "layer_tasks",
    "leaf_names",
    "modules_in_call",
    "mutated_input",
    "node_layers",
    "node_tasks",
    "output_tasks",
    "shared_layers",
    "task_roots",
    "tie_groups",
    "tied_parameters",
    "to_digraph",
    "trace",
    "trace_modes",
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_RECON_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _internal(filename: str) -> bool:
    """A file of torch or of recon itself: not the user code an error should point at."""
    path = os.path.abspath(filename)
    return path.startswith(_TORCH_DIR) or path.startswith(_RECON_DIR)


class TraceError(ReconError):
    """The model cannot be symbolically traced: names the module and the source line, and the way out."""

    module: str = ""


# --------------------------------------------------------------------------------------------- tracing
LeafSpec = str | type


def _resolve_leaves(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> tuple[frozenset[str], tuple]:
    names: set[str] = set()
    types: list[type] = []
    known = dict(model.named_modules())
    for leaf in leaf_modules or ():
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            if leaf not in known or leaf == "":
                valid = [n for n, m in known.items() if n and next(m.children(), None) is not None]
                raise ReconError(
                    f"unknown leaf module {leaf!r}; give names from model.named_modules(), for example {valid[:12]}"
                )
            names.add(leaf)
        else:
            raise ReconError(
                f"leaf_modules takes module names or nn.Module classes, got {leaf!r} ({type(leaf).__name__})"
            )
    return frozenset(names), tuple(types)


def leaf_names(model: nn.Module, leaf_modules: Iterable[LeafSpec] = ()) -> list[str]:
    """The names (``named_modules()`` order) of the modules that ``leaf_modules`` selects: JSON-able."""
    names, types = _resolve_leaves(model, leaf_modules)
    return [n for n, m in model.named_modules() if n and (n in names or isinstance(m, types))]


class _Tracer(fx.Tracer):
    """fx's default tracer plus user leaves, and a stack of the modules being traced through."""

    def __init__(self, leaf_names: frozenset[str] = frozenset(), leaf_types: tuple = ()) -> None:
        super().__init__()
        self._leaf_names = leaf_names
        self._leaf_types = leaf_types
        self._recon_stack: list[str] = []
        self.failed_stack: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        if getattr(m, "_recon_tasks", None) is not None:  # a per-task container made by recon.split
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 - fx signature
        try:
            path = self.path_of_module(m)
        except NameError:
            path = type(m).__name__
        self._recon_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_stack is None:
                self.failed_stack = list(self._recon_stack)
            raise
        finally:
            self._recon_stack.pop()


def _user_frame(exc: BaseException) -> tuple[str, int, str] | None:
    """The innermost traceback frame in user code (not torch, not recon): (file, line, source)."""
    return _innermost_user(traceback.extract_tb(exc.__traceback__))


def user_frame_here() -> tuple[str, int, str] | None:
    """The innermost frame of the current call stack in user code (not torch, not recon)."""
    return _innermost_user(traceback.extract_stack())


def _innermost_user(frames: Iterable[traceback.FrameSummary]) -> tuple[str, int, str] | None:
    best = None
    for frame in frames:
        if _internal(frame.filename):
            continue
        best = (frame.filename, frame.lineno or 0, (frame.line or "").strip())
    if best is not None and not best[2]:
        best = (best[0], best[1], linecache.getline(best[0], best[1]).strip())
    return best


def _trace_error(model: nn.Module, tracer: _Tracer, exc: BaseException) -> TraceError:
    stack = tracer.failed_stack or []
    module = stack[-1] if stack else ""
    where = _user_frame(exc)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if module:
        try:
            what = f"module {module!r} ({type(model.get_submodule(module)).__name__})"
        except AttributeError:
            what = f"module {module!r}"
    else:
        what = f"the forward of {type(model).__name__}"
    loc = ""
    if where:
        loc = f" at {where[0]}:{where[1]}" + (f" `{where[2]}`" if where[2] else "")
    if module:
        fix = (
            f"pass leaf_modules=[{module!r}] (CLI: --leaf {module}) to treat it as one opaque call, "
            "or concrete_args= to fix the input that drives it"
        )
    else:
        fix = (
            "move the data-dependent code into a submodule and pass it as leaf_modules= (CLI: --leaf NAME), "
            "or fix the input that drives it with concrete_args="
        )
    fix += "; or pass example_inputs= (a batch) so that recon captures the model with torch.export"
    error = TraceError(
        f"cannot trace {type(model).__name__} with torch.fx: {what}{loc}: {type(exc).__name__}: {first_line}; {fix}"
    )
    error.module = module  # the innermost module being traced when it failed ("" for the model's own forward)
    return error


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` into a ``GraphModule``, or raise a :class:`TraceError` that says where.

    ``leaf_modules`` (names as in ``named_modules()``, or classes) are recorded as single opaque calls, on
    top of fx's default leaves (the modules of ``torch.nn`` except ``Sequential``). The returned module
    shares its submodules with ``model`` (fx semantics); copy the model first if you will change it.
    """
    return _trace(model, leaf_modules, concrete_args)


def _trace(
    model: nn.Module,
    leaf_modules: Iterable[LeafSpec],
    concrete_args: dict[str, Any] | None,
    record_stack_traces: bool = False,
) -> fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise ReconError(f"expected an nn.Module, got {type(model).__name__}")
    names, types = _resolve_leaves(model, leaf_modules)
    tracer = _Tracer(names, types)
    tracer.record_stack_traces = record_stack_traces
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError... from user code
        raise _trace_error(model, tracer, exc) from exc
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


class _Ref:
    """A node reference in a graph key: the node's position, so that node names do not matter."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ref) and other.index == self.index

    def __hash__(self) -> int:
        return hash(("ref", self.index))

    def __repr__(self) -> str:
        return f"%{self.index}"


def _constant_key(value: Any) -> Any:
    """A tensor constant by value (so equal constants under different names compare equal)."""
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        flat = value.detach().contiguous().flatten().cpu()
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return ("constant", tuple(value.shape), str(value.dtype), hash(raw))
    return None


def _target_str(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__qualname__", None) or repr(target)


def node_keys(
    graph: fx.Graph, constant: Callable[[str], Any], skip: Callable[[fx.Node], bool] | None = None
) -> list[tuple]:
    """A comparable description of ``graph``, node by node: ``(op, name, target, args, kwargs)`` with every node
    reference replaced by its position and every tensor constant by its value (``constant(target)`` returns
    the tensor a ``get_attr`` reads when it is a constant, None for a parameter, buffer or module). Two traces
    of the same code compare equal, whatever names fx or torch.export gave their nodes and constants;
    placeholders keep their names (they are the call signature). Nodes for which ``skip`` is true are left out
    and references to them read their first input (layout-only operations such as ``contiguous``)."""
    index: dict[fx.Node, Any] = {}
    keys = []
    for n in graph.nodes:
        if skip is not None and skip(n) and n.all_input_nodes:
            index[n] = index[n.all_input_nodes[0]]
            continue
        index[n] = _Ref(len(keys))
        target: Any = _target_str(n.target)
        if n.op == "get_attr":
            target = _constant_key(constant(target)) or target
        args = fx.node.map_arg(n.args, lambda a: index[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: index[a])
        name = n.name if n.op == "placeholder" else ""
        keys.append((n.op, name, target, args, tuple(sorted(kwargs.items()))))
    return keys


def module_constants(root: nn.Module, model: nn.Module | None = None) -> Callable[[str], Any]:
    """``constant`` for :func:`node_keys` over a module traced from ``model``: attributes of ``root`` that are
    not parameters or buffers of ``model`` (fx's ``_tensor_constant0``, which fx registers as a buffer)."""
    model = root if model is None else model
    owned = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    owned |= {name for name, _ in model.named_buffers(remove_duplicate=False)}

    def constant(target: str) -> Any:
        if target in owned:
            return None
        try:
            return _fetch(root, target)
        except AttributeError:
            return None

    return constant


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def first_difference(a: Sequence[tuple], b: Sequence[tuple]) -> int | None:
    """The position of the first node at which two :func:`node_keys` lists differ (None if they are equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def node_origin(node: fx.Node | None) -> tuple[str, str]:
    """``(module name, "file:line `code`")`` of the user code that made ``node`` (empty strings if unknown)."""
    if node is None:
        return "", ""
    line = _last_frame(node.stack_trace) if node.stack_trace else ""
    stack = node.meta.get("nn_module_stack") or {}
    module = _stack_key_to_name(stack, next(reversed(stack.keys()), "")) if stack else ""
    return module, line


def trace_modes(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace in train and in eval mode; refuse with a clear :class:`TraceError` if the graphs differ.

    A graph that depends on ``self.training`` (``if self.training:``, ``F.dropout(x, training=self.training)``)
    would freeze one mode into the rewritten model. Modules such as ``nn.Dropout``/``nn.BatchNorm2d`` are
    leaves, so they keep switching modes at run time and are fine. The graphs are compared modulo node names
    and modulo tensor constants of equal value (:func:`node_keys`). Returns the graph traced in the model's
    current mode; the model's modes are restored.
    """
    modes = {name: m.training for name, m in model.named_modules()}
    current = model.training
    try:
        model.train(not current)
        other = _trace(model, leaf_modules, concrete_args, record_stack_traces=True)
    finally:
        for name, m in model.named_modules():
            m.training = modes.get(name, current)
    gm = _trace(model, leaf_modules, concrete_args, record_stack_traces=True)
    _refuse_backward_nodes(model, (gm.graph, other.graph))
    a = node_keys(gm.graph, module_constants(gm, model))
    index = first_difference(a, node_keys(other.graph, module_constants(other, model)))
    if index is not None:
        nodes = list(gm.graph.nodes)
        node = nodes[min(index, len(nodes) - 1)] if nodes else None
        module, line = node_origin(node)
        where = f" in module {module!r}" if module else ""
        at = f" at {line}" if line else ""
        detail = f" (first difference at node {node.name!r}{where}{at})" if node is not None else ""
        leaf = f"pass leaf_modules=[{module!r}] (CLI: --leaf {module}), or " if module else ""
        raise TraceError(
            f"the traced graph of {type(model).__name__} differs between train and eval mode{detail}, "
            f"so a rewritten model would freeze one mode; {leaf}use mode-aware modules (nn.Dropout, "
            "nn.BatchNorm) instead of branching on self.training in forward, or pass example_inputs= so that "
            "recon captures it with torch.export"
        )
    return gm


def _refuse_backward_nodes(model: nn.Module, graphs: Iterable[fx.Graph]) -> None:
    """A ``backward()`` inside forward (a regulariser's, in train mode) is refused at its line."""
    for graph in graphs:
        for n in graph.nodes:
            if (n.op == "call_method" and n.target == "backward") or n.target is torch.autograd.backward:
                _, line = node_origin(n)
                raise TraceError(
                    f"{type(model).__name__}.forward calls backward()" + (f" at {line}" if line else "") + ", so "
                    "its graph differs between train and eval mode and recon cannot capture it; compute that loss "
                    "outside forward (return it as an output, or add it to the task losses)"
                )


def _last_frame(stack_trace: str) -> str:
    """``file:line `source``` of the innermost user-code frame of an fx ``node.stack_trace``."""
    lines = [ln.strip() for ln in stack_trace.strip().splitlines() if ln.strip()]
    best = ""
    for i, line in enumerate(lines):
        if not line.startswith("File "):
            continue
        parts = line.split('"')
        file = parts[1] if len(parts) > 2 else "?"
        if _internal(file):
            continue
        number = line.split("line ")[-1].split(",")[0]
        source = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
        if not source and file != "?":
            source = linecache.getline(file, int(number) if number.isdigit() else 0).strip()
        best = f"{file}:{number}" + (f" `{source}`" if source else "")
    return best


def _stack_key_to_name(stack: Mapping[str, Any], key: str) -> str:
    value = stack.get(key) if key else None
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return value[0]
    return key


# -------------------------------------------------------------------------------------------- analysis
def layer_names(model: nn.Module) -> list[str]:
    """Names of the modules that directly own parameters, in ``named_modules()`` order."""
    return [n for n, m in model.named_modules() if any(p is not None for p in m._parameters.values())]


_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
    operator.setitem,
}
_NOT_MUTATING = {"requires_grad_", "share_memory_", "retain_grad_", "record_stream_"}
_SIGNATURES: dict[Any, inspect.Signature | None] = {}


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return _SIGNATURES[fn]
    except (KeyError, TypeError):
        pass
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    try:
        _SIGNATURES[fn] = sig
    except TypeError:
        pass
    return sig


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING


def mutated_input(node: fx.Node, modules: Mapping[str, nn.Module]) -> fx.Node | None:
    """The input node an in-place operation writes into (its first argument), or None.

    Recognises modules with ``inplace=True`` (``nn.ReLU(inplace=True)``), functions called with
    ``inplace=True`` (``F.relu(x, inplace=True)``), trailing-underscore methods and functions
    (``x.add_(y)``, ``torch.relu_(x)``), the augmented-assignment operators, and ATen ops whose schema
    writes an argument (``aten.add_.Tensor`` for ``out += identity`` in an exported graph).
    """
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return None
    if node.op == "call_module":
        module = modules.get(node.target)
        return first if getattr(module, "inplace", False) is True else None
    if node.op == "call_method":
        return first if _is_inplace_name(str(node.target)) else None
    if node.op == "call_function":
        target = node.target
        if target in _INPLACE_OPERATORS:
            return first
        if isinstance(target, torch._ops.OpOverload):  # an ATen op from torch.export: its schema says
            return _written_argument(node, target)
        if node.kwargs.get("inplace") is True:
            return first
        if _is_inplace_name(getattr(target, "__name__", "")):
            return first
        sig = _signature(target)
        if sig is not None and "inplace" in sig.parameters:
            try:
                bound = sig.bind(*node.args, **node.kwargs)
            except TypeError:
                return None
            return first if bound.arguments.get("inplace") is True else None
    return None


def _written_argument(node: fx.Node, op: torch._ops.OpOverload) -> fx.Node | None:
    """The input an ATen op writes into (``aten.add_.Tensor``'s ``self``, ``aten.copy_``'s ``self``): its first
    schema argument marked as written (``Tensor(a!)``); None for a functional op."""
    for i, arg in enumerate(op._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return value if isinstance(value, fx.Node) else None
    return None


def to_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """A ``DiGraph`` over the fx nodes: an edge for each data dependency, plus the hidden ones of in-place
    operations (an op that mutates ``x`` feeds every later user of ``x``)."""
    g = nx.DiGraph()
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        g.add_node(n)
        for a in n.all_input_nodes:
            g.add_edge(a, n)
    for n in gm.graph.nodes:
        m = mutated_input(n, modules)
        if m is None:
            continue
        for u in m.users:
            if u is not n and order[u] > order[n]:
                g.add_edge(n, u)
    return g


def _check_task_name(task: Any) -> str:
    if not isinstance(task, str) or not task.isidentifier():
        raise ReconError(
            f"task name {task!r} is not a valid Python identifier; name tasks like 'seg' or 'depth' "
            "(they become submodule names)"
        )
    return task


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def output_tasks(gm: fx.GraphModule, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """``{task: output}`` read off the graph's output node, in task order.

    The value is the fx node that produces the task's output (a nested tuple/dict of nodes when a task
    returns several tensors). Dict outputs name themselves (``tasks`` may pick a subset of the keys; the
    others are not tasks); tuple/list outputs need ``tasks``, one name per position.
    """
    out = _output_node(gm).args[0]
    if isinstance(out, Mapping):
        keys = list(out.keys())
        if tasks is None:
            tasks = keys
        tasks = [_check_task_name(t) for t in tasks]
        missing = [t for t in tasks if t not in out]
        if missing:
            raise ReconError(
                f"the model returns a dict with keys {keys} but no output for task(s) {missing}; "
                "return one entry per task or pass the right tasks="
            )
        return {t: out[t] for t in tasks}
    if isinstance(out, (tuple, list)):
        if tasks is None:
            raise ReconError(
                f"the model returns a {type(out).__name__} of {len(out)} outputs, so recon cannot name "
                "its tasks; pass tasks=[...] (one name per output, in order) or return a dict {task: output}"
            )
        tasks = [_check_task_name(t) for t in tasks]
        if len(tasks) != len(out):
            raise ReconError(
                f"the model returns a {type(out).__name__} of {len(out)} outputs but {len(tasks)} tasks "
                f"{list(tasks)} were given; give one task name per output, in order"
            )
        return dict(zip(tasks, out, strict=True))
    what = f"node {out.name!r}" if isinstance(out, fx.Node) else type(out).__name__
    raise ReconError(
        f"the traced forward of {type(gm).__name__} returns one opaque value ({what}), so recon cannot tell "
        "the tasks apart; build the dict {task: output} (or a tuple) in forward itself, and do not make "
        "the module that builds it a leaf"
    )


def task_roots(gm: fx.GraphModule, tasks: Sequence[str] | None = None) -> dict[str, list[fx.Node]]:
    """``{task: [nodes that make up the task's output]}`` (usually one node per task)."""
    roots: dict[str, list[fx.Node]] = {}
    for task, value in output_tasks(gm, tasks).items():
        nodes: list[fx.Node] = []
        fx.node.map_arg(value, lambda n: nodes.append(n) or n)  # noqa: B023
        roots[task] = nodes
    return roots


def node_tasks(
    gm: fx.GraphModule, tasks: Sequence[str] | None = None, graph: nx.DiGraph | None = None
) -> dict[fx.Node, frozenset[str]]:
    """For every node, the tasks whose output it reaches (itself included)."""
    roots = task_roots(gm, tasks)
    g = graph if graph is not None else to_digraph(gm)
    reach: dict[fx.Node, set[str]] = {n: set() for n in gm.graph.nodes}
    for task, nodes in roots.items():
        for root in nodes:
            reach[root].add(task)
            for a in nx.ancestors(g, root):
                reach[a].add(task)
    return {n: frozenset(s) for n, s in reach.items()}


def _is_task_call(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "_recon_task_call", False)


def _walk(module: nn.Module, prefix: str, task: str | None) -> Iterator[str]:
    """Names of ``module`` and its descendants whose parameters a call of it (for ``task``) may use."""
    yield prefix
    tasks = getattr(module, "_recon_tasks", None)
    own = getattr(module, "_recon_route", {}).get(task, task)  # a group's copy serves every task of its group
    for name, child in module._modules.items():
        if child is None:
            continue
        if tasks is not None and name in tasks and task is not None and name != own:
            continue
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, task)


def modules_in_call(root: nn.Module, target: str, task: str | None = None) -> list[str]:
    """Names of the modules whose parameters a call of ``root.get_submodule(target)`` uses.

    A per-task copy made by :func:`recon.split` (``layer.seg``) also uses the children that its container
    keeps shared (``layer.<child>``); inside a per-task container only the current task's copy is used.
    """
    parent, _, last = target.rpartition(".")
    container = root.get_submodule(parent) if target and "." in target else (root if target else None)
    if target and container is not None and last in (getattr(container, "_recon_tasks", None) or ()):
        names = [target]
        for name, child in container._modules.items():
            if name not in container._recon_tasks:
                names.extend(_walk(child, f"{parent}.{name}" if parent else name, last))
        names.extend(list(_walk(root.get_submodule(target), target, last))[1:])
        return names
    return list(_walk(root.get_submodule(target), target, task))


def node_layers(gm: fx.GraphModule, node: fx.Node, layers: frozenset[str] | set[str]) -> set[str]:
    """The layers whose parameters ``node`` uses directly (a module call, a ``get_attr`` of a parameter)."""
    if node.op == "call_module":
        return {n for n in modules_in_call(gm, str(node.target)) if n in layers}
    if node.op == "get_attr":
        owner, _, attr = str(node.target).rpartition(".")
        try:
            module = gm.get_submodule(owner)
        except AttributeError:
            return set()
        if attr in module._parameters and owner in layers:
            return {owner}
        return set()
    if _is_task_call(node):
        module_node, task = node.args[0], node.args[1]
        if isinstance(module_node, fx.Node) and module_node.op == "get_attr":
            return {n for n in modules_in_call(gm, str(module_node.target), task) if n in layers}
    return set()


def layer_tasks(
    model: nn.Module,
    tasks: Sequence[str] | None = None,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> dict[str, frozenset[str]]:
    """``{layer: tasks whose output is reachable from any use of the layer}`` for every layer of ``model``.

    Layers are named as in ``model.named_modules()``; a layer that reaches no task output maps to an empty
    set. A ``GraphModule`` (for example a model made by :func:`recon.split`) is analysed as it is; any other
    module is traced first (:func:`trace`), which raises :class:`TraceError` when it cannot be.
    """
    gm = (
        model
        if isinstance(model, fx.GraphModule)
        else trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    )
    return _layer_tasks(gm, tasks, layer_names(model))


def _layer_tasks(gm: fx.GraphModule, tasks: Sequence[str] | None, names: list[str]) -> dict[str, frozenset[str]]:
    reach = node_tasks(gm, tasks)
    wanted = frozenset(names)
    usage: dict[str, set[str]] = {n: set() for n in names}
    for node in gm.graph.nodes:
        if not reach[node]:
            continue
        for layer in node_layers(gm, node, wanted):
            usage[layer] |= reach[node]
    for name, group in tie_groups(gm).items():  # a tied weight is one layer, used wherever any name reads it
        if name in usage:
            usage[name] = set().union(*(usage.get(m, set()) for m in group))
    return {n: frozenset(usage[n]) for n in names}


def tie_groups(model: nn.Module) -> dict[str, list[str]]:
    """``{layer: the layers tied to it}`` for every layer that shares a parameter with another module (an LM
    head tied to the input embedding, T5's ``shared`` and ``encoder.embed_tokens``): a tied weight is one
    layer under all its names. Each group lists its layers in ``named_modules()`` order, itself included;
    untied layers are left out."""
    owner: dict[int, str] = {}
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for name, module in model.named_modules():
        parent.setdefault(name, name)
        for p in module._parameters.values():
            if p is None:
                continue
            if id(p) in owner:
                parent[root(name)] = root(owner[id(p)])
            else:
                owner[id(p)] = name
    members: dict[str, list[str]] = {}
    for name in parent:
        members.setdefault(root(name), []).append(name)
    return {name: group for group in members.values() if len(group) > 1 for name in group}


def tied_parameters(model: nn.Module, layer: str) -> list[nn.Parameter]:
    """The parameters of ``layer`` and of the layers tied to it, each once (what a branch of it copies)."""
    seen: dict[int, nn.Parameter] = {}
    for name in tie_groups(model).get(layer, [layer]):
        for p in model.get_submodule(name)._parameters.values():
            if p is not None:
                seen.setdefault(id(p), p)
    return list(seen.values())


def shared_layers(usage: Mapping[str, frozenset[str]]) -> list[str]:
    """The layers used by two or more tasks, in the order of ``usage`` (``named_modules()`` order)."""
    return [name for name, tasks in usage.items() if len(tasks) >= 2]


# ------------------------------------------------------------------------------------ graph modules
def adopt_hierarchy(net: fx.GraphModule, src: nn.Module) -> None:
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


def graph_constants(graph: fx.Graph, root: nn.Module, source: nn.Module) -> dict[str, Any]:
    """``{target: tensor}`` for the ``get_attr`` reads of ``graph`` that ``root`` does not hold (the tensor
    constants of a captured graph, which live on its ``GraphModule``, ``source``, not on the model)."""
    constants = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            try:
                _fetch(root, str(n.target))
            except AttributeError:
                constants[str(n.target)] = _fetch(source, str(n.target))
    return constants


def graph_module(
    root: nn.Module, graph: fx.Graph, name: str, constants: Mapping[str, Any] | None = None
) -> fx.GraphModule:
    """A ``GraphModule`` running ``graph`` over ``root``'s own modules (its full hierarchy, see
    :func:`adopt_hierarchy`), with the tensor ``constants`` the graph reads registered on the result, not on
    ``root`` (the model is left as it was)."""
    added = []
    for target, value in (constants or {}).items():
        owner, _, attr = target.rpartition(".")
        if owner:
            raise ReconError(f"internal: tensor constant {target!r} of a captured graph is not top-level")
        if not hasattr(root, attr):
            object.__setattr__(root, attr, value)  # a plain attribute, just for GraphModule to copy
            added.append(attr)
    try:
        gm = fx.GraphModule(root, graph, name)
    finally:
        for attr in added:
            object.__delattr__(root, attr)
    adopt_hierarchy(gm, root)
    return gm
