"""``recon.backward``: one call that fills ``.grad`` for a multi-task step with any method."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recon import _distributed
from recon._errors import NonFiniteLossError, ReconError
from recon._usage import Copies, UsageClass, group_copies, order_by_class, solve, solve_classes, usage_classes

__all__ = ["BackwardResult", "backward"]


@dataclass(frozen=True)
class BackwardResult:
    """What :func:`backward` did.

    * ``weights``: ``(K,)`` per-task weights in the order of ``losses`` (detached), when the method has any:
      the combination weights of Gram-based gradient methods, the loss weights of loss-weighting and
      representation methods, RotoGrad's per-task gradient scales; ``None`` otherwise (GradDrop, callables).
    * ``shared``: the parameters that got the method's update (received gradient from 2+ tasks, or the
      ``shared=`` given); pass it back as ``shared=`` to skip the discovery on later steps.
    * ``losses``: the K loss values ``(K,)``, detached.
    * ``finite``: False when a loss scale (fp16) overflowed: ``.grad`` holds inf/NaN, skip the optimizer step.
    """

    weights: Tensor | None
    shared: tuple[nn.Parameter, ...]
    losses: Tensor
    finite: bool = True


def _params_of(net: Any) -> list[nn.Parameter]:
    if isinstance(net, nn.Module):
        params = list(net.parameters())
    elif isinstance(net, Tensor):
        params = [net]
    elif isinstance(net, Iterable):
        params = list(net)
    else:
        raise ReconError(f"recon.backward needs a model (nn.Module) or its parameters, got {type(net).__name__}")
    seen: set[int] = set()
    out = []
    for p in params:
        if not isinstance(p, Tensor):
            raise ReconError(f"recon.backward: expected parameters, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _check_losses(losses: Any, step: int) -> tuple[list[str], list[Tensor]]:
    if not isinstance(losses, Mapping) or not losses:
        raise ReconError(
            f"recon.backward needs losses as a non-empty dict {{task: scalar tensor}}, got {type(losses).__name__}"
        )
    tasks = list(losses)
    values = []
    for t in tasks:
        loss = losses[t]
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ReconError(f"the loss of task {t!r} must be a scalar tensor, got {what}; reduce it (e.g. .mean())")
        if not loss.requires_grad:
            raise ReconError(f"the loss of task {t!r} does not require grad: it is not connected to the model")
        values.append(loss.reshape(()))
    stacked = torch.stack([v.detach().float() for v in values])
    finite = torch.isfinite(stacked)
    if not bool(finite.all()):  # the one host sync of a step: a non-finite loss must stop training
        k = int((~finite).nonzero()[0, 0])
        raise NonFiniteLossError(tasks[k], step, float(stacked[k]))
    return tasks, values


def _accumulate(p: Tensor, g: Tensor) -> None:
    if g.dtype != p.dtype:
        g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def _matrix_for(n_tasks: int, shared: Sequence[Tensor]) -> Tensor:
    """An empty ``(K, P)`` matrix for the shared parameters' gradients (promoted dtype, first one's device)."""
    dtype = shared[0].dtype
    for p in shared[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.empty(n_tasks, sum(p.numel() for p in shared), dtype=dtype, device=shared[0].device)


def _fill_row(J: Tensor, k: int, row: list[Tensor | None], shared_idx: Sequence[int], params: Sequence[Tensor]) -> None:
    """Write task k's shared gradients into ``J[k]`` with one ``cat``, then drop them from ``row`` (memory)."""
    dtype, device = J.dtype, J.device
    pieces = []
    for i in shared_idx:
        g = row[i]
        if g is None:
            g = torch.zeros(params[i].numel(), dtype=dtype, device=device)
        else:
            if g.layout != torch.strided:
                g = g.to_dense()
            g = g.reshape(-1)
            if g.dtype != dtype or g.device != device:
                g = g.to(device=device, dtype=dtype)
        pieces.append(g)
        row[i] = None
    torch.cat(pieces, out=J[k])


def _write_update(update: Tensor, shared: Sequence[Tensor]) -> None:
    offset = 0
    for p in shared:
        n = p.numel()
        piece = update[offset : offset + n].view(p.shape)
        if piece.device != p.device:
            piece = piece.to(p.device)
        _accumulate(p, piece)
        offset += n


