"""Usage classes: the group copies of a split model, each solved with the method on its own group's tasks.

A layer split by a task partition (``recon.split(model, {"layer2.conv1": [["seg", "depth"], ["normal"]]})``)
holds one copy per group. A copy that serves the tasks of group G is trained as G's own shared layer: it gets the
method applied to G's tasks alone, on the rows of the task-gradient matrix J of G's tasks restricted to the copy's
columns (``mean`` gives the group's mean; PCGrad, CAGrad, MGDA, ... solve on G's gradients). The parameters of
every copy that serves the same set of tasks form one **usage class** and get one solve per step, over all their
columns at once (not one per layer). Parameters in no branched copy keep the global solve over their own columns
(unsplit models and per-task splits have no usage class: their step is unchanged).

:func:`task_gradients <recon._backward.task_gradients>` orders J's columns as ``[global | class 1 | class 2 |
...]`` so that each class is one contiguous column span; :func:`solve_classes` is the one function that solves
them, stacking the Gram matrices of the classes with the same number of tasks into one host transfer.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recon._branches import TaskBranches
from recon._errors import ReconError
from recon.methods._base import GramMethod, host_gram, weights_like

__all__ = ["UsageClass", "group_copies", "order_by_class", "solve", "solve_classes", "usage_classes"]

#: parameter index -> the (sorted) indices of the tasks of the group its copy serves
Copies = Mapping[int, tuple[int, ...]]


@dataclass(frozen=True)
class UsageClass:
    """The group-copy parameters used by one set of tasks: J's rows ``tasks`` and columns ``start:stop``, the
    shared parameters ``first:last`` (indices into the shared list, J's column order)."""

    tasks: tuple[int, ...]
    start: int
    stop: int
    first: int
    last: int

    def rows(self, J: Tensor) -> Tensor:
        """The class's ``(len(tasks), stop - start)`` block of ``J`` (a view when its tasks are consecutive)."""
        block = J[:, self.start : self.stop]
        lo, hi = self.tasks[0], self.tasks[-1] + 1
        if hi - lo == len(self.tasks):
            return block[lo:hi]
        return block[list(self.tasks)]


@dataclass
class _Found:
    """What :func:`group_copies` learnt about one model: for a task list, the copies by parameter id, and the
    answer for the last parameter list it was asked about."""

    tasks: tuple[str, ...]
    by_id: dict[int, tuple[int, ...]]
    params: tuple[int, ...] = ()
    copies: dict[int, tuple[int, ...]] | None = None


_BY_MODEL: weakref.WeakKeyDictionary[nn.Module, _Found] = weakref.WeakKeyDictionary()


def _copy_groups(net: nn.Module, tasks: Sequence[str]) -> dict[int, tuple[int, ...]]:
    """``{id(parameter): task indices}`` for the parameters of every copy serving 2+ of ``tasks``."""
    index = {t: k for k, t in enumerate(tasks)}
    out: dict[int, tuple[int, ...]] = {}
    for module in net.modules():
        if not isinstance(module, TaskBranches):
            continue
        served: dict[str, list[int]] = {}
        for task, copy in module.route.items():
            if task in index:
                served.setdefault(copy, []).append(index[task])
        for copy, group in served.items():
            if len(group) < 2:
                continue  # a per-task copy: its task's own gradient
            for p in module._modules[copy].parameters(recurse=False):  # the layer's own parameters
                out[id(p)] = tuple(sorted(group))
    return out


def group_copies(net: Any, tasks: Sequence[str], params: Sequence[Tensor]) -> dict[int, tuple[int, ...]]:
    """``{parameter index: task indices}`` for the parameters of ``params`` that belong to a copy serving a
    group of 2+ of ``tasks`` (in ``net``, a module holding a model made by :func:`recon.split`, or the model
    itself). Empty for anything else (an unsplit model, a per-task split, a list of parameters). The walk over
    ``net``'s modules is done once per model and task list."""
    if not isinstance(net, nn.Module):
        return {}
    key = tuple(tasks)
    found = _BY_MODEL.get(net)
    if found is None or found.tasks != key:
        found = _Found(key, _copy_groups(net, key))
        _BY_MODEL[net] = found
    if not found.by_id:
        return {}
    ids = tuple(map(id, params))
    if found.copies is None or ids != found.params:
        by_id = found.by_id
        found.params, found.copies = ids, {i: by_id[pid] for i, pid in enumerate(ids) if pid in by_id}
    return found.copies


def order_by_class(shared_idx: Sequence[int], copies: Copies) -> list[int]:
    """``shared_idx`` with the parameters in no group copy first (in their order), then each usage class's
    parameters together (classes in the order of their task sets). The identity when ``copies`` is empty."""
    shared_idx = list(shared_idx)
    if not copies:
        return shared_idx
    plain = [i for i in shared_idx if i not in copies]
    grouped = sorted((i for i in shared_idx if i in copies), key=lambda i: copies[i])  # stable: order kept
    return plain + grouped


def usage_classes(shared_idx: Sequence[int], copies: Copies, params: Sequence[Tensor]) -> list[UsageClass]:
    """The usage classes of J's columns, for ``shared_idx`` ordered by :func:`order_by_class`."""
    if not copies:
        return []
    classes: list[UsageClass] = []
    offset = 0
    current: tuple[int, ...] | None = None
    start = first = 0
    for n, i in enumerate(shared_idx):
        tasks = copies.get(i)
        if tasks != current:
            if current is not None:
                classes.append(UsageClass(current, start, offset, first, n))
            current, start, first = tasks, offset, n
        offset += params[i].numel()
    if current is not None:
        classes.append(UsageClass(current, start, offset, first, len(shared_idx)))
    return classes


def solve(method: Any, matrix: Tensor, loss_values: Tensor) -> tuple[Tensor, Tensor | None]:
    """One usage class's solve: the method's ``(P,)`` update of an ``(m, P)`` task-gradient matrix, and its
    weights (``None`` when it has none)."""
    if method.kind == "representation":  # gradnorm on the shared parameters
        weights = method(loss_values, matrix).to(matrix.dtype)
        update = weights @ matrix
    else:
        update = method(matrix)
        weights = method.last_weights
    if not isinstance(update, Tensor) or update.shape != (matrix.shape[1],):
        got = tuple(update.shape) if isinstance(update, Tensor) else type(update).__name__
        raise ReconError(
            f"the method returned {got} for a ({matrix.shape[0]}, {matrix.shape[1]}) gradient matrix; "
            f"it must return a ({matrix.shape[1]},) update"
        )
    return update, weights


def _stackable(method: Any) -> bool:
    """A Gram method whose update is ``w @ J`` with ``w`` from the Gram matrix alone (its forward not replaced)."""
    return isinstance(method, GramMethod) and type(method).forward is GramMethod.forward


def _gram_updates(methods: Sequence[GramMethod], blocks: Sequence[Tensor]) -> list[Tensor]:
    """The updates of classes with the same number of tasks: their Gram matrices stacked, one host transfer."""
    eps = torch.finfo(blocks[0].dtype).eps
    grams = host_gram(torch.stack([b @ b.T for b in blocks]))
    weights = weights_like(np.stack([m._host_weights(G, eps) for m, G in zip(methods, grams, strict=True)]), blocks[0])
    updates = []
    for m, w, b in zip(methods, weights, blocks, strict=True):
        m._set_last_weights(w)
        updates.append(w @ b)
    return updates


def solve_classes(
    method: Any,
    J: Tensor,
    classes: Sequence[UsageClass],
    tasks: Sequence[str],
    loss_values: Tensor,
    global_weights: Tensor | None,
) -> list[Tensor]:
    """The update of each usage class (same order): ``method`` applied to the class's tasks alone, on its block
    of ``J``. Each class is solved by its own instance of the method (:meth:`recon.methods.Method.for_group`,
    with its own state); representation methods (gradnorm on the shared parameters) weight the class's rows
    with their global weights. Gram methods of classes with the same number of tasks share one host transfer."""
    updates: list[Tensor | None] = [None] * len(classes)
    stacked: dict[int, list[int]] = {}
    solvers, blocks = [], [c.rows(J) for c in classes]
    for n, c in enumerate(classes):
        block = blocks[n]
        if method.kind == "representation":
            w = global_weights if global_weights is not None else torch.ones(J.shape[0], dtype=J.dtype)
            updates[n] = w[list(c.tasks)].to(block.device, block.dtype) @ block
            solvers.append(None)
            continue
        solver = method.for_group([tasks[k] for k in c.tasks])
        solvers.append(solver)
        if _stackable(solver):
            stacked.setdefault(len(c.tasks), []).append(n)
        else:
            updates[n] = solve(solver, block, loss_values[list(c.tasks)])[0]
    for members in stacked.values():
        if len(members) == 1:  # nothing to stack with
            n = members[0]
            updates[n] = solve(solvers[n], blocks[n], loss_values[list(classes[n].tasks)])[0]
            continue
        solved = _gram_updates([solvers[n] for n in members], [blocks[n] for n in members])
        for n, u in zip(members, solved, strict=True):
            updates[n] = u
    return updates  # type: ignore[return-value]
