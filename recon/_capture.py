"""Capture a model's forward as an fx graph that recon can analyse and rewrite.

Three ways, tried in this order by :func:`capture` (``mode="auto"``):

* ``"fx"``: ``torch.fx`` symbolic tracing (:func:`recon._graph.trace_modes`), with the leaves the user names;
  module-level, and it needs no example batch.
* ``"export"``: ``torch.export.export(model, strict=False)`` on the example batch, with the batch dimension
  dynamic (``Dim.AUTO``; integer inputs' other dimensions too, see :func:`_dynamic_dims`): it records the
  operations that really run (aten level), so it captures models that symbolic tracing cannot (``transformers``'
  BERT, ViT, GPT-2: Proxy iteration, item assignment). Every parameter is read through a ``get_attr`` of its own
  path, so a branched layer anywhere in the graph is branched at full granularity. The exported graph is
  specialised to the mode it was exported in; recon exports in train and in eval mode, requires the two graphs
  to be the same up to scalar arguments (the ``train`` flag of dropout, sdpa's ``dropout_p``, BatchNorm's
  ``training``), and makes exactly those arguments read the owning module's ``training`` flag at run time, so
  ``net.train()``/``net.eval()`` switch them as on any ``nn.Module``. Calls of ``torch.nn`` modules that take
  one input (``nn.Linear``, ``nn.LayerNorm``, ``nn.Dropout``, ``nn.BatchNorm2d``...) are folded back into module
  calls (from each node's ``nn_module_stack``): BatchNorm updates its running statistics in train mode and uses
  them in eval mode as usual, and the generated code names the original modules.
* ``"fx+leaves[...]"``: symbolic tracing where the smallest submodules that fail to trace are recorded as
  opaque calls (leaves). Which task reaches a parameter inside a leaf is then taken from autograd on the
  example batch (:meth:`Captured.layer_tasks`), not from the graph.

Whenever an example batch is known, the captured graph is run against the eager model in eval mode and must
give the same outputs (:func:`check_outputs`); otherwise the next way is tried, and if none works the error
names the first output that differs and its likely cause. No broken model is ever returned.

One capture serves a whole command (:func:`capture` keeps it per model, batch and options while the model is
unchanged); :meth:`Captured.on` moves it onto the copy that :func:`recon.split` rewrites. Forward arguments the
batch leaves out are captured at their defaults and guarded (:func:`fixed_argument`). docs/capture.md says
all this for users.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import operator
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from recon._errors import ReconError
from recon._graph import (
    LeafSpec,
    TraceError,
    _fetch,
    _layer_tasks,
    _trace,
    _user_frame,
    first_difference,
    graph_constants,
    graph_module,
    leaf_names,
    node_keys,
    node_origin,
    trace_modes,
    user_frame_here,
)

__all__ = [
    "MODES",
    "Captured",
    "by_mode",
    "capture",
    "check_outputs",
    "example_args",
    "fixed_argument",
    "layer_usage",
    "parameter_reach",
    "recaptured",
]

MODES = ("auto", "fx", "export")
_MAX_AUTO_LEAVES = 32


# --------------------------------------------------------------------------------------------- result
@dataclasses.dataclass
class Captured:
    """A captured graph and how it was made.

    ``gm`` shares its submodules with the captured model. ``how`` is ``"fx"``, ``"export"`` or
    ``"fx+leaves[a,b]"`` (recorded in ``plan.json`` as ``capture``); ``leaves`` the modules recorded as opaque
    calls; ``example`` the example batch as ``(args, kwargs)`` (None when none was given); ``expected`` the eager
    model's outputs on it (eval mode), kept from the check so that a later check need not run the model again.
    """

    gm: fx.GraphModule
    how: str
    leaves: list[str]
    example: tuple[tuple, dict] | None = None
    expected: Any = None  # the eager model's outputs on the example batch in eval mode, once checked
    concrete_args: dict[str, Any] | None = None  # forward arguments fixed at capture (the batch leaves them out)

    def on(self, root: nn.Module) -> Captured:
        """The same graph over ``root``, a deep copy of the captured model (a fresh graph, so that a pass may
        write into ``node.meta``): what :func:`recon.split` rewrites, without capturing the copy again."""
        graph = copy.deepcopy(self.gm.graph)
        gm = graph_module(root, graph, type(self.gm).__name__, graph_constants(graph, root, self.gm))
        return dataclasses.replace(self, gm=gm)

    def layer_tasks(self, tasks: Sequence[str] | None, names: Sequence[str]) -> dict[str, frozenset[str]]:
        """``{layer: tasks whose output it reaches}``: from the graph, except for layers inside a leaf, which
        take it from autograd on the example batch (the graph says only that the leaf is called)."""
        usage = _layer_tasks(self.gm, tasks, list(names))
        inside = [n for n in names if any(n == leaf or n.startswith(leaf + ".") for leaf in self.leaves)]
        if not inside or self.example is None:
            return usage
        task_list = [t for t in (tasks if tasks is not None else _task_names(self.gm))]
        reach = parameter_reach(self.gm, task_list, self.example)
        for name in inside:
            own = [p for p in self.gm.get_submodule(name)._parameters.values() if p is not None and p.requires_grad]
            if own:
                usage[name] = frozenset().union(*(reach.get(id(p), frozenset()) for p in own))
        return usage


def layer_usage(
    model: nn.Module,
    tasks: Sequence[str] | None,
    *,
    example_inputs: Any = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
) -> dict[str, frozenset[str]]:
    """``{layer: tasks whose output it reaches}`` for every layer of ``model`` (``named_modules()`` order), from
    the graph :func:`capture` makes (autograd on the example batch for layers inside leaves)."""
    from recon._graph import layer_names

    captured = capture(model, example_inputs=example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    return captured.layer_tasks(None if tasks is None else list(tasks), layer_names(model))


def recaptured(gm: fx.GraphModule, meta: Mapping[str, Any] | None, example_inputs: Any = None) -> Captured:
    """A graph that is already captured (a model made by :func:`recon.split`, whose ``meta`` says how)."""
    meta = meta or {}
    example = example_args(example_inputs) if example_inputs is not None else meta.get("example")
    return Captured(gm, meta.get("capture", "fx"), list(meta.get("leaf_modules") or []), example)


def _task_names(gm: fx.GraphModule) -> list[str]:
    from recon._graph import output_tasks

    return list(output_tasks(gm))


# ------------------------------------------------------------------------------------------- entry point
def example_args(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from ``example_inputs``: a tuple of positional arguments, ``(args, kwargs)``, a dict of
    keyword arguments, or a single tensor (the forms a recipe's ``inputs`` take)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], (tuple, list))
        and isinstance(example_inputs[1], Mapping)
    ):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ReconError(
        f"example_inputs must be a tuple of positional arguments or (args, kwargs), got {type(example_inputs).__name__}"
    )


def capture(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: dict[str, Any] | None = None,
    mode: str = "auto",
) -> Captured:
    """Capture ``model``'s forward as a graph recon can rewrite (see the module docstring for the three ways).

    ``mode="fx"`` only traces symbolically (with ``leaf_modules``), ``"export"`` only uses ``torch.export``
    (needs ``example_inputs``), ``"auto"`` tries fx, then export, then fx with automatic minimal leaves.
    With ``example_inputs`` every result is checked against the eager model first (:func:`check_outputs`), and
    the forward's arguments that the batch leaves out are fixed at their defaults (fx ``concrete_args``,
    export's kwargs; a later call with another value fails with one line).
    The returned graph shares ``model``'s submodules (fx semantics): copy the model first to change it.

    One capture serves a whole command: the result is kept (weakly, on the model) and returned again for the
    same model, batch and options while the model's modules and tensors are unchanged (same objects, same
    in-place versions), so profile discovery, ``plan_split``, ``split``, ownership and the checks share it.
    """
    if mode not in MODES:
        raise ReconError(f"capture mode {mode!r} is not one of {list(MODES)}")
    example = example_args(example_inputs) if example_inputs is not None else None
    leaves = leaf_names(model, leaf_modules)
    fixed = {**_left_out(model, example), **(concrete_args or {})}
    key = (mode, tuple(leaves), _fingerprint(model))
    kept = _CACHE.get(model, []) if key[2] is not None else []
    for k, ex, fx_args, captured in kept:
        if k == key and _same(ex, example) and _same(fx_args, fixed):
            return captured
    captured = _capture(model, example, leaves, fixed, mode)
    _guard_fixed(captured.gm, fixed)
    captured.concrete_args = fixed or None
    if key[2] is not None:
        _CACHE[model] = [(key, example, fixed, captured), *kept][:_KEEP]
    return captured


def _capture(
    model: nn.Module, example: tuple[tuple, dict] | None, leaves: list[str], fixed: dict[str, Any], mode: str
) -> Captured:
    concrete_args = fixed or None
    errors: list[ReconError] = []
    if mode in ("auto", "fx"):
        try:
            gm = trace_modes(model, leaf_modules=leaves, concrete_args=concrete_args)
            return _checked(Captured(gm, _how(leaves), leaves, example), model)
        except ReconError as exc:
            if mode == "fx" or example is None:
                raise
            errors.append(exc)
    if mode == "export" and example is None:
        raise ReconError("capturing with torch.export needs an example batch; pass example_inputs=(x,)")
    if example is not None:
        try:
            return _checked(Captured(export_graph(model, example, fixed), "export", [], example), model)
        except ReconError as exc:
            if mode == "export":
                raise
            errors.append(exc)
    try:
        auto = _minimal_leaves(model, leaves, concrete_args)
        gm = trace_modes(model, leaf_modules=auto, concrete_args=concrete_args)
        return _checked(Captured(gm, _how(auto), auto, example), model)
    except ReconError as exc:
        errors.append(exc)
    raise ReconError(
        "recon cannot capture this model: " + " | ".join(f"{_way(i)}: {e}" for i, e in enumerate(errors))
    ) from errors[0]


# ------------------------------------------------------------------------------- one capture per command
_CACHE: weakref.WeakKeyDictionary[nn.Module, list[tuple]] = weakref.WeakKeyDictionary()
_KEEP = 2  # captures kept per model (a command uses one; two leave room for a second batch or leaf set)


def _fingerprint(model: nn.Module) -> tuple | None:
    """What a captured graph and the eager outputs on its batch depend on: which module sits at which path,
    and each parameter's and buffer's identity and in-place version (an optimiser step, a loaded state_dict
    or a BatchNorm update in train mode bumps it). None when a tensor has no version (inference tensors)."""
    try:
        tensors = tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    except RuntimeError:
        return None
    return tuple((name, id(m)) for name, m in model.named_modules(remove_duplicate=False)), tensors


def _same(a: Any, b: Any) -> bool:
    """Whether two batches (or argument dicts) are equal: same structure, equal tensors and values."""
    (la, sa), (lb, sb) = pytree.tree_flatten(a), pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                return False
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not torch.equal(x, y):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


# ----------------------------------------------------------------------- arguments the batch leaves out
def _left_out(model: nn.Module, example: tuple[tuple, dict] | None) -> dict[str, Any]:
    """``{name: default}`` for the forward's arguments that the example batch does not give."""
    if example is None:
        return {}
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind_partial(*example[0], **example[1])
    except (TypeError, ValueError):
        return {}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in bound.arguments and p.kind in named and p.default is not inspect.Parameter.empty
    }


