"""Graph analysis: tracing errors, task outputs, and which tasks each layer feeds (recon._graph)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from recon._errors import ReconError
from recon._graph import TraceError, layer_tasks, output_tasks, shared_layers, trace, trace_modes
from recon._split import split
from tests.models import FAMILIES, TASKS, TASKS3, Gate, Gated, ModeDependent, Partial

ALL = frozenset(TASKS)


def test_layer_tasks_partial_sharing() -> None:
    usage = layer_tasks(Partial())
    assert usage == {
        "stem": frozenset(TASKS3),
        "shared": frozenset(TASKS3),
        "side": frozenset({"seg"}),
        "mid": frozenset({"depth", "normal"}),
        "unused": frozenset(),
        "seg": frozenset({"seg"}),
        "depth": frozenset({"depth"}),
        "normal": frozenset({"normal"}),
    }
    assert shared_layers(usage) == ["stem", "shared", "mid"]


def test_layer_tasks_covers_every_layer_in_named_modules_order() -> None:
    model = FAMILIES["resnet"].model()
    usage = layer_tasks(model)
    owners = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    assert list(usage) == owners
    assert usage["heads.seg"] == {"seg"} and usage["layer2.1.bn2"] == ALL
    assert usage["layer2.0.downsample.0"] == ALL


def test_functional_use_and_root_parameters() -> None:
    usage = layer_tasks(FAMILIES["transformer"].model())
    assert usage[""] == ALL  # Transformer.pos, a bare parameter of the root read through get_attr
    assert usage["block.attn.qkv"] == ALL
    # nn.MultiheadAttention is an fx leaf: its own parameters and its child out_proj are used by its call
    assert usage["mha"] == ALL and usage["mha.out_proj"] == ALL

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.a = nn.Linear(4, 1)
            self.b = nn.Linear(4, 1)

        def forward(self, x):
            h = F.linear(x, self.lin.weight, self.lin.bias)  # lin is never called
            return {"a": self.a(h), "b": self.b(x)}

    assert layer_tasks(Functional())["lin"] == {"a"}


def test_in_place_writes_count_as_uses() -> None:
    class Writer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.ha = nn.Linear(4, 1)
            self.hb = nn.Linear(4, 1)

        def forward(self, x):
            z = x * 1.0
            z.add_(self.fc(x))  # the result of add_ is never used; z is
            return {"a": self.ha(z), "b": self.hb(x)}

    assert layer_tasks(Writer())["fc"] == {"a"}
    assert layer_tasks(FAMILIES["inplace"].model())["fc"] == ALL


def test_output_tasks_dict_and_tuple() -> None:
    gm = trace(FAMILIES["mlp"].model())
    outs = output_tasks(gm)
    assert list(outs) == list(TASKS) and all(isinstance(n, fx.Node) for n in outs.values())
    assert list(output_tasks(gm, ["depth"])) == ["depth"]
    with pytest.raises(ReconError, match="no output for task"):
        output_tasks(gm, ["seg", "nope"])

    tup = trace(FAMILIES["unet"].model())
    with pytest.raises(ReconError, match=r"pass tasks=\[\.\.\.\]"):
        output_tasks(tup)
    with pytest.raises(ReconError, match="2 outputs but 3 tasks"):
        output_tasks(tup, ["a", "b", "c"])
    with pytest.raises(ReconError, match="not a valid Python identifier"):
        output_tasks(tup, ["a", "b.c"])
    assert list(output_tasks(tup, ["a", "b"])) == ["a", "b"]
    with pytest.raises(ReconError, match="tasks="):
        layer_tasks(FAMILIES["unet"].model())


def test_opaque_output_is_refused() -> None:
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 1)

        def forward(self, x):
            return {"a": self.a(x)}

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = Heads()

        def forward(self, x):
            return self.heads(x)

    with pytest.raises(ReconError, match="one opaque value"):
        layer_tasks(Outer(), leaf_modules=["heads"])
    assert layer_tasks(Outer()) == {"heads.a": {"a"}}


def test_trace_error_names_module_line_and_the_way_out() -> None:
    with pytest.raises(TraceError) as info:
        layer_tasks(Gated())
    message = str(info.value)
    assert "'gate' (Gate)" in message
    assert "models.py" in message and "if x.sum() > 0:" in message
    assert "leaf_modules=['gate']" in message and "--leaf gate" in message and "concrete_args" in message
    assert "\n" not in message
    assert isinstance(info.value, ReconError)

    usage = layer_tasks(Gated(), leaf_modules=["gate"])
    assert usage["gate.lin"] == ALL
    assert layer_tasks(Gated(), leaf_modules=[Gate]) == usage
    with pytest.raises(ReconError, match="unknown leaf module 'nope'"):
        layer_tasks(Gated(), leaf_modules=["nope"])


def test_mode_dependent_graph_is_refused() -> None:
    with pytest.raises(TraceError, match="differs between train and eval mode") as info:
        trace_modes(ModeDependent())
    assert "models.py" in str(info.value)
    model = ModeDependent().eval()
    with pytest.raises(TraceError):
        split(model, ["inp"])
    assert not model.training  # modes restored


def test_trace_matches_model() -> None:
    fam = FAMILIES["mtan"]
    model = fam.model().eval()
    x = fam.inputs()
    gm = trace(model)
    torch.testing.assert_close(gm(x), model(x))


def test_split_model_is_analysed_as_it_is() -> None:
    net = split(FAMILIES["mlp"].model(), ["trunk.2"], init="copy")
    usage = layer_tasks(net)
    assert usage["trunk.0"] == ALL
    assert usage["trunk.2.seg"] == {"seg"} and usage["trunk.2.depth"] == {"depth"}
    assert "trunk.2" not in usage
    assert shared_layers(usage) == ["trunk.0"]


def test_layers_inside_a_leaf_follow_the_task_scope() -> None:
    fam = FAMILIES["torch_transformer"]
    net = split(fam.model(), ["encoder.layers.1.linear1"], init="copy")
    usage = layer_tasks(net)
    assert usage["encoder.layers.1.linear1.seg"] == {"seg"}
    assert usage["encoder.layers.1.linear2"] == ALL
    assert usage["encoder.layers.0.self_attn.out_proj"] == ALL


def test_module_registered_under_two_names() -> None:
    class Alias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.second = self.first
            self.a = nn.Linear(4, 1)
            self.b = nn.Linear(4, 1)

        def forward(self, x):
            return {"a": self.a(self.first(x)), "b": self.b(self.second(x))}

    model = Alias()
    assert layer_tasks(model)["first"] == {"a", "b"}
    net = split(model, ["first"], init="copy")
    assert net.get_submodule("second") is net.get_submodule("first")
    x = torch.randn(3, 4)
    torch.testing.assert_close(net(x), model(x))
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters()) + 20
