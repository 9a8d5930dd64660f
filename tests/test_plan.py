"""Cost-aware surgery: conflict matrices, removed scores, plan_split within budgets (recon._plan)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import recon
from recon import plots
from recon._errors import ReconError
from recon._graph import trace
from recon._plan import FlopModel, _partitions, budget_curve, candidate_options, removed_score
from tests.conftest import ROOT
from tests.models import FAMILIES

TASKS4 = ("seg", "depth", "normal", "edge")
FEW = settings(max_examples=6, deadline=None, derandomize=True)


class Deep(nn.Module):
    """Four shared Linear layers (the second used twice), one head per task: small enough for brute force."""

    def __init__(self, tasks=TASKS4, d: int = 6) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.l4 = (nn.Linear(d, d) for _ in range(4))
        self.heads = nn.ModuleDict({t: nn.Linear(d, 2) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.l1(x))
        h = torch.relu(self.l2(h)) + self.l2(x)
        h = torch.relu(self.l4(torch.relu(self.l3(h))))
        return {t: head(h) for t, head in self.heads.items()}


def _data(make, n_steps: int = 8, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    return [(make(g, batch), {t: torch.randint(0, 2, (batch,), generator=g) for t in TASKS4}) for _ in range(n_steps)]


@pytest.fixture(scope="module")
def deep():
    torch.manual_seed(0)
    model = Deep()
    data = _data(lambda g, b: torch.randn(b, 6, generator=g))
    prof = recon.profile(model, data, {t: F.cross_entropy for t in TASKS4}, steps=8, S=0.0)
    return prof, model, data[0][0]


@pytest.fixture(scope="module")
def resnet():
    fam = dataclasses.replace(FAMILIES["resnet"], tasks=TASKS4)
    model = fam.model()
    data = _data(lambda g, b: torch.randn(b, 3, 8, 8, generator=g), n_steps=6)
    prof = recon.profile(fam.model(), data, {t: F.cross_entropy for t in TASKS4}, steps=6)
    return prof, model, data[0][0], fam


def counted_flops(net: nn.Module, x: torch.Tensor) -> float:
    net.eval()
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        net(x)
    return float(mode.get_total_flops())


def own(model: nn.Module, layer: str) -> int:
    return sum(p.numel() for p in model.get_submodule(layer).parameters(recurse=False))


# ---------------------------------------------------------------------------------- conflict matrix
def test_conflict_matrix_counts_add_up_to_the_layer_score(deep) -> None:
    prof, _, _ = deep
    scores = prof.scores()
    for layer in prof.layers:
        counts = prof.conflict_matrix(layer, counts=True)
        rates = prof.conflict_matrix(layer)
        assert list(counts.index) == list(counts.columns) == list(TASKS4)
        assert (counts.to_numpy() == counts.to_numpy().T).all() and (np.diag(counts.to_numpy()) == 0).all()
        assert np.triu(counts.to_numpy(), 1).sum() == scores.loc[layer, "score"]
        assert ((rates.to_numpy() >= 0) & (rates.to_numpy() <= 1)).all()
        # by hand from the cosines: pair (seg, normal)
        cos = prof.cosines
        hand = cos[(cos.layer == layer) & (cos.task_a == "seg") & (cos.task_b == "normal") & (cos.cos < 0)]
        assert counts.loc["seg", "normal"] == len(hand)
        assert removed_score(counts, [[t] for t in TASKS4], TASKS4) == scores.loc[layer, "score"]
        assert removed_score(counts, [list(TASKS4)], TASKS4) == 0
    with pytest.raises(ReconError, match="unknown layer"):
        prof.conflict_matrix("nope")


def test_partitions_are_all_set_partitions() -> None:
    parts = list(_partitions(list("abcd")))
    assert len(parts) == 15  # Bell(4)
    assert len({frozenset(frozenset(g) for g in p) for p in parts}) == 15


# ------------------------------------------------------------------------------------------ FLOPs
@st.composite
def random_groups(draw, layers: list[str]) -> dict[str, list[list[str]]]:
    chosen = draw(st.lists(st.sampled_from(layers), unique=True, min_size=0, max_size=4))
    out = {}
    for layer in chosen:
        labels = draw(st.lists(st.integers(0, 3), min_size=4, max_size=4))
        groups: dict[int, list[str]] = {}
        for t, label in zip(TASKS4, labels, strict=True):
            groups.setdefault(label, []).append(t)
        out[layer] = list(groups.values())
    return out


@pytest.mark.parametrize("which", ["deep", "resnet"])
def test_flop_model_matches_flop_counter_on_the_split_model(which: str, deep, resnet) -> None:
    prof, model, x = (deep if which == "deep" else resnet)[:3]
    layers = [n for n in prof.layers if n]
    flops = FlopModel(trace(model), TASKS4, layers, x)
    assert flops.base == counted_flops(model, x)

    @FEW
    @given(plan=random_groups(layers))
    def run(plan):
        net = recon.split(model, plan, init="copy")
        assert flops.count(plan) == counted_flops(net, x)

    run()


# ------------------------------------------------------------------------------------------ search
def brute_force(prof, model, x, cap_params: float, cap_flops: float | None, all_partitions: bool) -> int:
    """The best removed score over every plan: every layer with every partition (or its candidate options)."""
    layers = [n for n in prof.layers if n]
    counts = {n: prof.conflict_matrix(n, counts=True).to_numpy() for n in layers}
    if all_partitions:
        options = [[None, *[p for p in _partitions(list(TASKS4)) if len(p) > 1]] for _ in layers]
    else:
        opts = [candidate_options(n, list(TASKS4), counts[n], TASKS4, own(model, n), "auto") for n in layers]
        options = [[None, *[[list(g) for g in o.groups] for o in per]] for per in opts]
    flops = FlopModel(trace(model), TASKS4, layers, x) if cap_flops is not None else None
    best = 0
    for combo in itertools.product(*options):
        plan = {n: p for n, p in zip(layers, combo, strict=True) if p is not None}
        score = sum(removed_score(counts[n], p, TASKS4) for n, p in plan.items())
        if score <= best or sum((len(p) - 1) * own(model, n) for n, p in plan.items()) > cap_params:
            continue
        if flops is not None and flops.count(plan) > cap_flops * flops.base:
            continue
        best = score
    return best


@FEW
@given(budget=st.floats(0.0, 1.2), groups=st.sampled_from(["none", "auto"]))
def test_parameter_budget_plan_is_optimal_and_within_budget(deep, budget: float, groups: str) -> None:
    prof, model, x = deep
    base = sum(p.numel() for p in model.parameters())
    if groups == "auto":  # the parameter cost depends only on the number of groups: exact over all partitions
        best = brute_force(prof, model, x, budget * base, None, all_partitions=True)
    else:
        layers = [n for n in prof.layers if n]
        best = max(
            sum(prof.scores().loc[n, "score"] for n in chosen)
            for r in range(len(layers) + 1)
            for chosen in itertools.combinations(layers, r)
            if sum(3 * own(model, n) for n in chosen) <= budget * base
        )
    if best == 0:
        with pytest.raises(ReconError, match="no layer fits"):
            recon.plan_split(prof, model, budget_params=budget, groups=groups)
        return
    plan = recon.plan_split(prof, model, budget_params=budget, groups=groups)
    assert sum(plan.extra["removed"].values()) == best
    net = recon.load_split(Deep, plan)
    added = sum(p.numel() for p in net.parameters()) - base
    assert added == plan.extra["params_after"] - base <= budget * base
    assert plan.budget_params == budget and set(plan.groups) == set(plan.layers)


@FEW
@given(ratio=st.floats(1.0, 3.0), budget=st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_flop_budget_plan_is_optimal_over_the_options_and_within_budget(deep, ratio: float, budget) -> None:
    prof, model, x = deep
    base = sum(p.numel() for p in model.parameters())
    best = brute_force(prof, model, x, math.inf if budget is None else budget * base, ratio, all_partitions=False)
    kwargs = {"budget_params": budget, "budget_flops": ratio, "groups": "auto", "example_inputs": x}
    if best == 0:
        with pytest.raises(ReconError, match="no layer fits"):
            recon.plan_split(prof, model, **kwargs)
        return
    plan = recon.plan_split(prof, model, **kwargs)
    assert sum(plan.extra["removed"].values()) == best
    net = recon.load_split(Deep, plan)
    assert counted_flops(net, x) == plan.extra["flops_after"] <= ratio * counted_flops(model, x)


def test_budgets_hold_on_a_resnet_with_batchnorm(resnet) -> None:
    prof, model, x, fam = resnet
    base_flops = counted_flops(model, x)
    base = sum(p.numel() for p in model.parameters())
    for kwargs in ({"budget_params": 0.1}, {"budget_flops": 1.5, "budget_params": 0.3, "groups": "auto"}):
        plan = recon.plan_split(prof, model, example_inputs=x, **kwargs)
        torch.manual_seed(0)
        net = recon.load_split(fam.build(TASKS4), plan)
        assert sum(p.numel() for p in net.parameters()) - base <= kwargs["budget_params"] * base
        if "budget_flops" in kwargs:
            assert counted_flops(net, x) <= kwargs["budget_flops"] * base_flops


def test_top_k_keeps_the_paper_rule(deep) -> None:
    prof, model, _ = deep
    plan = recon.plan_split(prof, model, top_k=2)
    assert plan.layers == prof.top_layers(2) and plan.top_k == 2 and plan.groups is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_params": -0.1}, "out of range"),
        ({"budget_params": "ten"}, "must be a number"),
        ({"budget_params": float("nan")}, "must be a number"),
        ({"budget_flops": 0.9, "example_inputs": torch.zeros(1, 6)}, "out of range"),
        ({"budget_flops": 1.2}, "needs example_inputs"),
        ({"budget_params": 0.0}, "no layer fits"),
        ({"top_k": 1, "budget_params": 0.1}, "top_k"),
        ({}, "say how to choose"),
        ({"budget_params": 0.1, "groups": "all"}, "groups='all'"),
    ],
)
def test_bad_budgets_are_one_line_errors(deep, kwargs, match: str) -> None:
    prof, model, _ = deep
    with pytest.raises(ReconError, match=match) as info:
        recon.plan_split(prof, model, **kwargs)
    assert "\n" not in str(info.value)


def test_budget_curve_is_a_pareto_front_and_plots(deep) -> None:
    prof, model, _ = deep
    curve = budget_curve(prof, model)
    assert curve.iloc[0]["params_added"] == 0 and curve.iloc[0]["score_removed"] == 0
    assert curve["params_added"].is_monotonic_increasing and curve["score_removed"].is_monotonic_increasing
    assert curve.iloc[-1]["score_removed"] == prof.scores()["score"].sum()
    grouped = budget_curve(prof, model, groups="auto")
    assert grouped.iloc[-1]["score_removed"] == curve.iloc[-1]["score_removed"]
    fig = plots.budget_curve_figure({"per task": curve, "groups": grouped}, chosen=(10.0, 5.0))
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) >= 4
    net = recon.split(model, {"l3": [["seg", "depth"], ["normal", "edge"]]}, init="copy")
    usage = recon.layer_tasks(model)
    fig = plots.network_figure(
        usage, list(TASKS4), net.meta["recon"]["branches"], {}, groups=net.meta["recon"]["groups"]
    )
    assert any(t.get_text() == "normal" for t in fig.axes[0].texts)


def test_attributes_recipe_is_valid(monkeypatch) -> None:
    from recon._recipe import check_recipe, load_recipe

    monkeypatch.setenv("RECON_DIGITS_TRAIN", "128")
    monkeypatch.setenv("RECON_DIGITS_VAL", "64")
    recipe = load_recipe(ROOT / "examples" / "multidigits_attributes.py")
    assert len(recipe.tasks) == 10
    check_recipe(recipe)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import multidigits_attributes as attrs

    digits = torch.tensor([[3, 3], [7, 2], [4, 9]])
    labels = attrs.attributes(digits)
    by_task = dict(zip(attrs.TASKS, labels.T, strict=True))
    assert by_task["left_odd"].tolist() == [1, 1, 0] and by_task["right_prime"].tolist() == [1, 1, 0]
    assert by_task["equal"].tolist() == [1, 0, 0] and by_task["sum_large"].tolist() == [0, 0, 1]
    assert by_task["left_greater"].tolist() == [0, 1, 0] and by_task["both_odd"].tolist() == [1, 0, 0]


def test_top_k_with_groups_auto_gives_each_top_layer_its_best_partition(deep) -> None:
    """The top-k layers of the paper's rule, each split into the fewest groups that remove all its score
    (brute force over every partition of its tasks is the oracle)."""
    prof, model, _ = deep
    plan = recon.plan_split(prof, model, top_k=2, groups="auto")
    assert plan.layers == prof.top_layers(2) and plan.top_k == 2
    for layer in plan.layers:
        counts = prof.conflict_matrix(layer, counts=True).loc[list(TASKS4), list(TASKS4)].to_numpy()
        per_task = removed_score(counts, [[t] for t in TASKS4], TASKS4)
        fewest = min(len(p) for p in _partitions(list(TASKS4)) if removed_score(counts, p, TASKS4) == per_task)
        groups = plan.groups[layer]
        assert sorted(t for g in groups for t in g) == sorted(TASKS4)
        assert removed_score(counts, groups, TASKS4) == per_task == plan.extra["removed"][layer]
        assert len(groups) == max(fewest, 2)
    with pytest.raises(ReconError, match="unbudgeted rule"):
        recon.plan_split(prof, model, top_k=2, groups="auto", budget_params=0.5)