def _partition(grads: Sequence[Sequence[Tensor | None]], n_params: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Indices of the parameters used by 2+ tasks, and (parameter, task) pairs of those used by exactly one."""
    K = len(grads)
    shared_idx, own = [], []
    for i in range(n_params):
        users = [k for k in range(K) if grads[k][i] is not None]
        if len(users) >= 2:
            shared_idx.append(i)
        elif len(users) == 1:
            own.append((i, users[0]))
    return shared_idx, own


@dataclass
class TaskGradients:
    """One step's per-task gradients, as :func:`task_gradients` collects them.

    * ``J``: ``(K, P)`` task gradients of the shared parameters (``shared_idx``, flattened in that order), or
      ``None`` when nothing is shared;
    * ``rows[k][i]``: task k's gradient of non-shared parameter i (``None`` where task k does not reach it);
    * ``own``: the ``(parameter, task)`` pairs with a gradient in ``rows``;
    * ``users``: per parameter, the tasks that reached it (only when the partition was discovered this step);
    * ``classes``: the usage classes of group copies (:mod:`recon._usage`), J's last column spans; the columns
      before the first one are the global solve's. Empty for unsplit models and per-task splits.
    """

    J: Tensor | None
    rows: list[list[Tensor | None]]
    own: list[tuple[int, int]]
    shared_idx: list[int]
    users: list[tuple[int, ...]] | None = None
    classes: list[UsageClass] = field(default_factory=list)

    def tensors(self) -> list[Tensor]:
        """Every gradient tensor held (for one all-reduce under torchrun)."""
        return [*([self.J] if self.J is not None else []), *(self.rows[k][i] for i, k in self.own)]


Batched = Literal["auto"] | bool


def _wants_batched(batched: Batched, params: Sequence[Tensor], group: Any = None) -> bool:
    if batched is False or not params:
        return False
    if batched == "auto" and params[0].device.type != "cuda":
        return False
    return not _batched.failed(params, group)


@dataclass
class _Memo:
    """What the batched path knows about one model (keyed by its first parameter)."""

    n_params: int
    users: list[tuple[int, ...]] | None = None  # per parameter, the tasks that reach it
    found: list[int] | None = None  # the shared parameters (J's columns) the users were learnt with
    discovered: bool = False  # found by autograd (shared_idx=None), not given
    failed: bool = False
    tried: bool = False


class _BatchedGradients:
    """The K task gradients in one vectorised backward pass, remembering per model whether vmap runs."""

    def __init__(self) -> None:
        # (id(first parameter), group of tasks) -> (its weakref, memo); a chunk of tasks is its own group
        self._memos: dict[tuple[int, Any], tuple[weakref.ref, _Memo]] = {}

    def _memo(self, params: Sequence[Tensor], group: Any = None) -> _Memo:
        key = (id(params[0]), group)
        ref, memo = self._memos.get(key, (None, None))
        if ref is None or ref() is not params[0] or memo.n_params != len(params):
            self._memos = {k: v for k, v in self._memos.items() if v[0]() is not None}  # forget dead models
            memo = _Memo(len(params))
            self._memos[key] = (weakref.ref(params[0]), memo)
        return memo

    def failed(self, params: Sequence[Tensor], group: Any = None) -> bool:
        return self._memo(params, group).failed

    def gradients(
        self,
        values: Sequence[Tensor],
        params: Sequence[Tensor],
        shared_idx: Sequence[int] | None,
        retain: bool,
        copies: Copies,
        group: Any = None,
    ) -> TaskGradients:
        memo = self._memo(params, group)
        wanted = None if shared_idx is None else list(shared_idx)
        stale = wanted != memo.found if wanted is not None else not memo.discovered
        if memo.users is None or stale:  # learn the partition with the K passes, once
            grads = _sequential(values, params, shared_idx, retain, copies)
            K = len(values)
            memo.discovered, memo.found = wanted is None, grads.shared_idx
            memo.users = grads.users or [
                tuple(k for k in range(K) if grads.rows[k][i] is not None) for i in range(len(params))
            ]
            return grads
        first = not memo.tried
        memo.tried = True
        try:  # the first try keeps the graph, so that the K passes can still run if vmap cannot
            batch = _vmapped_grads(values, params, retain or first)
        except (RuntimeError, NotImplementedError) as e:
            if not first:
                raise
            memo.failed = True
            warnings.warn(
                f"recon: batched task gradients cannot run on this model ({str(e).splitlines()[0][:120]}); "
                "using one backward pass per task",
                RuntimeWarning,
                stacklevel=3,
            )
            return _sequential(values, params, shared_idx, retain, copies)
        return _from_batch(batch, params, memo.found, memo.users, discovered=shared_idx is None)


_batched = _BatchedGradients()


def _vmapped_grads(values: Sequence[Tensor], params: Sequence[Tensor], retain: bool) -> list[Tensor | None]:
    """``(K, *p.shape)`` per parameter: row k is d L_k / d p, from one backward with ``is_grads_batched``."""
    stacked = torch.stack([v.reshape(()).float() for v in values])
    eye = torch.eye(len(values), dtype=stacked.dtype, device=stacked.device)
    return list(
        torch.autograd.grad(
            stacked, params, grad_outputs=eye, is_grads_batched=True, retain_graph=retain, allow_unused=True
        )
    )


def _from_batch(
    batch: list[Tensor | None],
    params: Sequence[Tensor],
    shared_idx: list[int],
    users: list[tuple[int, ...]],
    *,
    discovered: bool,
) -> TaskGradients:
    """A :class:`TaskGradients` from batched gradients: J from the shared parameters' blocks, each other
    parameter's rows for the tasks that reach it."""
    K = next((g.shape[0] for g in batch if g is not None), 0)
    in_j = set(shared_idx)
    J = _matrix_for(K, [params[i] for i in shared_idx]) if shared_idx else None
    if J is not None:
        pieces = []
        for i in shared_idx:
            g = batch[i]
            g = torch.zeros(K, params[i].numel(), dtype=J.dtype, device=J.device) if g is None else g.reshape(K, -1)
            pieces.append(g.to(device=J.device, dtype=J.dtype))
        torch.cat(pieces, dim=1, out=J)
    rows: list[list[Tensor | None]] = [[None] * len(params) for _ in range(K)]
    for i, g in enumerate(batch):
        if g is not None and i not in in_j:
            for k in users[i]:
                rows[k][i] = g[k]
    if discovered:  # the orders of the sequential paths: by parameter when discovered, by task when given
        own = [(i, k) for i in range(len(params)) for k in range(K) if rows[k][i] is not None]
    else:
        own = [(i, k) for k in range(K) for i, g in enumerate(rows[k]) if g is not None]
    return TaskGradients(J, rows, own, list(shared_idx), list(users) if discovered else None)


def task_gradients(
    values: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    shared_idx: Sequence[int] | None = None,
    retain_graph: bool = False,
    batched: Batched = "auto",
    copies: Copies | None = None,
    group: Any = None,
) -> TaskGradients:
    """The K tasks' gradients w.r.t. ``params``: one backward pass per task, or one batched pass.

    With ``shared_idx=None`` the partition is discovered (a parameter is shared when 2+ tasks reach it): every
    task's gradients are computed with ``torch.autograd.grad`` and then copied into ``J``. With a known
    partition, task k's backward accumulates straight into views of ``J[k]`` (each parameter's ``.grad`` is
    pointed at its slice, autograd adds into it in place), so the peak memory is ``J`` plus one parameter's
    gradient, not ``J`` plus a whole set of task gradients. The caller's ``.grad`` are put back untouched.

    ``batched``: ``True`` computes all K gradients in one vectorised backward pass,
    ``torch.autograd.grad(stack(losses), params, grad_outputs=I_K, is_grads_batched=True)`` (vmap over the
    backward graph: the K passes run as one, the way below the K-pass floor on a GPU); ``"auto"`` does so on
    CUDA and runs the K passes on other devices; ``False`` never. The first call on a model runs the K passes
    once to learn which tasks reach which parameter (batched gradients are zeros, not ``None``, where a task
    does not reach); that partition is then kept. Where vmap cannot run the backward (some in-place ops,
    custom autograd functions), the model falls back to the K passes for good, with one warning. ``group``
    names which tasks ``values`` are when they are a chunk of them (:mod:`recon._chunks`): each chunk keeps its
    own partition.

    ``copies``: ``{parameter index: task indices}`` of the group copies (:func:`recon._usage.group_copies`); J's
    columns are then ordered ``[global | usage class 1 | ...]`` and ``classes`` gives the classes' spans.
    """
    if batched not in ("auto", True, False):
        raise ReconError(f"batched={batched!r} is not one of 'auto', True, False")
    copies = copies or {}
    if shared_idx is not None and copies:
        shared_idx = order_by_class(shared_idx, copies)
    if _wants_batched(batched, params, group):
        grads = _batched.gradients(values, params, shared_idx, retain_graph, copies, group)
    else:
        grads = _sequential(values, params, shared_idx, retain_graph, copies)
    grads.classes = usage_classes(grads.shared_idx, copies, params)
    return grads


def _sequential(
    values: Sequence[Tensor],
    params: Sequence[Tensor],
    shared_idx: Sequence[int] | None,
    retain_graph: bool,
    copies: Copies,
) -> TaskGradients:
    """:func:`task_gradients` with one backward pass per task."""
    K = len(values)
    if shared_idx is None:
        grads = [
            list(torch.autograd.grad(v, params, retain_graph=retain_graph or k < K - 1, allow_unused=True))
            for k, v in enumerate(values)
        ]
        users = [tuple(k for k in range(K) if grads[k][i] is not None) for i in range(len(params))]
        found, own = _partition(grads, len(params))
        found = order_by_class(found, copies)
        J = _matrix_for(K, [params[i] for i in found]) if found else None
        if J is not None:
            for k in range(K):
                _fill_row(J, k, grads[k], found, params)
        return TaskGradients(J, grads, own, found, users)

    shared_idx = list(shared_idx)
    shared = [params[i] for i in shared_idx]
    J = _matrix_for(K, shared) if shared else None
    if J is not None and not all(p.dtype == J.dtype and p.device == J.device for p in shared):
        rows = []  # mixed dtypes or devices: .grad cannot be a view of J; copy each task's gradients in
        for k, v in enumerate(values):
            row = list(torch.autograd.grad(v, params, retain_graph=retain_graph or k < K - 1, allow_unused=True))
            _fill_row(J, k, row, shared_idx, params)
            rows.append(row)
    else:
        rows = _backward_into(J, values, params, shared_idx, retain_graph, copies)
    own = [(i, k) for k in range(K) for i, g in enumerate(rows[k]) if g is not None]
    return TaskGradients(J, rows, own, shared_idx)


def _backward_into(
    J: Tensor | None,
    values: Sequence[Tensor],
    params: Sequence[Tensor],
    shared_idx: list[int],
    retain_graph: bool,
    copies: Copies,
) -> list[list[Tensor | None]]:
    """K ``Tensor.backward`` passes, task k's shared gradients accumulated in place into ``J[k]`` (a group copy
    that task k does not use gets no view: its zero row stays as it is)."""
    K = len(values)
    in_j = set(shared_idx)
    inputs = list(params)
    stash = [p.grad for p in params]
    rows: list[list[Tensor | None]] = []
    shared = [params[i] for i in shared_idx]
    sizes = [p.numel() for p in shared]
    if J is not None:
        J.zero_()
    try:
        for p in params:
            p.grad = None
        for k, v in enumerate(values):
            pieces = J[k].split(sizes) if J is not None else ()
            views: list[Tensor | None] = []
            for i, p, piece in zip(shared_idx, shared, pieces, strict=True):
                if copies and k not in copies.get(i, (k,)):
                    views.append(None)
                    continue
                p.grad = view = piece.view(p.shape)
                views.append(view)
            v.backward(inputs=inputs, retain_graph=retain_graph or k < K - 1)
            row: list[Tensor | None] = [None] * len(params)
            for i, p in enumerate(params):
                if i not in in_j:
                    row[i], p.grad = p.grad, None
            for view, p, piece in zip(views, shared, pieces, strict=True):
                g = p.grad
                if g is not view:  # autograd replaced the buffer (or reached a copy's unviewed row): copy it in
                    piece.view(p.shape).copy_(g.to_dense() if g.layout != torch.strided else g)
                p.grad = None
            rows.append(row)
    finally:
        for p, g in zip(params, stash, strict=True):
            p.grad = g
    return rows


def _features_matrix(values: Sequence[Tensor], features: Any) -> Tensor:
    """``(K, D)``: the gradient of each loss with respect to ``features`` (a tensor or a list of tensors)."""
    feats = [features] if isinstance(features, Tensor) else list(features)
    if not feats or not all(isinstance(f, Tensor) for f in feats):
        raise ReconError("features= must be a tensor (the shared representation) or a list of tensors")
    if not all(f.requires_grad for f in feats):
        raise ReconError("features= must be part of the autograd graph of the losses (requires_grad)")
    rows = []
    for loss in values:
        gs = torch.autograd.grad(loss, feats, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(f)).reshape(-1) for g, f in zip(gs, feats, strict=True)]
            )
        )
    return torch.stack(rows)