def fixed_argument(value: Any, name: str, expected: Any) -> Any:
    """The guard of a forward argument captured at a fixed value: any other value is an error."""
    if isinstance(value, torch.Tensor) or not (value is expected or value == expected):
        raise ReconError(
            f"this model was captured with {name}={expected!r} (the example batch left {name!r} out), so it "
            f"cannot be called with {name}={_short(value)}; capture it with {name} in example_inputs"
        )
    return value


def _short(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:40]


def _guard_fixed(gm: fx.GraphModule, fixed: Mapping[str, Any]) -> None:
    """Check every fixed argument at the top of the graph, in place of fx's own assertion (export and fx both
    keep its placeholder; fx may rename it ``name_1``, which is put back so callers can pass it by name)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    last = placeholders[-1]
    added = False
    for name, value in fixed.items():
        node = next((n for n in placeholders if re.fullmatch(rf"{re.escape(name)}(_\d+)?", str(n.target))), None)
        if node is None or not isinstance(value, (bool, int, float, str, type(None))):
            continue
        node.target = name
        for user in list(node.users):
            if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none":
                gm.graph.erase_node(user)
        with gm.graph.inserting_after(last):
            last = gm.graph.call_function(fixed_argument, (node, name, value))
        added = True
    if added:
        gm.recompile()


def _way(i: int) -> str:
    return ("torch.fx", "torch.export", "fx with automatic leaves")[min(i, 2)]


def _how(leaves: Sequence[str]) -> str:
    return f"fx+leaves[{','.join(leaves)}]" if leaves else "fx"


def _checked(captured: Captured, model: nn.Module) -> Captured:
    if captured.example is not None:
        what = f"the graph captured with {captured.how}"
        captured.expected = check_outputs(captured.gm, model, captured.example, what=what)
    return captured


def _minimal_leaves(model: nn.Module, leaves: Sequence[str], concrete_args: dict[str, Any] | None) -> list[str]:
    """User leaves plus the innermost submodules that fail symbolic tracing, added one at a time."""
    chosen = list(leaves)
    for _ in range(_MAX_AUTO_LEAVES):
        try:
            _trace(model, chosen, concrete_args)
            return chosen
        except TraceError as exc:
            module = getattr(exc, "module", "")
            if not module or module in chosen:
                raise
            chosen = [n for n in chosen if not n.startswith(module + ".")] + [module]
    raise ReconError(f"more than {_MAX_AUTO_LEAVES} submodules fail to trace; pass example_inputs= or leaf_modules=")


# ------------------------------------------------------------------------------------------ eager check
def _set_modes(model: nn.Module, modes: Mapping[str, bool] | bool) -> dict[str, bool]:
    old = {name: m.training for name, m in model.named_modules()}
    for name, m in model.named_modules():
        m.training = modes if isinstance(modes, bool) else modes.get(name, m.training)
    return old


def check_outputs(
    candidate: nn.Module, reference: nn.Module, example: tuple[tuple, dict], *, what: str, expected: Any = None
) -> Any:
    """Run ``candidate`` and ``reference`` on ``example`` in eval mode; raise a :class:`ReconError` naming the
    first output that differs (or the error the candidate raised) and its likely cause. Modes are restored.
    Returns the reference's outputs; ``expected`` gives them (the reference is then not run again)."""
    args, kwargs = example
    cause = (
        "likely cause: Python-level tests on traced values (isinstance(x, list) on a leaf's output, "
        "len() or tensor values steering Python branches), or data-dependent control flow"
    )
    # the reference first and restored last: a captured graph shares the model's modules, and the modes the
    # model had must come back (a profile that goes on in eval mode would use BatchNorm's running statistics)
    saved = (_set_modes(reference, False), _set_modes(candidate, False))
    try:
        with torch.no_grad():
            want = reference(*args, **kwargs) if expected is None else expected
            try:
                got = candidate(*args, **kwargs)
            except Exception as exc:  # the captured graph itself fails: say so, never hand it over
                first = (str(exc).strip().splitlines() or [""])[0]
                raise ReconError(f"{what} fails on the example batch: {type(exc).__name__}: {first}; {cause}") from exc
    finally:
        _set_modes(candidate, saved[1])
        _set_modes(reference, saved[0])
    want_leaves, want_spec = pytree.tree_flatten_with_path(want)
    got_leaves, got_spec = pytree.tree_flatten_with_path(got)
    if want_spec != got_spec:
        raise ReconError(
            f"{what} returns a different structure from the model on the example batch "
            f"({type(got).__name__} vs {type(want).__name__}); {cause}"
        )
    for (path, w), (_, g) in zip(want_leaves, got_leaves, strict=True):
        if _differs(w, g):
            where = pytree.keystr(path) or "the output"
            gap = f" (largest difference {float((g - w).abs().max()):.3g})" if _same_shape(w, g) else ""
            raise ReconError(f"{what} differs from the model at output{where}{gap} on the example batch; {cause}")
    return want


