"""Task-group branches: recon.split with {layer: [[task, ...], ...]} (recon._split)."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import recon
from recon._errors import ReconError
from recon._graph import layer_tasks, shared_layers
from recon._split import (
    SplitPlan,
    TaskBranches,
    TaskStatsBatchNorm,
    load_split,
    plan_of,
    shared_parameters,
    split,
    task_parameters,
)
from tests.models import FAMILIES, TASKS3, assert_gradients_match, task_losses, task_matrix

TASKS4 = ("seg", "depth", "normal", "edge")
FEW = settings(max_examples=4, deadline=None, derandomize=True)


def family(name: str):
    fam = FAMILIES[name]
    return fam if name == "partial" else dataclasses.replace(fam, tasks=TASKS4)


NAMES = sorted(FAMILIES)


@functools.cache
def usage_of(name: str) -> dict[str, frozenset[str]]:
    fam = family(name)
    return layer_tasks(fam.model(), fam.tasks_arg)


def users(name: str, layer: str) -> list[str]:
    fam = family(name)
    return [t for t in fam.tasks if t in usage_of(name)[layer]]


@st.composite
def group_plans(draw, name: str) -> dict[str, list[list[str]]]:
    """Random layers of a family, each with a random partition of the tasks that use it."""
    shared = [layer for layer in shared_layers(usage_of(name)) if layer]
    layers = draw(st.lists(st.sampled_from(shared), unique=True, min_size=1, max_size=4))
    plan = {}
    for layer in layers:
        tasks = users(name, layer)
        labels = draw(st.lists(st.integers(0, len(tasks) - 1), min_size=len(tasks), max_size=len(tasks)))
        groups: dict[int, list[str]] = {}
        for t, label in zip(tasks, labels, strict=True):
            groups.setdefault(label, []).append(t)
        plan[layer] = list(reversed(list(groups.values())))  # any order: split sorts them
    return plan


def outputs(model: nn.Module, tasks, x) -> dict[str, torch.Tensor]:
    out = model(x)
    return out if isinstance(out, dict) else dict(zip(tasks, out, strict=True))


def own_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def check_group_split(name: str, plan: dict[str, list[list[str]]]) -> None:
    """init='copy' keeps the function; summed over a layer's copies, gradients equal the original's."""
    fam = family(name)
    model = fam.model().double()
    net = split(model, plan, tasks=fam.tasks_arg, init="copy")
    x = fam.inputs(batch=4, dtype=torch.float64)
    model.eval()
    net.eval()
    with torch.no_grad():
        expected, got = outputs(model, fam.tasks, x), outputs(net, fam.tasks, x)
    for t in expected:
        torch.testing.assert_close(got[t], expected[t], atol=1e-6, rtol=1e-6)
    model.train()
    net.train()
    sum(task_losses(model(x), fam.tasks).values()).backward()
    sum(task_losses(net(x), fam.tasks).values()).backward()
    extra = 0
    for layer, groups in plan.items():
        container = net.get_submodule(layer)
        assert isinstance(container, TaskBranches)
        assert sorted(container.tasks) == sorted(min(g, key=fam.tasks.index) for g in groups)
        extra += (len(groups) - 1) * own_numel(model.get_submodule(layer))
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters()) + extra
    assert_gradients_match(model, net, plan, tol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_group_split_preserves_function_gradients_and_grows_by_groups(name: str) -> None:
    @FEW
    @given(plan=group_plans(name))
    def run(plan: dict[str, list[list[str]]]) -> None:
        check_group_split(name, plan)

    run()


@pytest.mark.parametrize("name", ["resnet", "torch_transformer", "inplace", "reuse"])
def test_all_singleton_groups_equal_the_list_split(name: str) -> None:
    fam = family(name)
    layers = [layer for layer in shared_layers(usage_of(name)) if layer][:3]
    singletons = {layer: [[t] for t in users(name, layer)] for layer in layers}
    a = split(fam.model(), layers, tasks=fam.tasks_arg, init="copy")
    b = split(fam.model(), singletons, tasks=fam.tasks_arg, init="copy")
    assert a.code == b.code
    assert list(a.state_dict()) == list(b.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert plan_of(a).groups == plan_of(b).groups == singletons


def test_downstream_nodes_run_once_per_class_of_tasks() -> None:
    fam = family("mlp")
    net = split(fam.model(), {"trunk.0": [["seg", "depth"], ["normal", "edge"]]}, init="copy")
    calls = [n for n in net.graph.nodes if n.op == "call_module" and str(n.target).startswith("trunk.2")]
    assert len(calls) == 2  # two classes {seg, depth}, {normal, edge}: not four
    assert net.get_submodule("trunk.0").route == {"seg": "seg", "depth": "seg", "normal": "normal", "edge": "normal"}
    # a second branched layer that cuts across: classes are the common refinement (3 here)
    net = split(
        fam.model(),
        {"trunk.0": [["seg", "depth"], ["normal", "edge"]], "trunk.2": [["seg"], ["depth", "normal", "edge"]]},
        init="copy",
    )
    heads = [n for n in net.graph.nodes if n.op == "call_module" and str(n.target).startswith("trunk.2")]
    assert sorted(str(n.target) for n in heads) == ["trunk.2.depth", "trunk.2.depth", "trunk.2.seg"]


def test_group_copies_are_shared_among_their_group() -> None:
    fam = family("mlp")
    net = split(fam.model(), {"trunk.0": [["seg", "depth"], ["normal"], ["edge"]]}, init="copy")
    group = set(map(id, net.get_submodule("trunk.0.seg").parameters()))
    alone = set(map(id, net.get_submodule("trunk.0.normal").parameters()))
    assert group <= set(map(id, shared_parameters(net)))
    assert not group & set(map(id, task_parameters(net, "seg")))
    assert alone <= set(map(id, task_parameters(net, "normal")))
    assert not alone & set(map(id, shared_parameters(net)))


@pytest.mark.parametrize("method", ["mean", "pcgrad", "upgrad"])
def test_backward_gives_a_group_copy_its_group_s_aggregate(method: str) -> None:
    """Against per-task autograd: the parameters in no copy get the method over all tasks on their columns; the
    group copy gets the method applied to its group's tasks alone (issue 18: group copies trained as groups)."""
    pytest.importorskip("torchjd") if method == "upgrad" else None
    fam = family("mlp")
    torch.manual_seed(0)
    net = split(fam.model().double(), {"trunk.2": [["seg", "depth", "edge"], ["normal"]]}, init="reinit")
    x = fam.inputs(batch=8, dtype=torch.float64)
    losses = task_losses(net(x), TASKS4)
    shared = shared_parameters(net)
    copy_params = list(net.get_submodule("trunk.2.seg").parameters())
    assert {id(p) for p in copy_params} <= {id(p) for p in shared}
    plain = [p for p in shared if not any(p is c for c in copy_params)]

    torch.manual_seed(1)
    expected_plain = recon.methods.get(method)(task_matrix(losses, plain, TASKS4))
    expected_copy = recon.methods.get(method)(task_matrix(losses, copy_params, ("seg", "depth", "edge")))
    torch.manual_seed(1)
    recon.backward(losses, net, method, retain_graph=True)
    for params, expected in ((plain, expected_plain), (copy_params, expected_copy)):
        got = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(got, expected.to(got.dtype), atol=1e-8, rtol=1e-6)
    if method == "mean":  # the group copy gets its group's mean, by hand
        group_loss = sum(losses[t] for t in ("seg", "depth", "edge")) / 3
        for p, g in zip(copy_params, torch.autograd.grad(group_loss, copy_params, retain_graph=True), strict=True):
            torch.testing.assert_close(p.grad, g)
    normal = net.get_submodule("trunk.2.normal")
    for p in normal.parameters():  # a one-task group's copy: that task's own gradient
        (g,) = torch.autograd.grad(losses["normal"], [p], retain_graph=True)
        torch.testing.assert_close(p.grad, g)