def backward(
    losses: Mapping[str, Tensor],
    net: nn.Module | Iterable[nn.Parameter],
    method: Any = "mean",
    *,
    features: Tensor | Sequence[Tensor] | None = None,
    shared: Sequence[nn.Parameter] | None = None,
    step: int = -1,
    retain_graph: bool = False,
    batched: Batched = "auto",
    precision: Any = None,
    task_chunk: int | None = None,
) -> BackwardResult:
    """Fill ``.grad`` of ``net``'s parameters for one multi-task step with ``method``.

    Like ``Tensor.backward``, gradients are **added** to existing ``.grad`` (zero them between steps).

    * Parameters that receive gradient from two or more tasks (the shared ones) get the method's update.
    * Parameters used by exactly one task (heads, per-task branches of a split model) get that task's own
      gradient, untouched by the method.
    * Parameters used by no task are left alone.
    * A layer copy used by a task group G (``recon.split`` with groups) gets the method on G's tasks alone
      (``mean``: G's mean), one solve per usage class (:mod:`recon._usage`; copies are found in ``net``).

    The partition is found with autograd, one backward per task over all parameters
    (``torch.autograd.grad(L_k, params, allow_unused=True)``), so it works on any module, including the
    ``torch.fx.GraphModule`` that ``recon.split`` returns. Pass ``shared=`` (e.g. ``result.shared`` of the first
    step, or ``recon.shared_parameters(net)``) to fix the shared set yourself; parameters outside it then get
    the sum of the task gradients that reach them.

    Method kinds (see :mod:`recon.methods`):

    * gradient methods (and torchjd aggregators, callables ``(K, P) -> (P,)``): the shared gradients are
      flattened into a ``(K, P)`` matrix (one ``torch.cat`` per task, no per-parameter copies) and the
      method's ``(P,)`` update is written back as views;
    * loss-weighting methods (uncertainty, dwa): a single backward of the method's weighted loss; every
      parameter, heads included, gets ``sum_k w_k dL_k``, and the method's own parameters their gradient;
    * representation methods (mgda_ub, gradnorm): K backwards to ``features`` (the shared representation
      tensor, or a list of tensors such as the last shared layer's parameters), then one backward of
      ``sum_k w_k L_k``; gradnorm without ``features`` uses all shared parameters;
    * rotograd: the model's :class:`recon.methods.RotoGrad` module does the whole step.

    A non-finite loss raises :class:`recon.NonFiniteLossError` naming the task and ``step`` (the only host
    synchronisation in the call, besides the K x K Gram matrix that Gram-based methods solve on the host).
    ``batched``: how the K task gradients are computed (:func:`task_gradients`). ``precision``: a
    :class:`recon._precision.Precision` whose loss scale (fp16) multiplies the task losses (gradient methods) or
    the combined loss (the others) before the backward passes; the gradients are unscaled before any method
    sees them and ``.grad`` ends unscaled (so ``.grad`` must be empty before the call, as with
    ``GradScaler.unscale_``). A step with inf/NaN gradients leaves ``result.finite`` False: skip its
    optimizer step. ``task_chunk``: task gradients made that many tasks at a time (:mod:`recon._chunks`).
    Returns a :class:`BackwardResult` (weights, shared parameters, loss values, finite).
    """
    from recon.methods import resolve  # late: recon.methods imports this module's package

    tasks, values = _check_losses(losses, step)
    m = resolve(method)
    if m.tasks is None and not m.learnable:
        m.bind(tasks)  # methods with learnable parameters must be bound before the optimiser is built
    loss_values = torch.stack([v.detach() for v in values])
    custom = getattr(m, "custom_backward", None) is not None
    if custom or m.kind == "loss" or (m.kind == "representation" and features is not None):
        return _combined_backward(m, tasks, values, loss_values, net, features, step, retain_graph, precision)
    _check_features(m)
    params = _params_of(net)
    if not params:
        raise ReconError("recon.backward: the model has no parameter that requires grad")
    shared_idx = _indices_of(params, shared)
    copies = group_copies(net, tasks, params)
    if chunked := _chunked(values, params, shared_idx, m, loss_values, task_chunk, batched, precision, copies):
        return chunked
    scaled = precision.scale(values) if precision is not None else values
    grads = task_gradients(scaled, params, shared_idx=shared_idx, retain_graph=retain_graph, batched=batched,
                           copies=copies)  # fmt: skip
    return reduce_and_apply(grads, params, m, loss_values, precision=precision)