def _same_shape(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.is_floating_point()


def _differs(want: Any, got: Any) -> bool:
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
        if want.shape != got.shape or want.dtype != got.dtype:
            return True
        return not torch.allclose(want, got, rtol=1e-4, atol=1e-5, equal_nan=True)
    return bool(want != got)


# ------------------------------------------------------------------------------------------ ownership
def parameter_reach(net: nn.Module, tasks: Sequence[str], example: tuple[tuple, dict]) -> dict[int, frozenset[str]]:
    """``{id(parameter): tasks}``: the tasks whose outputs autograd connects to each trainable parameter on the
    example batch (eval mode, so that dropout and BatchNorm statistics change nothing)."""
    from recon._outputs import move_to, task_outputs

    params = [p for p in net.parameters() if p.requires_grad]
    args, kwargs = move_to(example, params[0].device) if params else example  # the model may have moved since
    saved = _set_modes(net, False)
    try:
        with torch.enable_grad():
            outputs = task_outputs(net(*args, **kwargs), list(tasks))
            reach: dict[int, set[str]] = {}
            for task in tasks:
                values = pytree.tree_leaves(outputs[task])
                leaves = [t for t in values if isinstance(t, torch.Tensor) and t.requires_grad]
                if not leaves:
                    continue
                total = sum(t.float().sum() for t in leaves)
                grads = torch.autograd.grad(total, params, allow_unused=True, retain_graph=True)
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        reach.setdefault(id(p), set()).add(task)
    finally:
        _set_modes(net, saved)
    return {k: frozenset(v) for k, v in reach.items()}


# ------------------------------------------------------------------------------------------ torch.export
def by_mode(training: bool, train_value: Any, eval_value: Any) -> Any:
    """``train_value`` in train mode, ``eval_value`` in eval mode: a scalar argument that differs between the
    graphs exported in the two modes (sdpa's ``dropout_p``), made to follow the module's mode at run time."""
    return train_value if training else eval_value


def export_graph(model: nn.Module, example: tuple[tuple, dict], fixed: Mapping[str, Any] = {}) -> fx.GraphModule:
    """``model``'s forward exported with ``torch.export`` (non-strict, the batch dimension dynamic) in train and
    eval mode, folded into one graph over ``model``'s own modules whose mode-dependent arguments follow the
    modules' ``training`` flags (see the module docstring). ``fixed``: arguments the batch leaves out, at
    their values. Raises :class:`ReconError` with the first real difference when the two graphs differ
    otherwise, and names the line of a ``backward()`` called inside forward."""
    names, kwargs, dynamic = _named_inputs(model, example, fixed)
    saved = _set_modes(model, True)
    try:
        train = _rebuild(model, _export(model, kwargs, dynamic), names)
        _set_modes(model, False)
        evaluation = _rebuild(model, _export(model, kwargs, dynamic), names)
        for graph, _ in (train, evaluation):
            _fold_module_calls(graph, model)
        graph, constants = train
        _follow_modes(graph, evaluation[0], model, constants, evaluation[1])
        return graph_module(model, graph, type(model).__name__, constants)
    except ReconError:
        raise
    except Exception as exc:  # a graph recon does not handle: one line naming the model, never a raw traceback
        first = (str(exc).strip().splitlines() or [""])[0]
        where = _user_frame(exc)
        at = f" at {where[0]}:{where[1]} `{where[2]}`" if where else ""
        name = type(model).__name__
        raise ReconError(f"recon cannot use the exported graph of {name}{at}: {type(exc).__name__}: {first}") from exc
    finally:
        _set_modes(model, saved)


def _named_inputs(
    model: nn.Module, example: tuple[tuple, dict], fixed: Mapping[str, Any]
) -> tuple[list[str], dict[str, Any], dict]:
    """The forward's parameter names bound to the example (and the fixed arguments), as keyword arguments in
    the signature's order, and their dynamic shapes: the batch dimension of the inputs that have one."""
    args, kwargs = example
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ReconError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    kinds = {p.name: p.kind for p in signature.parameters.values()}
    if any(kinds[n] in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for n in bound.arguments):
        raise ReconError(
            f"{type(model).__name__}.forward takes *args/**kwargs; torch.export capture needs named inputs"
        )
    given = {**{k: v for k, v in fixed.items() if k in kinds}, **bound.arguments}
    named = {k: given[k] for k in kinds if k in given}
    for k, v in named.items():
        if not isinstance(v, (torch.Tensor, int, float, bool, str, type(None))):
            raise ReconError(f"input {k!r} is a {type(v).__name__}; torch.export capture takes tensors and scalars")
    sizes = [v.shape[0] for v in named.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if not sizes:
        raise ReconError("the example inputs hold no tensor with a batch dimension; give a batch of tensors")
    size = max(sizes, key=sizes.count)  # the batch size: the leading size most inputs share
    dynamic = {k: _dynamic_dims(v) if _batched(v, size) else None for k, v in named.items()}
    return list(named), named, dynamic


def _dynamic_dims(value: torch.Tensor) -> dict[int, Any]:
    """The batch dimension, dynamic (``Dim.AUTO``: export keeps it static where the model needs that, as for
    the flat ids and offsets of an ``nn.EmbeddingBag``); the other dimensions of integer inputs too (token
    ids: sequences vary in length between batches), not those of float inputs, whose image or feature sizes
    are fixed and whose symbolic shapes make export many times slower (a 2-stage Swin: 44 s against 1 s)."""
    auto = torch.export.Dim.AUTO
    if value.is_floating_point() or value.is_complex():
        return {0: auto}
    return dict.fromkeys(range(value.dim()), auto)


def _batched(value: Any, size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size


def _export(model: nn.Module, kwargs: dict[str, Any], dynamic: dict) -> fx.GraphModule:
    name = type(model).__name__
    try:
        with _refuse_backward(name):
            return torch.export.export(model, (), kwargs, strict=False, dynamic_shapes=dynamic).module()
    except ReconError:
        raise
    except Exception as exc:  # export raises many kinds; report where in user code it failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = _user_frame(exc)
        at = f" at {where[0]}:{where[1]} `{where[2]}`" if where else ""
        raise ReconError(f"torch.export cannot capture {name}{at}: {type(exc).__name__}: {first}") from exc


@contextlib.contextmanager
def _refuse_backward(name: str) -> Iterator[None]:
    """While exporting, a ``backward()`` called inside forward (a regulariser's, as DSelect-k does in train
    mode) is refused at its line: the graph of such a forward differs between train and eval mode."""
    original = torch.autograd.backward

    def refuse(*args: Any, **kwargs: Any) -> None:
        where = user_frame_here()
        at = f" at {where[0]}:{where[1]} `{where[2]}`" if where else ""
        raise ReconError(
            f"{name}.forward calls backward(){at}, so its graph differs between train and eval mode and recon "
            "cannot capture it; compute that loss outside forward (return it as an output, or add it to the "
            "task losses)"
        )

    torch.autograd.backward = refuse
    try:
        yield
    finally:
        torch.autograd.backward = original


def _rebuild(model: nn.Module, exported: fx.GraphModule, names: list[str]) -> tuple[fx.Graph, dict[str, Any]]:
    """The exported graph over ``model``'s own attribute paths, with the forward's signature and output
    structure (no pytree flattening), and without the export guards. Returns it and its tensor constants."""
    owned = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    owned |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    constants: dict[str, Any] = {}
    placeholders = iter(names)
    defaults = inspect.signature(model.forward).parameters
    outputs: Any = None
    for n in exported.graph.nodes:
        if n.op == "placeholder":
            name = next(placeholders)
            default = defaults[name].default
            env[n] = graph.placeholder(name, default_value=default)
        elif n.op == "call_module":  # the export guards (_guards_fn): shape checks, not computation
            continue
        elif n.op == "get_attr" and str(n.target) not in owned:
            value = _fetch(exported, str(n.target))  # lifted tensors live under dotted paths too
            if isinstance(value, nn.Module):
                raise ReconError(f"the exported graph calls a submodule {n.target!r} (control flow); use fx or a leaf")
            name = f"_recon_constant{len(constants)}"
            constants[name] = value
            env[n] = graph.get_attr(name)
            env[n].meta = dict(n.meta)
        elif n.op == "output":
            spec = exported.graph._codegen.pytree_info.out_spec
            flat = fx.node.map_arg(list(n.args[0]), lambda a: env[a])
            outputs = pytree.tree_unflatten(list(flat), spec) if spec is not None else flat
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(outputs)
    return graph, constants


def _collapsible(module: nn.Module) -> bool:
    """A ``torch.nn`` module (fx's default leaves) whose forward takes exactly one argument."""
    if not type(module).__module__.startswith(("torch.nn", "torch.ao.nn")) or isinstance(module, nn.Sequential):
        return False
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _fold_module_calls(graph: fx.Graph, model: nn.Module) -> None:
    """Replace the aten nodes of each call of a one-input ``torch.nn`` module by one ``call_module``."""
    modules = dict(model.named_modules())
    groups: dict[str, tuple[str, list[fx.Node]]] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        for key, value in (n.meta.get("nn_module_stack") or {}).items():  # outermost first
            path = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else None
            if path and path in modules and _collapsible(modules[path]):
                groups.setdefault(key, (path, []))[1].append(n)
                break
    for path, nodes in groups.values():
        _fold(graph, path, nodes)
    for n in list(graph.nodes):
        if n.op == "get_attr" and not n.users:
            graph.erase_node(n)


def _fold(graph: fx.Graph, path: str, nodes: list[fx.Node]) -> None:
    """One ``call_module`` for the nodes of one call of ``path``, if they take one tensor and give one. Shape
    arithmetic (``sym_size``, the batch-size checks BatchNorm makes in train mode only) is neither an input nor
    an output: the train and eval calls of one module fold alike, whatever ATen variant each mode recorded."""
    inside = set(nodes)
    own = path + "."
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            owned = a.op == "get_attr" and str(a.target).startswith(own)
            if a not in inside and not owned and not _scalar(a) and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if not _scalar(n) and any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return
    out = outputs[0]
    with graph.inserting_before(out):
        call = graph.call_module(path, (inputs[0],))
    call.meta = dict(out.meta)
    out.replace_all_uses_with(call)
    for n in reversed(nodes):
        if not n.users:  # shape arithmetic that later nodes still read stays
            graph.erase_node(n)


def _scalar(node: fx.Node) -> bool:
    """A node whose value is a (symbolic) number, not a tensor: shape arithmetic of an exported graph."""
    value = node.meta.get("val")
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _follow_modes(
    train: fx.Graph, evaluation: fx.Graph, model: nn.Module, constants: dict[str, Any], eval_constants: dict
) -> None:
    """Make the scalar arguments in which the train-mode graph differs from the eval-mode one read the owning
    module's ``training`` flag; raise with the first real difference (file, line, code) otherwise."""
    a = node_keys(train, constants.get, _layout_only)
    b = node_keys(evaluation, eval_constants.get, _layout_only)
    nodes_a = [n for n in train.nodes if not (_layout_only(n) and n.all_input_nodes)]
    nodes_b = [n for n in evaluation.nodes if not (_layout_only(n) and n.all_input_nodes)]
    if len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y and not _scalar_difference(nodes_a[i], nodes_b[i], x, y):
                break
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if x != y:
                    _make_mode_dependent(train, nodes_a[i], nodes_b[i], model)
            return
    index = first_difference(a, b)
    bad = _first_real_difference(a, b, nodes_a, nodes_b) if index is not None else None
    module, line = node_origin(bad)
    where = f" in module {module!r}" if module else ""
    at = f" at {line}" if line else ""
    raise ReconError(
        f"the exported graph of {type(model).__name__} differs between train and eval mode beyond mode flags "
        f"(first difference at node {bad.name if bad is not None else '?'!r}{where}{at}); use mode-aware "
        "modules (nn.Dropout, nn.BatchNorm) instead of branching on self.training in forward"
    )


_LAYOUT_ONLY = {torch.ops.aten.contiguous.default, torch.ops.aten.alias.default}


def _layout_only(node: fx.Node) -> bool:
    """Operations that change no value, only memory layout: export records ``contiguous`` only where the input
    is not contiguous already, which may differ between modes (sdpa with and without dropout)."""
    return node.op == "call_function" and node.target in _LAYOUT_ONLY


def _first_real_difference(a: list, b: list, nodes_a: list, nodes_b: list) -> fx.Node | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y and not _scalar_difference(nodes_a[i], nodes_b[i], x, y):
            return nodes_a[i]
    return nodes_a[min(len(a), len(b)) - 1] if nodes_a else None


def _full_arguments(node: fx.Node) -> tuple[list, dict]:
    """The node's arguments with the operator's defaults filled in (export drops trailing defaults, so the
    train graph's ``sdpa(q, k, v, mask, 0.1)`` is the eval graph's ``sdpa(q, k, v, mask)``)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return args, kwargs
    for i, arg in enumerate(schema.arguments):
        if arg.kwarg_only:
            if arg.name not in kwargs and arg.has_default_value():
                kwargs[arg.name] = arg.default_value
        elif i >= len(args):
            if arg.name in kwargs:
                args.append(kwargs.pop(arg.name))
            elif arg.has_default_value():
                args.append(arg.default_value)
            else:
                break
    return args, kwargs


def _flat(node: fx.Node) -> tuple[list, Any]:
    return pytree.tree_flatten(_full_arguments(node))


def _scalar_difference(na: fx.Node, nb: fx.Node, ka: tuple, kb: tuple) -> bool:
    """Whether two aligned nodes differ only in plain scalar arguments (bool, int, float)."""
    if ka[:3] != kb[:3] or na.op != "call_function":
        return False
    (la, sa), (lb, sb) = _flat(na), _flat(nb)
    if sa != sb:
        return False
    scalar = (bool, int, float)
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                return False
        elif x != y and not (isinstance(x, scalar) and isinstance(y, scalar)):
            return False
    return True


def _owner(node: fx.Node, model: nn.Module) -> str:
    """The innermost module (a real submodule of ``model``) that made ``node``; "" for the model itself."""
    modules = dict(model.named_modules())
    owner = ""
    for value in (node.meta.get("nn_module_stack") or {}).values():
        path = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else None
        if path and path in modules:
            owner = path
    return owner


def _make_mode_dependent(graph: fx.Graph, na: fx.Node, nb: fx.Node, model: nn.Module) -> None:
    (la, spec), (lb, _) = _flat(na), _flat(nb)
    owner = _owner(na, model)
    with graph.inserting_before(na):
        flag = graph.get_attr(f"{owner}.training" if owner else "training")
        leaves = []
        for x, y in zip(la, lb, strict=True):
            if isinstance(x, fx.Node) or x == y:
                leaves.append(x)
            elif x is True and y is False:
                leaves.append(flag)
            elif x is False and y is True:
                leaves.append(graph.call_function(operator.not_, (flag,)))
            else:
                leaves.append(graph.call_function(by_mode, (flag, x, y)))
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    na.args, na.kwargs = tuple(args), kwargs
