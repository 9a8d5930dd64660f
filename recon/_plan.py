"""Cost-aware surgery: choose the layers to branch (and their task groups) within parameter and FLOP budgets.

What a branch removes: splitting layer ``k`` into task groups separates every pair of tasks that land in
different groups; the S-conflict score it removes is the number of recorded steps with ``cos_ij^(k) < S``
summed over those pairs (Definition 3 of Shi et al., ICLR 2023, restricted to the separated pairs): the
layer's whole score for a per-task split, nothing for one group.

What it costs:

* parameters: a layer branched into ``g`` groups adds ``(g - 1)`` times its own parameters (exactly);
* forward FLOPs: not additive, since every node downstream of a branched layer runs once per class of tasks
  that took the same copies upstream. :class:`FlopModel` counts each node of the traced graph once with
  ``torch.utils.flop_counter.FlopCounterMode`` on example inputs, then the FLOPs of any plan are the sum over
  nodes of (its FLOPs) x (number of task classes it runs for in the split graph): the count
  ``FlopCounterMode`` gives on the split model itself (the tests check that).

With ``score="interference"`` a branch removes, instead, the interference of the pairs it separates: the mean
over recorded steps of ``-<g_i, g_j>`` on the layer summed over those pairs (to first order, what one joint
step's cross-task terms add to the summed task losses and per-task copies take away). It can be negative
(positive transfer a split would lose), and the planner never spends budget on an option that removes
``<= 0``.

See :func:`plan_split` for the search and what it guarantees.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
import torch.fx as fx
from torch import nn

from recon._confidence import unstable
from recon._errors import ReconError
from recon._graph import layer_names, node_layers, node_tasks, output_tasks, tie_groups, tied_parameters, to_digraph
from recon._profile import check_score
from recon._split import SplitPlan

__all__ = ["FlopModel", "LayerOption", "budget_curve", "candidate_options", "plan_split", "removed_score"]

GROUPS = ("none", "auto")
EXACT_PARTITIONS = 6  # up to this many tasks, every partition of a layer's tasks is a candidate (Bell(6) = 203)
EXACT_COMBINATIONS = 20_000  # with a FLOP budget, plans are enumerated exhaustively up to this many


@dataclasses.dataclass(frozen=True)
class LayerOption:
    """One way to branch one layer: its task groups, the score it removes (an S-conflict count, or interference),
    the parameters it adds."""

    layer: str
    groups: tuple[tuple[str, ...], ...]
    score: float
    params: int


# ------------------------------------------------------------------------------------------ what it removes
def removed_score(
    counts: np.ndarray | pd.DataFrame, groups: Sequence[Sequence[str]], tasks: Sequence[str]
) -> int | float:
    """The score of the task pairs that ``groups`` separates (``counts``: K x K per-pair S-conflict counts, an
    int; or per-pair interference, a float)."""
    c = np.asarray(counts)
    label = {t: g for g, group in enumerate(groups) for t in group}
    idx = [i for i, t in enumerate(tasks) if t in label]
    lab = np.array([label[tasks[i]] for i in idx])
    apart = np.triu(lab[:, None] != lab[None, :], k=1)
    total = c[np.ix_(idx, idx)][apart].sum()
    return int(total) if c.dtype.kind in "iub" else float(total)


def _partitions(items: list[str]) -> Iterator[list[list[str]]]:
    """Every set partition of ``items`` (first item's group first; order inside groups kept)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


def _grouped(users: list[str], counts: np.ndarray, tasks: Sequence[str]) -> list[list[list[str]]]:
    """One partition per number of groups, for more tasks than every partition can be tried on: agglomeration
    from singletons (merge the two groups whose pairs hold the fewest conflicts: the merge that gives up the
    least removed score), each level then refined by :func:`_local_search`. NumPy on the ``n x n`` counts:
    ``O(n^3)`` for all levels, milliseconds at 40 tasks."""
    pos = [list(tasks).index(t) for t in users]
    W = np.asarray(counts, dtype=np.float64)[np.ix_(pos, pos)]
    n = len(users)
    labels = np.arange(n)
    between = W.copy()  # conflicts between groups, indexed by the group's first member
    active = np.ones(n, dtype=bool)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    out = [[[t] for t in users]]
    for _ in range(n - 1):
        masked = np.where(upper & active[:, None] & active[None, :], between, np.inf)
        a, b = np.unravel_index(int(np.argmin(masked)), masked.shape)
        between[a, :] += between[b, :]
        between[:, a] += between[:, b]
        active[b] = False
        labels[labels == b] = a
        refined = _local_search(W, labels)
        out.append([[users[i] for i in np.flatnonzero(refined == g)] for g in np.unique(refined)])
    return out


def _local_search(W: np.ndarray, labels: np.ndarray, rounds: int = 500) -> np.ndarray:
    """Improve a partition while the conflicts kept within groups fall (the removed score rises): each round
    takes the best of moving one task to another group (none emptied, so the number of groups stays) and
    swapping two tasks of different groups."""
    labels = np.unique(labels, return_inverse=True)[1]
    n, g = len(labels), int(labels.max()) + 1
    A = W @ np.eye(g)[labels]  # A[i, c]: conflicts of task i with group c
    sizes = np.bincount(labels, minlength=g)
    rows = np.arange(n)
    for _ in range(rounds):
        own = A[rows, labels]
        target = A.argmin(axis=1)
        move = own - A[rows, target]
        move[sizes[labels] <= 1] = 0.0
        D = own[:, None] - A[:, labels]  # D[i, j]: what task i saves by joining j's group
        swap = np.where(labels[:, None] != labels[None, :], D + D.T + 2 * W, 0.0)
        i, (si, sj) = int(np.argmax(move)), np.unravel_index(int(np.argmax(swap)), swap.shape)
        if max(move[i], swap[si, sj]) <= 1e-9:
            break
        changes = [(i, target[i])] if move[i] >= swap[si, sj] else [(si, labels[sj]), (sj, labels[si])]
        for k, new in changes:
            old = labels[k]
            A[:, old] -= W[:, k]
            A[:, new] += W[:, k]
            sizes[old] -= 1
            sizes[new] += 1
            labels[k] = new
    return labels


def candidate_options(
    layer: str, users: list[str], counts: np.ndarray, tasks: Sequence[str], own_params: int, groups: str
) -> list[LayerOption]:
    """The ways to branch ``layer``: one per number of groups ``g >= 2``, the partition removing the most
    score (exact over all partitions up to :data:`EXACT_PARTITIONS` tasks, :func:`_grouped` above); with
    ``groups="none"`` only the per-task split. An option that removes ``<= 0`` is never a candidate."""
    order = {t: i for i, t in enumerate(tasks)}

    def option(part: Sequence[Sequence[str]]) -> LayerOption:
        norm = sorted((tuple(sorted(g, key=order.get)) for g in part), key=lambda g: order[g[0]])
        return LayerOption(layer, tuple(norm), removed_score(counts, norm, tasks), (len(norm) - 1) * own_params)

    if len(users) < 2:
        return []
    if groups == "none":
        return [o for o in [option([[t] for t in users])] if o.score > 0]
    parts = _partitions(users) if len(users) <= EXACT_PARTITIONS else _grouped(users, counts, tasks)
    best: dict[int, LayerOption] = {}
    for part in parts:
        if len(part) < 2:
            continue
        o = option(part)
        if len(part) not in best or o.score > best[len(part)].score:
            best[len(part)] = o
    # a partition with more groups that removes no more than one with fewer costs more for nothing
    kept, top = [], 0.0  # nothing that removes <= 0: it would spend budget for no (or negative) gain
    for g in sorted(best):
        if best[g].score > top:
            kept.append(best[g])
            top = best[g].score
    return kept


# --------------------------------------------------------------------------------------------- FLOPs
class FlopModel:
    """Forward FLOPs of the model split by any plan, from one count per node of the traced graph.

    Node FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` while an ``fx.Interpreter`` runs
    the graph on ``example_inputs``; a plan's FLOPs are ``sum(node FLOPs x task classes the node runs for)``.
    """

    def __init__(self, gm: fx.GraphModule, tasks: Sequence[str], candidates: Sequence[str], example_inputs: Any):
        self.tasks = list(tasks)
        digraph = to_digraph(gm)
        reach = node_tasks(gm, self.tasks, digraph)
        flops = _node_flops(gm, example_inputs)
        ties = tie_groups(gm)  # a tied weight is one layer: any of its names reads it
        names = {member: layer for layer in candidates for member in ties.get(layer, [layer])}
        self.nodes = [n for n in gm.graph.nodes if flops.get(n, 0) > 0]
        self.flops = np.array([flops[n] for n in self.nodes], dtype=np.float64)
        self.runs = [[i for i, t in enumerate(self.tasks) if t in reach[n]] for n in self.nodes]
        index = {n: i for i, n in enumerate(self.nodes)}
        self.downstream: dict[str, set[int]] = {layer: set() for layer in candidates}
        for n in gm.graph.nodes:
            for member in node_layers(gm, n, frozenset(names)):
                hit = {n} | nx.descendants(digraph, n)
                self.downstream[names[member]] |= {index[m] for m in hit if m in index}
        self.base = float(self.flops.sum())

    def count(self, groups: Mapping[str, Sequence[Sequence[str]]]) -> float:
        """Forward FLOPs of the model split with ``groups`` (``{layer: [[task, ...], ...]}``)."""
        pos = {t: i for i, t in enumerate(self.tasks)}
        total = 0.0
        labels = {}
        for layer, part in groups.items():
            lab = np.arange(len(self.tasks))  # a task outside the layer's groups keeps a class of its own
            for g, group in enumerate(part):
                for t in group:
                    lab[pos[t]] = len(self.tasks) + g
            labels[layer] = lab
        for i, f in enumerate(self.flops):
            layers = [layer for layer in groups if i in self.downstream[layer]]
            if not layers:
                total += f
                continue
            keys = {tuple(labels[layer][k] for layer in layers) for k in self.runs[i]}
            total += f * len(keys)
        return total


def _node_flops(gm: fx.GraphModule, example_inputs: Any) -> dict[fx.Node, float]:
    """FLOPs of every node of ``gm`` on ``example_inputs`` (a tensor, a tuple of the forward's arguments,
    ``(args, kwargs)`` or a dict of them), run in eval mode so that no BatchNorm statistics move."""
    from torch.utils.flop_counter import FlopCounterMode

    from recon._capture import _set_modes, example_args

    if not isinstance(example_inputs, (torch.Tensor, Mapping, tuple, list)):
        raise ReconError(
            f"example_inputs must be a tensor, a tuple of the forward's arguments or a dict of them, "
            f"got {type(example_inputs).__name__}"
        )
    args, kwargs = example_args(example_inputs)
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise ReconError(f"example_inputs do not fit the captured forward: {exc}") from exc
    bound.apply_defaults()
    counts: dict[fx.Node, float] = {}

    class Counter(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            with FlopCounterMode(display=False) as mode:
                out = super().run_node(n)
            counts[n] = float(mode.get_total_flops())
            return out

    saved = _set_modes(gm, False)
    try:
        with torch.no_grad():
            Counter(gm).run(*bound.arguments.values())
    finally:
        _set_modes(gm, saved)
    return counts


# ---------------------------------------------------------------------------------------------- search
@dataclasses.dataclass
class _Problem:
    options: list[list[LayerOption]]
    params_cap: float
    flops: FlopModel | None
    flops_cap: float

    def cost(self, choice: Sequence[LayerOption]) -> tuple[int, float | None]:
        params = sum(o.params for o in choice)
        flops = self.flops.count({o.layer: o.groups for o in choice}) if self.flops is not None else None
        return params, flops

    def fits(self, choice: Sequence[LayerOption]) -> bool:
        params, flops = self.cost(choice)
        return params <= self.params_cap and (flops is None or flops <= self.flops_cap * (1 + 1e-12))


def _pareto(options: list[list[LayerOption]], cap: float) -> list[tuple[int, int, tuple[LayerOption, ...]]]:
    """Every plan on the (parameters added, score removed) Pareto front within ``cap``: an exact dynamic
    programme for the multiple-choice knapsack (one option or none per layer), states pruned by dominance."""
    front: list[tuple[int, int, tuple[LayerOption, ...]]] = [(0, 0, ())]
    for opts in options:
        grown = list(front)
        for cost, score, choice in front:
            grown += [(cost + o.params, score + o.score, (*choice, o)) for o in opts if cost + o.params <= cap]
        grown.sort(key=lambda s: (s[0], -s[1]))
        front, best = [], -1
        for state in grown:
            if state[1] > best:
                front.append(state)
                best = state[1]
    return front


def _exhaustive(problem: _Problem) -> tuple[LayerOption, ...]:
    best: tuple[int, tuple[LayerOption, ...]] = (0, ())
    for combo in itertools.product(*[[None, *opts] for opts in problem.options]):
        choice = tuple(o for o in combo if o is not None)
        score = sum(o.score for o in choice)
        if score > best[0] and sum(o.params for o in choice) <= problem.params_cap and problem.fits(choice):
            best = (score, choice)
    return best[1]


def _greedy(problem: _Problem) -> tuple[LayerOption, ...]:
    """Add or upgrade one layer at a time: the feasible move with the most score removed per unit of budget
    used (FLOPs re-counted on the graph for every move), until no move fits."""
    chosen: dict[str, LayerOption] = {}
    base_params, base_flops = problem.cost(())
    while True:
        params, flops = problem.cost(tuple(chosen.values()))
        best, best_ratio = None, -math.inf
        for opts in problem.options:
            for o in opts:
                now = chosen.get(o.layer)
                if o.score <= (now.score if now else 0):
                    continue
                trial = {**chosen, o.layer: o}
                if not problem.fits(tuple(trial.values())):
                    continue
                p2, f2 = problem.cost(tuple(trial.values()))
                used = [(p2 - params) / max(problem.params_cap, 1)] if math.isfinite(problem.params_cap) else []
                if f2 is not None and flops is not None:
                    used.append((f2 - flops) / max(problem.flops_cap - base_flops, 1.0))
                ratio = (o.score - (now.score if now else 0)) / max(max(used, default=0.0), 1e-12)
                if ratio > best_ratio:
                    best, best_ratio = o, ratio
        if best is None:
            return tuple(chosen.values())
        chosen[best.layer] = best


def _search(problem: _Problem) -> tuple[LayerOption, ...]:
    if problem.flops is None:
        return max(_pareto(problem.options, problem.params_cap), key=lambda s: (s[1], -s[0]))[2]
    if math.prod(len(o) + 1 for o in problem.options) <= EXACT_COMBINATIONS:
        return _exhaustive(problem)
    ranked = sorted(_pareto(problem.options, problem.params_cap), key=lambda s: (-s[1], s[0]))
    front = next((s[2] for s in ranked if problem.fits(s[2])), ())
    greedy = _greedy(problem)
    return max((front, greedy), key=lambda c: sum(o.score for o in c))


# ------------------------------------------------------------------------------------------------- API
def _check_budget(value: Any, flag: str, floor: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReconError(f"{flag} must be a number, got {value!r}")
    if value < floor:
        what = "a fraction of the parameters, e.g. 0.1 for +10%" if floor == 0 else "a ratio >= 1, e.g. 1.3"
        raise ReconError(f"{flag} = {value} is out of range; give {what}")
    return float(value)


def pair_scores(profile: Any, layer: str, S: float, score: str) -> pd.DataFrame:
    """``K x K`` per-pair scores of ``layer``: S-conflict counts at ``S``, or mean interference ``-<g_i, g_j>``."""
    if score == "interference":
        return profile.interference_matrix(layer)
    return profile.conflict_matrix(layer, S, counts=True)


def _layer_options(
    profile: Any,
    captured: Any,
    groups: str,
    S: float,
    leaf_modules: Sequence[Any] = (),
    score: str = "s-conflict",
) -> tuple[fx.GraphModule, list[list[LayerOption]]]:
    """The captured graph and, per profiled shared layer, its candidate options (best partition per group count;
    none for a layer whose every option removes ``<= 0``). ``captured``: the command's capture
    (:func:`recon._capture.capture`), or a model, then traced with ``leaf_modules``. A tied weight's layers are
    one layer (:func:`recon._graph.tie_groups`): its parameters count once."""
    if isinstance(captured, nn.Module):
        captured = _capture_for_plan(captured, None, leaf_modules)
    gm = captured.gm
    tasks = list(output_tasks(gm, profile.tasks))
    usage = captured.layer_tasks(tasks, layer_names(gm))
    options = []
    for layer in profile.layers:
        if not layer or len(usage.get(layer, ())) < 2:
            continue
        users = [t for t in tasks if t in usage[layer]]
        counts = pair_scores(profile, layer, S, score).loc[tasks, tasks].to_numpy()
        own = sum(p.numel() for p in tied_parameters(gm, layer))
        options.append(candidate_options(layer, users, counts, tasks, own, groups))
    return gm, [o for o in options if o]


def _capture_for_plan(model: nn.Module, example_inputs: Any, leaves: Sequence[Any]) -> Any:
    """The command's one capture of ``model`` (with the example batch when there is one: torch.export where fx
    cannot trace), shared with :func:`recon.split` and the other stages."""
    from recon._capture import capture

    if not isinstance(model, nn.Module):
        raise ReconError(f"plan_split needs the model (an nn.Module), got {type(model).__name__}")
    return capture(model, example_inputs=example_inputs, leaf_modules=leaves)


def plan_split(
    profile: Any,
    model: nn.Module,
    *,
    top_k: int | None = None,
    budget_params: float | None = None,
    budget_flops: float | None = None,
    groups: str = "none",
    example_inputs: Any = None,
    S: float | None = None,
    leaf_modules: Sequence[Any] | None = None,
    init: str = "reinit",
    score: str = "s-conflict",
) -> SplitPlan:
    """The layers to branch (and, with ``groups="auto"``, each layer's task groups) that remove the most
    score within the budgets, as a :class:`~recon.SplitPlan` for :func:`recon.load_split`.

    * ``score="s-conflict"``: the paper's S-conflict count (Definition 3); ``"interference"``: the mean over
      steps of ``-<g_i, g_j>`` summed over the pairs a branch separates (:meth:`recon.ConflictProfile.scores`).
      No budget is spent on a layer or a task partition that removes ``<= 0``; with interference, ``top_k``
      takes the k highest among the layers with positive interference (fewer when fewer are positive).
    * ``top_k``: the paper's rule, the k layers with the highest scores, one copy per task (no budget).
    * ``budget_params=F``: at most ``F`` x the model's parameters added (0.1 = +10%), exactly.
    * ``budget_flops=R``: at most ``R`` x the model's forward FLOPs on ``example_inputs`` (needed then), as
      counted by :class:`FlopModel` (``torch.utils.flop_counter`` on the traced graph).
    * ``groups="none"``: per-task copies; ``"auto"``: per layer, for each number of groups, the partition of its
      tasks that removes the most score: exact (every partition) up to 6 tasks; above, agglomerative (merge
      the two groups whose pairs conflict least, repeatedly) refined by moving single tasks between groups,
      a heuristic (compared with every partition on small K in the tests) that takes milliseconds at 40.

    What the search guarantees, given the layers' options: with a parameter budget only, the optimum (an
    exact multiple-choice knapsack by a Pareto dynamic programme). With a FLOP budget, the optimum when there
    are at most 20,000 combinations of options (exhaustive enumeration, each plan's FLOPs counted); beyond
    that the better of (a) the highest-scoring plan of the parameter Pareto front whose counted FLOPs fit and
    (b) a greedy that adds the move with the most score per budget used, re-counting FLOPs each time: no
    optimality bound is claimed there. A budget that no branch fits is a :class:`~recon.ReconError`.
    """
    if groups not in GROUPS:
        raise ReconError(f"groups={groups!r} is not one of {list(GROUPS)}")
    score = check_score(score)
    if score == "interference" and not profile.has_gram:
        profile.interference()  # the one-line error: re-profile
    budget_params = _check_budget(budget_params, "budget_params (--budget-params)", 0.0)
    budget_flops = _check_budget(budget_flops, "budget_flops (--budget-flops)", 1.0)
    S = profile.S if S is None else S
    budgeted = budget_params is not None or budget_flops is not None
    if top_k is not None and budgeted:
        raise ReconError("top_k (--top-k) is the paper's unbudgeted rule; give it alone, or give budgets instead")
    leaves = list(leaf_modules if leaf_modules is not None else profile.meta.get("leaf_modules", []))
    if top_k is not None:
        plan = _top_k_plan(profile, top_k, S, init, score)
        if groups == "auto":
            return _with_best_groups(plan, profile, _capture_for_plan(model, example_inputs, leaves), model, score)
        return plan
    if not budgeted:
        raise ReconError("say how to choose: top_k=K, or budget_params=F and/or budget_flops=R")
    if budget_flops is not None and example_inputs is None:
        raise ReconError("budget_flops needs example_inputs (the recipe's first batch) to count FLOPs on")
    captured = _capture_for_plan(model, example_inputs, leaves)
    gm, options = _layer_options(profile, captured, groups, S, score=score)
    base = sum(p.numel() for p in model.parameters())
    flop_model = None
    if budget_flops is not None:
        flop_model = FlopModel(gm, profile.tasks, [o[0].layer for o in options], example_inputs)
    cap = math.inf if budget_params is None else budget_params * base
    problem = _Problem(options, cap, flop_model, budget_flops * flop_model.base if flop_model else math.inf)
    choice = sorted(_search(problem), key=lambda o: -o.score)
    if not choice:
        raise ReconError(_nothing_fits(options, base, budget_params, budget_flops, score))
    how = {"S": S, "score": score, "groups": groups, "init": init, "leaves": leaves, "captured": captured}
    return _budgeted_plan(profile, model, choice, problem, (budget_params, budget_flops), **how)


def _budgeted_plan(
    profile: Any, model: nn.Module, choice: list[LayerOption], problem: _Problem, budgets: tuple, *, S: float,
    score: str, groups: str, init: str, leaves: list[str], captured: Any,
) -> SplitPlan:  # fmt: skip
    """The :class:`SplitPlan` of a budgeted choice, with what it removes, adds and costs in ``extra``."""
    base = sum(p.numel() for p in model.parameters())
    params, flops = problem.cost(choice)
    extra = {"removed": {o.layer: o.score for o in choice}, "params_added": {o.layer: o.params for o in choice}}
    extra.update(params_before=base, params_after=base + params, groups_mode=groups, score=score)
    extra.update(chosen_confidence(profile, [o.layer for o in choice], S, score))
    if problem.flops is not None:
        extra.update(flops_before=problem.flops.base, flops_after=flops)
    return SplitPlan(
        tasks=list(profile.tasks),
        layers=[o.layer for o in choice],
        init=init,
        S=S,
        scores=layer_scores(profile, S, score),
        groups={o.layer: [list(g) for g in o.groups] for o in choice},
        budget_params=budgets[0],
        budget_flops=budgets[1],
        leaf_modules=leaves,
        concrete_args=captured.concrete_args,
        model_class=type(model).__name__,
        capture=captured.how,
        extra=extra,
    )


def layer_scores(profile: Any, S: float, score: str) -> dict[str, int | float]:
    """Every shared layer's score, highest first (plan.json's ``scores``)."""
    cast = int if score == "s-conflict" else float
    return {str(k): cast(v) for k, v in profile.scores(S, score=score)["score"].items()}


def ranked_candidates(scores: Mapping[str, float], score: str) -> tuple[list[str], list[str]]:
    """The branchable layers in score order (the root module's own parameters, ``""``, have no path of their
    own), and those of them worth branching: with interference only the positive ones."""
    ranked = [layer for layer in scores if layer]
    return ranked, [layer for layer in ranked if score == "s-conflict" or scores[layer] > 0]


def chosen_confidence(profile: Any, layers: Sequence[str], S: float, score: str) -> dict[str, Any]:
    """``p_top_k`` (bootstrap over recorded steps, :meth:`recon.ConflictProfile.confidence`) of the chosen
    layers (plan.json's ``p_top_k`` and ``confidence_k``), and a one-line ``unstable`` warning when one of them
    is below :data:`recon._confidence.STABLE`.

    k is the lowest rank (by ``score``) among the chosen layers: the number chosen for a top-k plan; for a
    budgeted plan, which may skip an expensive layer for cheaper ones below it, the band of the ranking the
    plan draws from, so a layer is "unstable" when resampled steps often push it out of that band."""
    if not layers or not profile.steps:
        return {}
    ranked = list(profile.scores(S, score=score).index)
    k = max(ranked.index(layer) for layer in layers) + 1
    p = profile.confidence(k, S, score=score)
    chosen = {layer: round(float(p[layer]), 4) for layer in layers}
    out: dict[str, Any] = {"p_top_k": chosen, "confidence_k": k}
    warning = unstable(chosen, k)
    if warning:
        out["unstable"] = warning
    return out


def _top_k_plan(profile: Any, top_k: int, S: float, init: str, score: str = "s-conflict") -> SplitPlan:
    """The paper's rule: the k highest-scoring shared layers, one copy per task (the root's own excluded; with
    interference, only layers whose interference is positive)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ReconError(f"top_k = {top_k!r} must be a positive integer; to train unsplit, do not split")
    scores = layer_scores(profile, S, score)
    ranked, worth = ranked_candidates(scores, score)
    if top_k > len(ranked):
        raise ReconError(f"top-k {top_k} exceeds the {len(ranked)} shared layers; choose k <= {len(ranked)}")
    layers = worth[:top_k]
    extra = {"score": score, **chosen_confidence(profile, layers, S, score)}
    return SplitPlan(tasks=list(profile.tasks), layers=layers, init=init, S=S, top_k=top_k, scores=scores, extra=extra)


def _with_best_groups(plan: SplitPlan, profile: Any, captured: Any, model: nn.Module, score: str) -> SplitPlan:
    """``top_k`` with ``groups="auto"``: the same k layers, each branched into its best partition, the one with
    the fewest groups among those removing the most score (tasks that never conflict on it share a copy)."""
    _, options = _layer_options(profile, captured, "auto", plan.S, score=score)
    best = {opts[-1].layer: opts[-1] for opts in options if opts}  # options grow in groups and strictly in score
    chosen = [best[layer] for layer in plan.layers if layer in best]
    base = sum(p.numel() for p in model.parameters())
    plan.groups = {o.layer: [list(g) for g in o.groups] for o in chosen}
    plan.extra.update(
        removed={o.layer: o.score for o in chosen},
        params_added={o.layer: o.params for o in chosen},
        params_before=base,
        params_after=base + sum(o.params for o in chosen),
        groups_mode="auto",
    )
    return plan


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode, so that counting FLOPs moves no BatchNorm statistics of the user's model."""
    import copy

    if not isinstance(model, nn.Module):
        raise ReconError(f"plan_split needs the model (an nn.Module), got {type(model).__name__}")
    return copy.deepcopy(model).eval()


def _nothing_fits(
    options: list[list[LayerOption]], base: int, budget_params: float | None, budget_flops: Any, score: str
) -> str:
    if not options and score == "interference":
        return (
            "no shared layer has positive interference: to first order no split lowers the summed losses "
            "(train unsplit, or choose with --score s-conflict)"
        )
    if not options:
        return "the profile has no shared layer with a conflict to remove (every S-conflict score is 0)"
    cheapest = min((o for opts in options for o in opts), key=lambda o: o.params)
    parts = []
    if budget_params is not None:
        parts.append(f"--budget-params {budget_params:g}")
    if budget_flops is not None:
        parts.append(f"--budget-flops {budget_flops:g}")
    return (
        f"no layer fits within {' and '.join(parts)}: the cheapest branch ({cheapest.layer}) adds "
        f"{cheapest.params:,} parameters ({cheapest.params / max(base, 1):+.1%}); raise the budget"
    )


def budget_curve(
    profile: Any,
    model: nn.Module,
    *,
    groups: str = "none",
    S: float | None = None,
    leaf_modules: Sequence[Any] | None = None,
    score: str = "s-conflict",
    example_inputs: Any = None,
) -> pd.DataFrame:
    """The most score (``score``: S-conflict or interference) a split removes for each parameter cost: the exact
    Pareto front (parameters added, score removed) over all plans, one row per point, with the plan's layers.
    Plot it with :func:`recon.plots.budget_curve_figure` to see where more capacity stops paying.
    ``example_inputs`` (a batch) lets recon capture models fx cannot trace with torch.export, as for
    :func:`plan_split`."""
    if groups not in GROUPS:
        raise ReconError(f"groups={groups!r} is not one of {list(GROUPS)}")
    S = profile.S if S is None else S
    leaves = list(leaf_modules if leaf_modules is not None else profile.meta.get("leaf_modules", []))
    captured = _capture_for_plan(model, example_inputs, leaves)
    _, options = _layer_options(profile, captured, groups, S, score=check_score(score))
    base = sum(p.numel() for p in model.parameters())
    rows = [
        {
            "params_added": cost,
            "params_fraction": cost / max(base, 1),
            "score_removed": score,
            "layers": ",".join(o.layer for o in choice),
        }
        for cost, score, choice in _pareto(options, math.inf)
    ]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- choosing, for a run folder
@dataclasses.dataclass
class Choice:
    """What ``recon split`` branches and how it was chosen: ``layers`` is what :func:`recon.split` takes (a
    list, or ``{layer: groups}``); ``plan`` the budgeted :class:`~recon.SplitPlan` when budgets chose it."""

    layers: list[str] | dict[str, Any]
    source: str
    S: float | None = None
    scores: dict[str, int | float] | None = None
    leaf_modules: list[str] = dataclasses.field(default_factory=list)
    plan: SplitPlan | None = None
    score: str | None = None
    #: plan.json's ``p_top_k`` and ``confidence_k`` (:func:`chosen_confidence`), when chosen from a profile
    confidence: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_budget(text: str | None, flag: str) -> float | None:
    """A budget given on the command line, as a number (one-line error otherwise)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise ReconError(f"{flag} must be a number, got {text!r}") from None


def choose_layers(
    profile_dir: Any,
    *,
    top_k: int | None = None,
    S: float | None = None,
    layers: str | None = None,
    scores: Any = None,
    budget_params: float | None = None,
    budget_flops: float | None = None,
    groups: str = "none",
    model: nn.Module | None = None,
    example_inputs: Any = None,
    score: str = "s-conflict",
) -> Choice:
    """The layers to branch from the flags of ``recon split``: ``layers`` (comma-separated names), ``scores``
    (an official scores.json) with ``top_k``, the stored profile's ``top_k``, or budgets (:func:`plan_split`
    on the profile, which needs ``model`` and, for a FLOP budget, ``example_inputs``); ``score`` ranks the
    stored profile's layers (S-conflict or interference)."""
    from recon._profile import ConflictProfile, read_scores_json

    check_score(score)
    if score != "s-conflict" and (layers is not None or scores is not None):
        raise ReconError("--score ranks the stored profile's layers; it has no effect with --layers or --scores")
    budgeted = budget_params is not None or budget_flops is not None or groups != "none"
    if layers is not None:
        if top_k is not None or scores is not None or budgeted:
            raise ReconError("pass either --layers or --top-k/--scores/--budget-*, not both")
        if S is not None:
            raise ReconError("--S rescores the stored profile for --top-k; it has no effect with --layers")
        names = [n for n in (s.strip() for s in layers.split(",")) if n]
        if not names:
            raise ReconError("--layers is empty; give comma-separated layer names, e.g. --layers layer4.1.conv2")
        return Choice(names, "layers")
    if top_k is None and not budgeted:
        raise ReconError(
            "say which layers to branch: --top-k K (the K layers with the highest S-conflict scores of the "
            "stored profile), --budget-params F / --budget-flops R, --scores scores.json --top-k K, or --layers a,b"
        )
    if scores is not None:
        if S is not None:
            raise ReconError("--S rescores the stored profile; a scores.json file holds fixed scores, drop --S")
        if budgeted:
            raise ReconError("budgets need the stored profile's cosines; drop --scores")
        ranked = read_scores_json(scores)
        return Choice(_top(list(ranked), top_k, f"{scores}"), str(scores), scores=dict(ranked))
    prof = ConflictProfile.load(profile_dir)
    S = prof.S if S is None else S
    if score == "interference" and not prof.has_gram:
        prof.interference()  # the one-line error: re-profile
    how = Choice([], str(profile_dir), S, layer_scores(prof, S, score), list(prof.meta.get("leaf_modules", [])))
    how.score = score
    if not budgeted:
        ranked, worth = ranked_candidates(how.scores, score)
        _top(ranked, top_k, f"the profile in {profile_dir}")
        how.layers = worth[:top_k]
        if not how.layers and top_k:
            raise ReconError(_nothing_fits([], 0, None, None, score))
        how.confidence = chosen_confidence(prof, how.layers, S, score)
        return how
    if top_k is not None and (budget_params is not None or budget_flops is not None):
        raise ReconError("--top-k is the paper's unbudgeted rule; give it alone, or give --budget-* instead")
    if top_k is not None:
        _top(ranked_candidates(how.scores, score)[0], top_k, f"the profile in {profile_dir}")  # same errors
    how.plan = plan_split(
        prof, model, top_k=top_k, budget_params=budget_params, budget_flops=budget_flops, groups=groups,
        example_inputs=example_inputs, S=S, leaf_modules=how.leaf_modules, score=score,
    )  # fmt: skip
    how.layers = how.plan.layer_spec()
    how.confidence = {k: how.plan.extra[k] for k in ("p_top_k", "confidence_k", "unstable") if k in how.plan.extra}
    return how


def _top(ranked: list[str], k: int | None, where: str) -> list[str]:
    # the root module's own parameters ("") cannot be branched: they have no path of their own
    candidates = [name for name in ranked if name]
    if k is not None and k < 1:
        raise ReconError(f"--top-k {k} branches nothing; give K >= 1, or train unsplit with --split none")
    if k is None or k > len(candidates):
        raise ReconError(
            f"--top-k {k} exceeds the {len(candidates)} shared layers in {where}; choose K <= {len(candidates)} "
            f"(shared layers: {', '.join(candidates)})"
        )
    return candidates[:k]