def _check_features(m: Any) -> None:
    """A representation method that needs ``features=`` and got none: say how to call it."""
    if m.kind == "representation" and m.requires_features:
        raise ReconError(
            f"method {type(m).__name__} needs the shared representation: pass features=z "
            "(the encoder's output) to recon.backward, or use 'mgda' on the shared parameters"
        )


def _indices_of(params: Sequence[Tensor], shared: Sequence[Tensor] | None) -> list[int] | None:
    """The indices into ``params`` of the ``shared=`` parameters given to :func:`backward` (None: discover them)."""
    if shared is None:
        return None
    ids = {id(p) for p in shared}
    return [i for i, p in enumerate(params) if id(p) in ids]


def _chunked(
    values: list[Tensor], params: list[Tensor], shared_idx: list[int] | None, m: Any, loss_values: Tensor,
    task_chunk: int | None, batched: Batched, precision: Any, copies: Copies,
) -> BackwardResult | None:  # fmt: skip
    """:func:`backward` with task gradients in chunks (:mod:`recon._chunks`), or None where it does not apply: no
    ``task_chunk``, the shared parameters not given, fp16 loss scaling, torchrun or group copies (they expect
    one J)."""
    if task_chunk is None or shared_idx is None or precision is not None or _distributed.active() or copies:
        return None
    from recon._chunks import chunked_backward  # late: recon._chunks imports this module

    return chunked_backward(values, params, shared_idx, m, loss_values, size=task_chunk, batched=batched)


