"""Capture beyond symbolic tracing (recon._capture): torch.export in both modes, minimal leaves, eager checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recon._capture import capture, example_args
from recon._errors import ReconError
from recon._graph import TraceError, trace_modes
from recon._split import SplitPlan, load_split, plan_of, shared_parameters, split, task_parameters
from tests.models import TASKS, TASKS3, Gated, ModeDependent


class Constant(nn.Module):
    """A forward that builds a tensor constant: every trace names it anew."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.inp(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])
        return {t: head(h) for t, head in self.heads.items()}


class ConvBN(nn.Module):
    """BatchNorm, nn.Dropout and functional dropout on self.training: fx refuses it, export captures it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.trunk = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 2) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3))
        h = F.dropout(self.trunk(h), 0.3, training=self.training)
        return {t: head(h) for t, head in self.heads.items()}


class ListEncoder(nn.Module):
    """Returns a Python list of features, as LibMTL's MTAN encoder does."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = torch.relu(self.c1(x))
        return [a, torch.relu(self.c2(a))]


class ListMTAN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = ListEncoder()
        self.heads = nn.ModuleDict({t: nn.Conv2d(4, 2, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder(x)
        if isinstance(feats, list):  # False on an fx Proxy: the leaf's list reaches the heads
            feats = feats[-1]
        return {t: head(feats) for t, head in self.heads.items()}


def test_equal_constants_are_no_mode_difference() -> None:
    x = torch.randn(3, 4)
    model = Constant().eval()
    gm = trace_modes(model)
    torch.testing.assert_close(gm(x), model(x))


def test_genuine_mode_difference_names_the_line() -> None:
    with pytest.raises(TraceError, match=r"models\.py:\d+ `h = F\.dropout"):
        trace_modes(ModeDependent())


def test_export_capture_follows_modes_and_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    model = ConvBN()
    x = torch.randn(4, 3, 6, 6)
    stats = model.bn.running_mean.clone()
    captured = capture(model, example_inputs=(x,))
    assert captured.how == "export"
    assert torch.equal(model.bn.running_mean, stats)  # capturing changes no buffer
    gm = captured.gm
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))
    gm.train()
    bigger = torch.randn(7, 3, 6, 6)  # the batch dimension is dynamic
    out = gm(bigger)
    assert out["seg"].shape == (7, 2)
    assert not torch.equal(model.bn.running_mean, stats) and int(model.bn.num_batches_tracked) == 1
    # train mode: dropout active (two calls differ), BatchNorm normalises with the batch statistics
    assert not torch.equal(gm(bigger)["seg"], gm(bigger)["seg"])
    mean = model.bn.running_mean.clone()
    reference = ConvBN()
    reference.load_state_dict(model.state_dict())
    reference.train()
    torch.manual_seed(1)
    want = reference(bigger)
    torch.manual_seed(1)
    got = gm(bigger)
    torch.testing.assert_close(got, want)
    assert not torch.equal(model.bn.running_mean, mean)


def test_export_split_is_exact_and_reachable() -> None:
    torch.manual_seed(0)
    model = ConvBN().eval()
    x = torch.randn(4, 3, 6, 6)
    net = split(model, ["trunk"], init="copy", example_inputs=(x,))
    assert net.meta["recon"]["capture"] == "export"
    assert isinstance(net.get_submodule("trunk.seg"), nn.Linear)
    assert "trunk.depth.weight" in net.state_dict()
    net.eval()
    torch.testing.assert_close(net(x), model(x))
    plan = plan_of(net)
    assert plan.capture == "export" and SplitPlan.from_json(plan.to_json()).capture == "export"
    with pytest.raises(ReconError, match="example_inputs"):
        load_split(ConvBN, plan)
    rebuilt = load_split(ConvBN, plan, example_inputs=(x,))
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), net(x))


def test_old_plan_without_capture_is_fx() -> None:
    plan = SplitPlan.from_dict({"tasks": list(TASKS), "layers": ["inp"], "init": "copy"})
    assert plan.capture is None
    net = load_split(Constant, plan)
    assert net.meta["recon"]["capture"] == "fx"