def test_batchnorm_statistics_per_task_class() -> None:
    """A shared BatchNorm downstream of a group split keeps one set of statistics per class of tasks; with
    init='copy' each set moves exactly as the unsplit model's statistics do."""
    fam = family("resnet")
    torch.manual_seed(0)
    model = fam.model().double()
    plan = {"layer1.0.conv1": [["seg", "normal"], ["depth", "edge"]]}
    net = split(model, plan, init="copy")
    bn = net.get_submodule("layer2.0.bn1")
    assert isinstance(bn, TaskStatsBatchNorm)
    assert bn.tasks == ("seg", "depth")  # classes named after their first task
    x = fam.inputs(batch=4, dtype=torch.float64)
    model.train()
    net.train()
    model(x)
    net(x)
    reference = model.get_submodule("layer2.0.bn1")
    for rep in bn.tasks:
        torch.testing.assert_close(bn.running_stats(rep)["running_mean"], reference.running_mean)
    # the same statistics after a plan round trip
    again = load_split(lambda: fam.model().double(), plan_of(net))
    again.load_state_dict(net.state_dict())
    assert again.get_submodule("layer2.0.bn1").tasks == bn.tasks


def test_plan_json_round_trip_and_old_plans(tmp_path) -> None:
    fam = family("mlp")
    plan = {"trunk.0": [["edge", "seg"], ["depth", "normal"]], "trunk.2": None}
    net = split(fam.model(), plan, init="copy")
    p = plan_of(net)
    assert p.groups == {"trunk.0": [["seg", "edge"], ["depth", "normal"]], "trunk.2": [[t] for t in TASKS4]}
    path = p.save(tmp_path / "plan.json")
    again = load_split(fam.model, path)
    assert list(again.state_dict()) == list(net.state_dict())
    old = json.loads(path.read_text())
    del old["groups"]
    legacy = load_split(fam.model, SplitPlan.from_dict(old))
    assert sorted(legacy.get_submodule("trunk.0").tasks) == sorted(TASKS4)


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"trunk.0": [["seg", "depth"], ["normal"]]}, "not a partition"),
        ({"trunk.0": [["seg", "depth"], ["normal", "edge", "seg"]]}, "not a partition"),
        ({"trunk.0": [["seg", "nope"], ["depth", "normal", "edge"]]}, "unknown task"),
        ({"trunk.9": [["seg"], ["depth", "normal", "edge"]]}, "unknown layer"),
        ({"trunk.0": [[], ["seg", "depth", "normal", "edge"]]}, "non-empty task lists"),
        ({"trunk.0": "seg"}, "non-empty task lists"),
    ],
)
def test_bad_groups_are_one_line_errors(plan, match: str) -> None:
    with pytest.raises(ReconError, match=match) as info:
        split(family("mlp").model(), plan)
    assert "\n" not in str(info.value)