def _combined_backward(
    m: Any, tasks: list[str], values: list[Tensor], loss_values: Tensor, net: Any, features: Any,
    step: int, retain_graph: bool, precision: Any,
) -> BackwardResult:  # fmt: skip
    """Methods that run one backward of a combined loss (loss-weighting, representation with ``features``) or
    their own (RotoGrad); with a loss scale, the combined loss is scaled and every ``.grad`` unscaled after
    (RotoGrad's losses go unscaled, its gradients are only checked)."""
    scale = precision.scale_loss if precision is not None else (lambda t: t)
    custom = getattr(m, "custom_backward", None)
    if custom is not None:  # RotoGrad: its rotation update is not linear in the losses, so they go unscaled
        weights = custom(dict(zip(tasks, values, strict=True)), net, features=features, step=step,
                         retain_graph=retain_graph)  # fmt: skip
    elif m.kind == "loss":
        total, weights = m.combine(torch.stack(values))
        scale(total).backward(retain_graph=retain_graph)
    else:
        R = _features_matrix(precision.scale(values) if precision is not None else values, features)
        if precision is not None and not precision.unscale_tensors([R], update=False):
            precision.update(False)
            return BackwardResult(None, (), loss_values, finite=False)
        weights = m(loss_values, R.detach()).detach()
        total = (weights.to(values[0].dtype) * torch.stack(values)).sum()
        scale(total).backward(retain_graph=retain_graph)
    if custom is None:
        _average_grads(net, m)
    finite = True
    if precision is not None:
        grads = [p.grad for p in [*_params_of(net), *m.parameters()]]
        finite = precision.unscale_tensors(grads, unscale=custom is None)
    return BackwardResult(weights if weights is None else weights.detach(), (), loss_values, finite=finite)


