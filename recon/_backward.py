"""``recon.backward``: one call that fills ``.grad`` for a multi-task step with any method."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from recon import _distributed
from recon._errors import NonFiniteLossError, ReconError

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
    """

    weights: Tensor | None
    shared: tuple[nn.Parameter, ...]
    losses: Tensor


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
) -> BackwardResult:
    """Fill ``.grad`` of ``net``'s parameters for one multi-task step with ``method``.

    Like ``Tensor.backward``, gradients are **added** to existing ``.grad`` (zero them between steps).

    * Parameters that receive gradient from two or more tasks (the shared ones) get the method's update.
    * Parameters used by exactly one task (heads, per-task branches of a split model) get that task's own
      gradient, untouched by the method.
    * Parameters used by no task are left alone.

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
    Returns a :class:`BackwardResult` (weights, shared parameters, loss values).
    """
    from recon.methods import resolve  # late: recon.methods imports this module's package

    tasks, values = _check_losses(losses, step)
    m = resolve(method)
    if m.tasks is None and not m.learnable:
        m.bind(tasks)  # methods with learnable parameters must be bound before the optimiser is built
    loss_values = torch.stack([v.detach() for v in values])

    custom = getattr(m, "custom_backward", None)
    if custom is not None:
        weights = custom(losses, net, features=features, step=step, retain_graph=retain_graph)
        return BackwardResult(weights, (), loss_values)

    if m.kind == "loss":
        total, weights = m.combine(torch.stack(values))
        total.backward(retain_graph=retain_graph)
        _average_grads(net, m)
        return BackwardResult(weights, (), loss_values)

    if m.kind == "representation":
        if features is not None:
            R = _features_matrix(values, features)
            weights = m(loss_values, R.detach())
            total = (weights.detach().to(values[0].dtype) * torch.stack(values)).sum()
            total.backward(retain_graph=retain_graph)
            _average_grads(net, m)
            return BackwardResult(weights.detach(), (), loss_values)
        if m.requires_features:
            raise ReconError(
                f"method {type(m).__name__} needs the shared representation: pass features=z "
                "(the encoder's output) to recon.backward, or use 'mgda' on the shared parameters"
            )

    params = _params_of(net)
    if not params:
        raise ReconError("recon.backward: the model has no parameter that requires grad")
    K = len(values)
    grads: list[list[Tensor | None]] = []
    if shared is not None:  # known partition: each task's shared gradients go into J as soon as computed
        ids = {id(p) for p in shared}
        shared_idx = [i for i, p in enumerate(params) if id(p) in ids]
        J = _matrix_for(K, [params[i] for i in shared_idx]) if shared_idx else None
        for k, loss in enumerate(values):
            row = list(torch.autograd.grad(loss, params, retain_graph=retain_graph or k < K - 1, allow_unused=True))
            if J is not None:
                _fill_row(J, k, row, shared_idx, params)
            grads.append(row)
        own = [(i, k) for k in range(K) for i, g in enumerate(grads[k]) if g is not None]
    else:  # discovery: a parameter is shared when 2+ tasks' gradients reach it
        for k, loss in enumerate(values):
            grads.append(
                list(torch.autograd.grad(loss, params, retain_graph=retain_graph or k < K - 1, allow_unused=True))
            )
        shared_idx, own = _partition(grads, len(params))
        J = _matrix_for(K, [params[i] for i in shared_idx]) if shared_idx else None
        if J is not None:
            for k in range(K):
                _fill_row(J, k, grads[k], shared_idx, params)
    if _distributed.active():  # under torchrun: the global batch's task gradients, before the method sees them
        _distributed.average_([*([J] if J is not None else []), *(grads[k][i] for i, k in own), loss_values])
    return _apply(m, J, grads, own, shared_idx, params, loss_values)


def apply_task_gradients(
    rows: list[list[Tensor | None]], params: Sequence[Tensor], method: Any, losses: Tensor
) -> BackwardResult:
    """Fill ``.grad`` from per-task gradients already computed (``rows[k][i]``: task k, parameter i; None if
    unused), as :func:`backward` does after its K backward passes. The profiler uses it: it needs the same
    gradients for its cosines. ``rows`` is consumed (shared entries are released as they go into J).
    """
    from recon.methods import resolve

    m = resolve(method)
    if m.tasks is None and not m.learnable:
        m.bind(len(rows))
    if m.kind not in ("gradient", "representation") or getattr(m, "custom_backward", None) is not None:
        raise ReconError(
            f"{type(m).__name__} does not aggregate per-task gradients; use a gradient method "
            "(e.g. mean, pcgrad, cagrad) here"
        )
    shared_idx, own = _partition(rows, len(params))
    J = _matrix_for(len(rows), [params[i] for i in shared_idx]) if shared_idx else None
    if J is not None:
        for k in range(len(rows)):
            _fill_row(J, k, rows[k], shared_idx, params)
    return _apply(m, J, rows, own, shared_idx, params, losses)


def _apply(
    m: Any,
    J: Tensor | None,
    grads: list[list[Tensor | None]],
    own: list[tuple[int, int]],
    shared_idx: Sequence[int],
    params: Sequence[Tensor],
    loss_values: Tensor,
) -> BackwardResult:
    """The method's update of the shared parameters (from J) and each task's own gradient elsewhere."""
    tasks = range(len(grads))
    shared_params = tuple(params[i] for i in shared_idx)
    weights: Tensor | None = None
    with torch.no_grad():
        if J is not None:
            if m.kind == "representation":  # gradnorm on the shared parameters
                weights = m(loss_values, J).to(J.dtype)
                update = weights @ J
            else:
                update = m(J)
                weights = m.last_weights
            if not isinstance(update, Tensor) or update.shape != (J.shape[1],):
                got = tuple(update.shape) if isinstance(update, Tensor) else type(update).__name__
                raise ReconError(
                    f"the method returned {got} for a ({J.shape[0]}, {J.shape[1]}) gradient matrix; "
                    f"it must return a ({J.shape[1]},) update"
                )
            _write_update(update.detach(), shared_params)
            del J
        elif m.kind == "representation":
            weights = torch.ones(len(tasks), dtype=loss_values.dtype, device=loss_values.device)
        for i, k in own:
            g = grads[k][i]
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