def test_three_task_partial_model_groups_only_among_users() -> None:
    fam = FAMILIES["partial"]
    layer = next(lay for lay in shared_layers(usage_of("partial")) if lay and len(usage_of("partial")[lay]) == 2)
    tasks = users("partial", layer)
    with pytest.raises(ReconError, match="not a partition"):
        split(fam.model(), {layer: [list(TASKS3)]})
    net = split(fam.model(), {layer: [tasks]}, init="copy")  # one group: a no-op copy
    assert net.get_submodule(layer).tasks == (tasks[0],)


def test_a_group_split_model_is_not_split_again() -> None:
    fam = family("mlp")
    net = split(fam.model(), {"trunk.0": [["seg", "depth"], ["normal", "edge"]]}, init="copy")
    with pytest.raises(ReconError, match="split the original model once"):
        split(net, ["trunk.2"])
    per_task = split(fam.model(), ["trunk.0"], init="copy")  # a per-task split can be split again, with groups
    again = split(per_task, {"trunk.2": [["seg", "depth"], ["normal", "edge"]]}, init="copy")
    x = fam.inputs(batch=3)
    model = fam.model()
    with torch.no_grad():
        expected, got = model(x), again(x)
    for t in TASKS4:
        torch.testing.assert_close(got[t], expected[t])