def reduce_and_apply(
    grads: TaskGradients,
    params: Sequence[Tensor],
    method: Any,
    loss_values: Tensor,
    *,
    observe: Callable[[TaskGradients], None] | None = None,
    precision: Any = None,
) -> BackwardResult:
    """What :func:`backward` does once the task gradients are computed: under torchrun, average them (the
    global batch's, before the method sees them); unscale them (``precision``'s loss scale; an overflow skips
    the rest and returns ``finite=False``); ``observe(grads)`` if given (the training loop's conflict meter
    reads its cosines there, so recording them costs no extra backward pass); fill ``.grad``."""
    _distributed.average_([*grads.tensors(), loss_values])
    if precision is not None and not precision.unscale(grads):
        return BackwardResult(None, tuple(params[i] for i in grads.shared_idx), loss_values, finite=False)
    if observe is not None:
        observe(grads)
    return apply_task_gradients(grads, params, method, loss_values)


def apply_task_gradients(
    grads: TaskGradients, params: Sequence[Tensor], method: Any, loss_values: Tensor
) -> BackwardResult:
    """Fill ``.grad``: ``method``'s update of the shared parameters (from ``grads.J``) and each task's own
    gradient elsewhere. ``grads`` is consumed: ``J`` is released once the update is written (memory)."""
    from recon.methods import resolve

    m = resolve(method)
    if m.tasks is None and not m.learnable:
        m.bind(len(grads.rows))
    if m.kind not in ("gradient", "representation") or getattr(m, "custom_backward", None) is not None:
        raise ReconError(
            f"{type(m).__name__} does not aggregate per-task gradients; use a gradient method "
            "(e.g. mean, pcgrad, cagrad) here"
        )
    J, own, classes = grads.J, grads.own, grads.classes
    shared_params = tuple(params[i] for i in grads.shared_idx)
    grads.J = None
    weights: Tensor | None = None
    with torch.no_grad():
        if J is not None:
            n_global = classes[0].first if classes else len(shared_params)
            if m.kind == "representation" and classes:  # gradnorm: its task weights from all shared columns
                weights = m(loss_values, J).to(J.dtype)
                _write_update(weights @ J[:, : classes[0].start], shared_params[:n_global])
            elif n_global:  # the parameters in no group copy: the method over all K tasks, on their columns
                update, weights = solve(m, J[:, : classes[0].start] if classes else J, loss_values)
                _write_update(update.detach(), shared_params[:n_global])
                del update
            if classes:
                names = m.tasks or tuple(f"task{k}" for k in range(len(grads.rows)))
                updates = solve_classes(m, J, classes, names, loss_values, weights)
                for c, update in zip(classes, updates, strict=True):
                    _write_update(update.detach(), shared_params[c.first : c.last])
            del J
        elif m.kind == "representation":
            weights = torch.ones(len(grads.rows), dtype=loss_values.dtype, device=loss_values.device)
        for i, k in own:
            g = grads.rows[k][i]
            if m.kind == "representation" and weights is not None:
                g = g * weights[k].to(g.device, g.dtype)
            if g.layout != torch.strided:
                g = g.to_dense()
            _accumulate(params[i], g)
    if weights is not None:
        weights = weights.detach()
    return BackwardResult(weights, shared_params, loss_values)


def _average_grads(net: Any, method: nn.Module) -> None:
    """Under torchrun, after a single backward: average ``.grad`` across processes, as DDP does."""
    if _distributed.active():
        grads = [p.grad for p in [*_params_of(net), *method.parameters()] if p.grad is not None]
        _distributed.average_(grads)