def test_leaf_returning_a_list_is_never_handed_over_broken() -> None:
    model = ListMTAN().eval()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ReconError, match=r"fails on the example batch.*isinstance"):
        split(model, ["encoder.c2"], init="copy", leaf_modules=["encoder"], example_inputs=(x,), capture="fx")
    net = split(model, ["encoder.c2"], init="copy", leaf_modules=["encoder"], example_inputs=(x,))
    assert net.meta["recon"]["capture"] == "export"
    net.eval()
    torch.testing.assert_close(net(x), model(x))


def test_minimal_automatic_leaves_where_nothing_else_captures() -> None:
    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(4, 8)
    captured = capture(model, example_inputs=(x,))
    assert captured.how == "fx+leaves[gate]" and captured.leaves == ["gate"]
    net = split(model, ["inp"], init="copy", example_inputs=(x,))  # a layer outside the leaf, branched alone
    assert net.meta["recon"]["capture"] == "fx+leaves[gate]"
    net.eval()
    torch.testing.assert_close(net(x), model(x))
    rebuilt = load_split(Gated, plan_of(net))  # recorded leaves: no example batch needed
    assert rebuilt.meta["recon"]["leaf_modules"] == ["gate"]


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.pool = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return h, self.pool(h)


class PooledTasks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, p = self.backbone(x)
        return {"seg": self.a(h), "depth": self.b(p)}


def test_ownership_inside_a_leaf_comes_from_autograd() -> None:
    model = PooledTasks()
    x = torch.randn(3, 4)
    shared = shared_parameters(model, leaf_modules=["backbone"], example_inputs=(x,))
    assert {id(p) for p in shared} == {id(model.backbone.body.weight), id(model.backbone.body.bias)}
    own = {id(p) for p in task_parameters(model, "depth", leaf_modules=["backbone"], example_inputs=(x,))}
    assert own == {id(p) for p in (model.backbone.pool.weight, model.backbone.pool.bias, *model.b.parameters())}
    with pytest.raises(ReconError, match="used by only task 'depth'"):
        split(model, ["backbone.pool"], leaf_modules=["backbone"], example_inputs=(x,), capture="fx")


def test_example_args_forms() -> None:
    x = torch.zeros(2)
    assert example_args(x) == ((x,), {})
    assert example_args((x, x))[0] == (x, x)
    assert example_args(((x,), {"k": 1})) == ((x,), {"k": 1})
    assert example_args({"ids": x}) == ((), {"ids": x})
    with pytest.raises(ReconError, match="example_inputs"):
        example_args(3)


class Doubling(nn.Module):
    """Python branching on self.training: genuinely different graphs in the two modes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.inp(x)
        if self.training:
            h = h * 2
        return {t: head(h) for t, head in self.heads.items()}


def test_export_names_the_first_real_mode_difference() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ReconError, match=r"differs between train and eval mode.*test_capture\.py:\d+ `h = h \* 2`"):
        capture(Doubling(), example_inputs=(x,), mode="export")
    with pytest.raises(ReconError, match="cannot capture"):  # and no way captures it: never a frozen mode
        split(Doubling(), ["inp"], example_inputs=(x,))


class PooledThree(nn.Module):
    """A leaf used by three tasks whose inner ``pool`` only two of them reach."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS3})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, p = self.backbone(x)
        first, *rest = TASKS3
        return {first: self.heads[first](h), **{t: self.heads[t](p) for t in rest}}


def test_routing_inside_a_leaf_and_its_rebuild() -> None:
    x = torch.randn(3, 4)
    net = split(PooledThree(), ["backbone.pool"], leaf_modules=["backbone"], example_inputs=(x,), capture="fx")
    first, *rest = TASKS3
    assert net.meta["recon"]["branches"] == {"backbone.pool": rest}  # autograd: the first task never reaches it
    plan = plan_of(net)
    plan.extra["branches"] = net.meta["recon"]["branches"]  # as `recon split` records it
    with pytest.raises(ReconError, match="pass example_inputs"):
        load_split(PooledThree, plan)
    rebuilt = load_split(PooledThree, plan, example_inputs=(x,))
    assert list(rebuilt.state_dict()) == list(net.state_dict())
