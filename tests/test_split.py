"""The torch.fx rewriter: recon.split, load_split, shared/task parameters (recon._split)."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from recon._errors import ReconError
from recon._graph import TraceError, layer_tasks, shared_layers
from recon._split import (
    SplitPlan,
    TaskStatsBatchNorm,
    load_split,
    plan_of,
    shared_parameters,
    split,
    task_parameters,
    task_scope,
)
from tests.models import FAMILIES, TASKS, Gated, WithNoReset, assert_gradients_match, task_losses

NAMES = sorted(FAMILIES)
FEW = settings(max_examples=5, deadline=None, derandomize=True)


@functools.cache
def usage_of(name: str) -> dict[str, frozenset[str]]:
    fam = FAMILIES[name]
    return layer_tasks(fam.model(), fam.tasks_arg)


def branchable(name: str) -> list[str]:
    return [layer for layer in shared_layers(usage_of(name)) if layer]  # the root's own params cannot move


def subsets(name: str) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(branchable(name)), unique=True, max_size=6)


def own_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def outputs(model: nn.Module, fam, x) -> dict[str, torch.Tensor]:
    out = model(x)
    return out if isinstance(out, dict) else dict(zip(fam.tasks, out, strict=True))


def check_same_function(name: str, layers: list[str]) -> None:
    fam = FAMILIES[name]
    model = fam.model().double()
    net = split(model, layers, tasks=fam.tasks_arg, init="copy")
    x = fam.inputs(batch=4, dtype=torch.float64)

    model.eval()
    net.eval()
    with torch.no_grad():
        expected, got = outputs(model, fam, x), outputs(net, fam, x)
    assert list(got) == list(expected)
    for t in expected:
        torch.testing.assert_close(got[t], expected[t], atol=1e-5, rtol=1e-5)

    # one backward of the summed losses, in training mode (batch statistics, in-place ops)
    model.train()
    net.train()
    sum(task_losses(model(x), fam.tasks).values()).backward()
    sum(task_losses(net(x), fam.tasks).values()).backward()
    assert_gradients_match(model, net, set(layers), tol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_copy_preserves_function_and_gradients(name: str) -> None:
    @FEW
    @given(layers=subsets(name))
    def run(layers: list[str]) -> None:
        check_same_function(name, layers)

    run()


@pytest.mark.parametrize("name", NAMES)
def test_every_shared_layer_at_once(name: str) -> None:
    check_same_function(name, branchable(name))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_grows_by_the_copies(name: str) -> None:
    fam = FAMILIES[name]
    usage = usage_of(name)

    @FEW
    @given(layers=subsets(name))
    def run(layers: list[str]) -> None:
        model = fam.model()
        net = split(model, layers, tasks=fam.tasks_arg, init="reinit")
        grown = sum((len(usage[layer]) - 1) * own_numel(model.get_submodule(layer)) for layer in layers)
        assert numel(net) == numel(model) + grown
        for layer in layers:
            container = net.get_submodule(layer)
            assert set(container.tasks) == usage[layer]
            for t in container.tasks:
                assert own_numel(net.get_submodule(f"{layer}.{t}")) == own_numel(model.get_submodule(layer))

    run()


@pytest.mark.parametrize("name", NAMES)
def test_splitting_nothing_gives_the_same_model(name: str) -> None:
    fam = FAMILIES[name]
    model = fam.model().eval()
    net = split(model, [], tasks=fam.tasks_arg)
    assert list(net.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
    x = fam.inputs()
    with torch.no_grad():
        expected, got = outputs(model, fam, x), outputs(net, fam, x)
    for t in expected:
        assert torch.equal(got[t], expected[t])


def test_names_paths_and_state_dict_keys() -> None:
    model = FAMILIES["resnet"].model()
    net = split(model, ["layer1.0.bn1", "layer2.0.conv1"])
    assert isinstance(net, torch.fx.GraphModule)
    assert isinstance(net.get_submodule("layer1.0.bn1.seg"), nn.BatchNorm2d)
    keys = net.state_dict().keys()
    assert {"layer1.0.bn1.seg.weight", "layer1.0.bn1.depth.running_mean", "layer2.0.conv1.depth.weight"} <= keys
    assert "layer1.0.bn1.weight" not in keys
    assert type(net.get_submodule("layer1.0")).__name__ == "BasicBlock"  # the module tree is the model's
    assert "self.layer1" in net.code and "_seg" in net.code
    compile(net.code, "<split>", "exec")
    assert net.meta["recon"]["tasks"] == list(TASKS)
    assert net.meta["recon"]["layers"] == ["layer1.0.bn1", "layer2.0.conv1"]


def test_same_call_signature_and_output_structure() -> None:
    fam = FAMILIES["unet"]
    model = fam.model()
    net = split(model, ["dec1.0"], tasks=list(TASKS), init="copy")
    x = fam.inputs()
    out = net(x=x)
    assert isinstance(out, tuple) and len(out) == 2
    assert [o.shape for o in out] == [o.shape for o in model(x)]


def test_model_is_not_changed() -> None:
    model = FAMILIES["resnet"].model()
    before = copy.deepcopy(model.state_dict())
    attrs = set(vars(model))
    net = split(model, ["conv1", "layer1.0.bn1"])
    assert set(vars(model)) == attrs
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    for p in net.parameters():
        assert all(p is not q for q in model.parameters())


def test_reinit_gives_fresh_copies() -> None:
    model = FAMILIES["mlp"].model()
    net = split(model, ["trunk.0"], init="reinit")
    original = model.get_submodule("trunk.0").weight
    seg, depth = net.get_submodule("trunk.0.seg").weight, net.get_submodule("trunk.0.depth").weight
    assert not torch.equal(seg, original) and not torch.equal(depth, original) and not torch.equal(seg, depth)
    copied = split(model, ["trunk.0"], init="copy")
    assert torch.equal(copied.get_submodule("trunk.0.seg").weight, original)


def test_reinit_needs_reset_parameters() -> None:
    model = WithNoReset()
    with pytest.raises(ReconError, match=r"'scaler' \(NoReset\) has no reset_parameters\(\).*init='copy'"):
        split(model, ["scaler"])
    net = split(model, ["scaler"], init="copy")
    x = torch.randn(2, 8)
    torch.testing.assert_close(net(x), model(x))


def test_batchnorm_copies_keep_their_own_running_stats() -> None:
    fam = FAMILIES["resnet"]
    model = fam.model().train()
    net = split(model, ["bn1"], init="copy").train()
    x = fam.inputs(batch=4)
    model(x)
    net(x)
    seg, depth = net.get_submodule("bn1.seg"), net.get_submodule("bn1.depth")
    assert seg.running_mean is not depth.running_mean
    for copy_ in (seg, depth):
        torch.testing.assert_close(copy_.running_mean, model.bn1.running_mean)
        torch.testing.assert_close(copy_.running_var, model.bn1.running_var)
        assert copy_.num_batches_tracked.item() == 1


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        (["nope"], r"unknown layer 'nope'"),
        (["heads.seg"], r"'heads.seg' is used by only task 'seg', so it is not shared"),
        (["trunk.0", "trunk.0"], r"'trunk.0' is listed twice"),
        (["trunk.1"], r"unknown layer 'trunk.1'"),  # a ReLU owns no parameters
    ],
)
def test_bad_layer_names_list_the_valid_ones(layers: list[str], match: str) -> None:
    with pytest.raises(ReconError, match=match) as info:
        split(FAMILIES["mlp"].model(), layers)
    assert "the shared layers of MLP are: ['trunk.0', 'trunk.2']" in str(info.value)


def test_other_bad_input() -> None:
    with pytest.raises(ReconError, match="init='fresh' is not one of"):
        split(FAMILIES["mlp"].model(), ["trunk.0"], init="fresh")
    with pytest.raises(ReconError, match="root"):
        split(FAMILIES["transformer"].model(), [""])
    with pytest.raises(ReconError, match=r"pass tasks=\[\.\.\.\]"):
        split(FAMILIES["unet"].model(), ["enc1.0"])

    class Clash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(2, 2)
            self.a = nn.Linear(2, 1)
            self.b = nn.Linear(2, 1)

        def forward(self, x):
            h = self.trunk(x)
            return {"train": self.a(h), "b": self.b(h)}

    with pytest.raises(ReconError, match="'train' clashes with an nn.Module attribute"):
        split(Clash(), ["trunk"])


def test_trace_failure_then_leaf() -> None:
    model = Gated()
    with pytest.raises(TraceError, match=r"'gate'.*leaf_modules=\['gate'\].*concrete_args"):
        split(model, ["inp"])
    # as a leaf it traces, and the layer inside the leaf can still be branched (task scope)
    net = split(model, ["inp", "gate.lin"], leaf_modules=["gate"], init="copy")
    x = torch.randn(3, 8)
    expected, got = model(x), net(x)
    for t in TASKS:
        torch.testing.assert_close(got[t], expected[t])
    assert net.meta["recon"]["leaf_modules"] == ["gate"]
    assert isinstance(net.get_submodule("gate.lin.seg"), nn.Linear)


def test_shared_and_task_parameters() -> None:
    model = FAMILIES["mlp"].model()
    net = split(model, ["trunk.2"], init="copy")
    shared = shared_parameters(net)
    assert [p.shape for p in shared] == [p.shape for p in model.trunk[0].parameters()]
    seg = task_parameters(net, "seg")
    expected = [*net.get_submodule("trunk.2.seg").parameters(), *net.get_submodule("heads.seg").parameters()]
    assert {id(p) for p in seg} == {id(p) for p in expected}
    every = {id(p) for p in net.parameters()}
    assert {id(p) for p in shared} | {id(p) for t in TASKS for p in task_parameters(net, t)} == every
    with pytest.raises(ReconError, match="unknown task 'x'"):
        task_parameters(net, "x")

    # an unsplit model with dict outputs works too; tuple outputs need tasks
    assert len(shared_parameters(model)) == 4
    assert len(task_parameters(model, "depth")) == 2
    unet = FAMILIES["unet"].model()
    with pytest.raises(ReconError, match="recon.split"):
        shared_parameters(unet)
    assert len(shared_parameters(unet, tasks=list(TASKS))) == numel_params(unet) - 4
    tuple_net = split(unet, ["dec1.0"], tasks=list(TASKS))
    assert len(task_parameters(tuple_net, "seg")) == 4  # dec1.0.seg weight+bias, head weight+bias


def numel_params(model: nn.Module) -> int:
    return len(list(model.parameters()))


@pytest.mark.parametrize("name", ["resnet", "unet", "torch_transformer", "inplace"])
def test_load_split_rebuilds_from_the_plan(name: str, tmp_path) -> None:
    fam = FAMILIES[name]
    layers = branchable(name)[:3]
    net = split(fam.model(seed=1), layers, tasks=fam.tasks_arg, init="reinit")
    net.train()
    net(fam.inputs(batch=4))  # move the BatchNorm statistics
    net.eval()
    plan = plan_of(net)
    plan.S, plan.top_k = -0.1, 3
    plan.save(tmp_path / "plan.json")
    torch.save(net.state_dict(), tmp_path / "weights.pt")

    rebuilt = load_split(lambda: fam.model(seed=2), tmp_path / "plan.json")
    rebuilt.load_state_dict(torch.load(tmp_path / "weights.pt"))
    rebuilt.eval()
    x = fam.inputs(seed=3)
    with torch.no_grad():
        expected, got = outputs(net, fam, x), outputs(rebuilt, fam, x)
    for t in expected:
        torch.testing.assert_close(got[t], expected[t])
    assert list(rebuilt.state_dict()) == list(net.state_dict())


def test_split_plan_json() -> None:
    plan = SplitPlan(tasks=["a", "b"], layers=["x", "y"], init="copy", S=-0.2, top_k=2, scores={"x": 5, "y": 3})
    data = json.loads(plan.to_json())
    assert data["tasks"] == ["a", "b"] and data["layers"] == ["x", "y"] and data["S"] == -0.2
    data["note"] = "kept"
    again = SplitPlan.from_json(json.dumps(data))
    assert again.scores == {"x": 5, "y": 3} and again.extra == {"note": "kept"}
    assert json.loads(again.to_json())["note"] == "kept"
    assert SplitPlan.from_json(data) == again
    with pytest.raises(ReconError, match="not valid JSON"):
        SplitPlan.from_json("{nope")
    with pytest.raises(ReconError, match="has no"):
        SplitPlan.from_json('{"tasks": ["a"]}')
    with pytest.raises(ReconError, match="init="):
        SplitPlan.from_json('{"tasks": ["a"], "layers": [], "init": "x"}')


def test_deepcopy_and_modes() -> None:
    fam = FAMILIES["resnet"]
    model = fam.model().eval()
    net = split(model, ["layer1.1.conv2"], init="copy")
    assert not net.training
    clone = copy.deepcopy(net)
    assert list(clone.state_dict()) == list(net.state_dict())
    assert clone.meta["recon"] == net.meta["recon"]
    x = fam.inputs()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), net(x))


def test_split_a_split_model_again() -> None:
    fam = FAMILIES["mlp"]
    model = fam.model()
    net = split(split(model, ["trunk.2"], init="copy"), ["trunk.0"], init="copy")
    assert net.meta["recon"]["layers"] == ["trunk.2", "trunk.0"]
    assert numel(net) == numel(model) + 16 * 8 + 16 + 16 * 16 + 16
    x = fam.inputs()
    expected, got = model(x), net(x)
    for t in TASKS:
        torch.testing.assert_close(got[t], expected[t])


def test_in_place_write_into_shared_tensor_is_per_task() -> None:
    fam = FAMILIES["inplace"]
    net = split(fam.model(), ["fc"], init="reinit")
    assert ".clone()" in net.code  # each task writes into its own copy of the shared tensor
    x = fam.inputs()
    # task seg's output must not depend on task depth's branch
    before = net(x)["seg"].detach()
    with torch.no_grad():
        net.get_submodule("fc.depth").weight.add_(1.0)
    torch.testing.assert_close(net(x)["seg"], before)


# ------------------------------------------------------------------- shared BatchNorms downstream of a branch
def batchnorm_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize("init", ["reinit", "copy"])
def test_downstream_batchnorms_keep_each_task_s_running_stats(init: str) -> None:
    fam = FAMILIES["resnet"]
    model = fam.model().train()
    model(fam.inputs(batch=8, seed=7))  # statistics that are not the defaults: copied or reset
    net = split(model, ["conv1"], init=init)  # the stem: every BatchNorm is downstream of it
    with torch.no_grad():  # make the tasks' paths clearly differ (copies start equal)
        net.get_submodule("conv1.depth").weight.mul_(-2.0)

    # oracle: the model restricted to one task's path (that task's conv1, every BatchNorm run once per forward)
    oracles = {}
    for t in TASKS:
        single = copy.deepcopy(model)
        single.conv1 = copy.deepcopy(net.get_submodule(f"conv1.{t}"))
        if init == "reinit":
            for m in single.modules():
                if isinstance(m, _BatchNorm):
                    m.reset_running_stats()
        oracles[t] = single.train()
    net.train()
    for seed in range(3):
        x = fam.inputs(batch=6, seed=seed)
        net(x)
        for single in oracles.values():
            single(x)

    net.eval()
    x = fam.inputs(batch=5, seed=9)
    with torch.no_grad():
        got = net(x)
        for t in TASKS:  # each task normalised with its own statistics
            torch.testing.assert_close(got[t], oracles[t].eval()(x)[t])

    names = batchnorm_names(model)
    assert len(names) == 10
    assert net.meta["recon"]["task_stats"] == {name: list(TASKS) for name in names}
    for name in names:
        bn = net.get_submodule(name)
        assert isinstance(bn, TaskStatsBatchNorm) and isinstance(bn, nn.BatchNorm2d) and bn.tasks == TASKS
        for t in TASKS:
            ref = oracles[t].get_submodule(name)
            for key, value in bn.running_stats(t).items():
                torch.testing.assert_close(value, getattr(ref, key), msg=f"{name}.{key} of task {t}")
    seg, depth = net.bn1.running_stats("seg"), net.bn1.running_stats("depth")
    assert (seg["running_var"] - depth["running_var"]).abs().max() > 0.05  # the tasks' statistics differ
    assert seg["num_batches_tracked"].item() == (3 if init == "reinit" else 4)  # reset, or copied (1) and moved


def test_per_task_statistics_only_where_batchnorms_run_per_task() -> None:
    fam = FAMILIES["resnet"]
    model = fam.model()
    net = split(model, ["layer2.1.conv2"])
    keys = net.state_dict().keys()
    # upstream of the branch: untouched, run once
    for name in ("bn1", "layer1.0.bn1", "layer2.0.downsample.1", "layer2.1.bn1"):
        assert type(net.get_submodule(name)) is nn.BatchNorm2d
    assert {"bn1.running_mean", "layer1.1.bn2.num_batches_tracked", "layer2.1.bn1.running_var"} <= keys
    # downstream: shared affine parameters, statistics per task
    bn = net.get_submodule("layer2.1.bn2")
    assert isinstance(bn, TaskStatsBatchNorm) and isinstance(bn, nn.BatchNorm2d)
    assert net.meta["recon"]["task_stats"] == {"layer2.1.bn2": list(TASKS)}
    assert {"layer2.1.bn2.weight", "layer2.1.bn2.bias"} <= keys
    assert {
        f"layer2.1.bn2.{k}_{t}" for k in ("running_mean", "running_var", "num_batches_tracked") for t in TASKS
    } <= keys
    assert "layer2.1.bn2.running_mean" not in keys and bn.running_mean is None
    assert numel(net) == numel(model) + own_numel(model.get_submodule("layer2.1.conv2"))
    shared = {id(p) for p in shared_parameters(net)}
    assert id(bn.weight) in shared and id(bn.bias) in shared
    assert {id(p) for p in task_parameters(net, "seg")} == {
        *map(id, net.get_submodule("layer2.1.conv2.seg").parameters()),
        *map(id, net.get_submodule("heads.seg").parameters()),
    }
    assert "call_for_task(layer2_1_bn2, 'seg'" in net.code
    compile(net.code, "<split>", "exec")

    net.train()
    net(fam.inputs())
    assert net.get_submodule("layer1.0.bn1").num_batches_tracked.item() == 1  # run once, not once per task
    assert all(bn.running_stats(t)["num_batches_tracked"].item() == 1 for t in TASKS)
    with pytest.raises(RuntimeError, match=r"one set of running statistics per task.*task_scope"):
        bn(torch.randn(2, 16, 2, 2))
    with task_scope("depth"):
        bn(torch.randn(2, 16, 2, 2))
    assert bn.running_stats("depth")["num_batches_tracked"].item() == 2


def test_batchnorm_called_before_and_after_a_branch_keeps_shared_stats_too() -> None:
    fam = FAMILIES["bnshare"]
    model = fam.model()
    net = split(model, ["fc"], init="copy")
    # norm runs once for all tasks before fc, and once per task after it: both kinds of statistics
    assert net.meta["recon"]["task_stats"] == {"norm": list(TASKS), "bn": list(TASKS)}
    keys = list(net.state_dict())
    assert keys[keys.index("norm.weight") :][:9] == [
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
        "norm.running_mean_seg",
        "norm.running_var_seg",
        "norm.num_batches_tracked_seg",
        "norm.running_mean_depth",
    ]
    assert "bn.running_mean" not in keys and "bn.running_mean_depth" in keys
    net.train()
    net(fam.inputs(batch=6))
    norm = net.get_submodule("norm")
    assert norm.num_batches_tracked.item() == 1
    assert [norm.running_stats(t)["num_batches_tracked"].item() for t in TASKS] == [1, 1]
    assert not torch.equal(norm.running_mean, norm.running_stats("seg")["running_mean"])


def test_split_again_and_load_split_agree_on_batchnorm_stats(tmp_path) -> None:
    fam = FAMILIES["bnshare"]
    once = split(fam.model(), ["fc", "inp"], init="copy")
    twice = split(split(fam.model(), ["fc"], init="copy"), ["inp"], init="copy")
    assert list(twice.state_dict()) == list(once.state_dict())  # norm's shared statistics are gone in both
    assert "norm.running_mean" not in once.state_dict()
    assert twice.meta["recon"]["task_stats"] == once.meta["recon"]["task_stats"]

    twice.train()
    for seed in range(2):
        twice(fam.inputs(batch=6, seed=seed))
    twice.eval()
    torch.save(twice.state_dict(), tmp_path / "weights.pt")
    rebuilt = load_split(fam.model, plan_of(twice))
    rebuilt.load_state_dict(torch.load(tmp_path / "weights.pt"))
    rebuilt.eval()
    x = fam.inputs(seed=3)
    with torch.no_grad():
        expected, got = twice(x), rebuilt(x)
    for t in TASKS:
        torch.testing.assert_close(got[t], expected[t])


def test_a_state_dict_with_shared_statistics_loads_into_every_task() -> None:
    fam = FAMILIES["resnet"]
    model = fam.model().train()
    model(fam.inputs(batch=8))
    net = split(fam.model(seed=1), ["layer2.1.conv2"], init="reinit")
    # a checkpoint of this split made before statistics were per task: the unsplit keys, but a branched conv2
    old = {k: v for k, v in model.state_dict().items() if k != "layer2.1.conv2.weight"}
    old.update({f"layer2.1.conv2.{t}.weight": model.layer2[1].conv2.weight for t in TASKS})
    net.load_state_dict(old)  # strict
    bn = net.get_submodule("layer2.1.bn2")
    for t in TASKS:
        for key, value in bn.running_stats(t).items():
            assert torch.equal(value, getattr(model.layer2[1].bn2, key))
    assert bn.running_stats("seg")["running_mean"] is not bn.running_stats("depth")["running_mean"]
    net.load_state_dict(dict(net.state_dict()))  # a plain dict (no metadata) loads too
    x = fam.inputs()
    model.eval()
    net.eval()
    with torch.no_grad():
        expected, got = model(x), net(x)
    for t in TASKS:
        torch.testing.assert_close(got[t], expected[t])


class NormGate(nn.Module):
    """A leaf (data-dependent) whose BatchNorm runs once per task when the leaf does."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x)) if x.sum() > -1e9 else x


class WithNormGate(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.gate = NormGate(d)
        self.heads = nn.ModuleDict({t: nn.Linear(d, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.gate(self.inp(x))
        return {t: head(h) for t, head in self.heads.items()}


@pytest.mark.parametrize("layers", [["inp"], ["gate.lin"]])
def test_batchnorm_inside_a_leaf_module_keeps_per_task_stats(layers: list[str]) -> None:
    model = WithNormGate()
    net = split(model, layers, leaf_modules=["gate"], init="copy")
    assert "call_for_task(gate, 'seg'" in net.code
    assert net.meta["recon"]["task_stats"] == {"gate.bn": list(TASKS)}
    branch = net.get_submodule(f"{layers[0]}.depth")
    with torch.no_grad():
        branch.weight.mul_(3.0)
    x = torch.randn(6, 8)
    net.train()
    net(x)
    bn = net.get_submodule("gate.bn")
    model.train()
    model(x)  # task seg's path is the model's own
    for key, value in bn.running_stats("seg").items():
        torch.testing.assert_close(value, getattr(model.gate.bn, key))
    assert bn.running_stats("depth")["num_batches_tracked"].item() == 1
    assert not torch.allclose(bn.running_stats("depth")["running_var"], model.gate.bn.running_var)


class StemNorm(nn.Module):
    """A tiny model with a BatchNorm right after the (branched) stem, as in the digits example."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.bn(self.stem(x)))
        return {t: head(h) for t, head in self.heads.items()}


def stem_data(g: torch.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(n, 8, generator=g) + 1.5
    return x, {"seg": x[:, :4].sum(1, keepdim=True), "depth": -3.0 * x[:, 4:].sum(1, keepdim=True)}


def test_joint_training_then_eval_mode_does_not_collapse() -> None:
    torch.manual_seed(0)
    model = StemNorm()
    net = split(model, ["stem"], init="copy")
    for m in (model, net):  # joint training (plain SGD): the stem's copies drift apart
        g = torch.Generator().manual_seed(1)
        m.train()
        for _ in range(20):
            x, y = stem_data(g, 64)
            out = m(x)
            grads = torch.autograd.grad(sum(F.mse_loss(out[t], y[t]) for t in TASKS), list(m.parameters()))
            with torch.no_grad():
                for p, grad in zip(m.parameters(), grads, strict=True):
                    p.sub_(0.03 * grad)
        # settle the statistics for the final weights: cumulative averages over a few train-mode batches
        for bn in (mod for mod in m.modules() if isinstance(mod, _BatchNorm)):
            bn.reset_running_stats()
            bn.momentum = None
        with torch.no_grad():
            for _ in range(6):
                m(stem_data(g, 256)[0])

    x, _ = stem_data(torch.Generator().manual_seed(2), 1024)
    with torch.no_grad():  # the tasks' features differ: an average of their statistics would fit neither
        gap = net.get_submodule("stem.seg")(x).mean(0) - net.get_submodule("stem.depth")(x).mean(0)
    assert gap.abs().max() > 0.5
    for m in (model, net):
        with torch.no_grad():
            evaluated = m.eval()(x)
            batch = m.train()(x)  # normalised with this batch's own statistics
        for t in TASKS:
            rel = (evaluated[t] - batch[t]).norm() / batch[t].norm()
            assert rel < 0.05, f"{type(m).__name__} task {t}: eval-mode output is {rel:.0%} off the train-mode one"
