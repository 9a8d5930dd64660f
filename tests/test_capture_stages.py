"""Issue 19: one capture serves every stage, and captures of third-party-style models split correctly.

Oracles: per-task autograd (ownership, profiles), the eager model (function preservation with init="copy"),
``FlopCounterMode`` on the split model (FLOP budgets), parameter counts ((g - 1) x a branched layer's own).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import recon
import recon._capture as capture_module
from recon._capture import capture
from recon._errors import ReconError
from recon._split import load_split, plan_of, shared_parameters, split, task_parameters
from tests.libmtl_models import HPS, DSelectK, MMoE, images
from tests.models import ResNet

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------- helpers
def _count_captures(monkeypatch) -> list[int]:
    """A spy on the uncached capture: one entry per capture that produced a graph (fx or torch.export); a
    symbolic trace that fails at once (profile tries fx before reading a batch) makes no graph to reuse."""
    calls: list[int] = []
    real = capture_module._capture

    def spy(*args, **kwargs):
        captured = real(*args, **kwargs)
        calls.append(1)
        return captured

    monkeypatch.setattr(capture_module, "_capture", spy)
    return calls


def _task_grads(net: nn.Module, x: tuple, tasks) -> dict[str, set[int]]:
    """``{task: ids of the trainable parameters its output reaches}`` by autograd (eval mode)."""
    net.eval()
    out = net(*x)
    params = [p for p in net.parameters() if p.requires_grad]
    reach = {}
    for t in tasks:
        grads = torch.autograd.grad(out[t].float().sum(), params, allow_unused=True, retain_graph=True)
        reach[t] = {id(p) for p, g in zip(params, grads, strict=True) if g is not None}
    return reach


def _check_split(model: nn.Module, x: tuple, layers: list[str], tasks) -> nn.Module:
    """Split ``layers`` (init="copy", torch.export): same outputs, exact parameter growth, ownership = autograd."""
    model.eval()
    net = split(model, layers, init="copy", example_inputs=x, capture="export")
    net.eval()
    torch.testing.assert_close(net(*x), model(*x), rtol=1e-5, atol=1e-5)
    branches = net.meta["recon"]["branches"]
    ties = recon._graph.tie_groups(model)
    counted: dict[int, int] = {}
    for layer, copies in branches.items():
        for p in recon._graph.tied_parameters(model, layer):
            counted[id(p)] = (len(copies) - 1) * p.numel()
        assert set(ties.get(layer, [layer])) <= set(branches)  # a tied weight branches under all its names
    growth = sum(p.numel() for p in net.parameters()) - sum(p.numel() for p in model.parameters())
    assert growth == sum(counted.values())
    reach = _task_grads(net, x, tasks)
    shared = {id(p) for p in shared_parameters(net)}
    assert shared == {id(p) for p in net.parameters() if sum(id(p) in r for r in reach.values()) >= 2}
    for t in tasks:
        own = {id(p) for p in task_parameters(net, t)}
        assert own == {i for i in reach[t] if all(i not in reach[u] for u in tasks if u != t)}
    return net


def _shared_layers(model: nn.Module, x: tuple, tasks) -> list[str]:
    """The layers whose own trainable parameters two or more tasks reach, by autograd."""
    reach = _task_grads(model, x, tasks)
    names = []
    for name, m in model.named_modules():
        own = [id(p) for p in m._parameters.values() if p is not None and p.requires_grad]
        if own and sum(any(i in r for i in own) for r in reach.values()) >= 2:
            names.append(name)
    return names


def _profile(model: nn.Module, x: tuple, tasks, steps: int = 2) -> recon.ConflictProfile:
    g = torch.Generator().manual_seed(3)
    targets = {t: torch.randn(model(*x)[t].shape, generator=g) for t in tasks}
    losses = {t: (lambda o, w: (o * w).sum()) for t in tasks}
    return recon.profile(model, [(x if len(x) > 1 else x[0], targets)], losses, steps=steps)


# -------------------------------------------------------------------------------------- third-party style
class LMHeads(nn.Module):
    """GPT-2 with its LM head tied to the input embedding (``lm.lm_head.weight is lm.transformer.wte.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16)
        self.lm = transformers.GPT2LMHeadModel(config)
        self.score = nn.Linear(40, 1)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.lm(input_ids=ids, use_cache=False).logits
        return {"next": logits[:, -1], "score": self.score(logits.mean(1))}


class T5Heads(nn.Module):
    """A T5 encoder whose embedding is ``shared`` with ``encoder.embed_tokens``, two heads."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.T5Config(
            vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0
        )
        self.t5 = transformers.T5EncoderModel(config)
        self.a = nn.Linear(16, 2)
        self.b = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        states = self.t5(input_ids=ids).last_hidden_state
        return {"a": self.a(states[:, 0]), "b": self.b(states.mean(1))}


class ResNetHeads(nn.Module):
    """transformers' ResNet (in-place residual adds under export), two heads."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
        )
        self.resnet = transformers.ResNetModel(config)
        self.a = nn.Linear(16, 2)
        self.b = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.resnet(x).pooler_output.flatten(1)
        return {"a": self.a(pooled), "b": self.b(pooled)}


class CausalBlock(nn.Module):
    """Self-attention with a causal mask kept as a plain tensor attribute (export lifts it as a constant
    under the block's dotted path) and a frozen sinusoidal position table (``requires_grad=False``)."""

    def __init__(self, d: int = 16, seq: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mask = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        angles = torch.arange(seq)[:, None] / 10 ** (torch.arange(d)[None] / d)
        self.positions = nn.Parameter(torch.sin(angles), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.positions[: h.shape[1]]
        q, k, v = self.qkv(h).chunk(3, -1)
        scores = (q @ k.transpose(1, 2)).masked_fill(~self.mask[: h.shape[1], : h.shape[1]], -1e9)
        return h + self.out(torch.softmax(scores, -1) @ v)


class CausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.blocks = nn.ModuleList([CausalBlock(), CausalBlock()])
        self.a = nn.Linear(16, 2)
        self.b = nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return {"a": self.a(h[:, -1]), "b": self.b(h.mean(1))}


class BagExperts(nn.Module):
    """A recommender: categorical fields through ``nn.EmbeddingBag`` (flat ids and offsets as inputs) and
    dense features into gated experts (MMoE, Ma et al., KDD 2018, Eq. 5), one tower per task."""

    def __init__(self, tasks=("click", "buy"), d: int = 8, experts: int = 2) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.bag = nn.EmbeddingBag(50, d, mode="mean")
        self.dense = nn.Linear(4, d)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(2 * d, d), nn.ReLU()) for _ in range(experts)])
        self.gates = nn.ModuleDict({t: nn.Linear(2 * d, experts) for t in tasks})
        self.towers = nn.ModuleDict({t: nn.Linear(d, 1) for t in tasks})

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.cat([self.bag(ids, offsets), self.dense(dense)], -1)
        experts = torch.stack([e(z) for e in self.experts], 1)
        gates = {t: torch.softmax(self.gates[t](z), -1)[..., None] for t in self.tasks}
        return {t: self.towers[t]((gates[t] * experts).sum(1)) for t in self.tasks}


def _tokens(n: int = 30, batch: int = 3, seq: int = 8) -> tuple:
    return (torch.randint(0, n, (batch, seq), generator=torch.Generator().manual_seed(0)),)


def _bag_inputs(batch: int = 4) -> tuple:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (11,), generator=g)
    offsets = torch.tensor([0, 2, 5, 9])[:batch]
    return ids, offsets, torch.randn(batch, 4, generator=g)


# ---------------------------------------------------------------------------------------------- tests
def test_one_capture_serves_profile_plan_split_and_ownership(monkeypatch) -> None:
    calls = _count_captures(monkeypatch)
    torch.manual_seed(0)
    model, x = HPS(), images()
    prof = _profile(model, (x,), HPS().task_name)
    assert len(calls) == 1 and prof.discovery == "fx"  # fx with task_name fixed at its default
    plan = recon.plan_split(prof, model, budget_params=0.5, groups="auto", example_inputs=(x,))
    net = split(model, plan.layer_spec(), init="copy", example_inputs=(x,))
    shared_parameters(net)
    recon._capture.layer_usage(model, None, example_inputs=(x,))
    assert len(calls) == 2  # the profile trained the model; then one capture for plan, split, ownership


def test_cli_split_with_budgets_on_bert_captures_once(tmp_path, monkeypatch) -> None:
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECON_BERT_BATCH", "8")
    recipe = str(Path(__file__).resolve().parents[1] / "examples" / "bert_tasks.py")
    res = CliRunner().invoke(app, ["profile", recipe, "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert "discovery: export" in " ".join(res.output.split())
    run = next((tmp_path / "runs").iterdir())
    assert json.loads((run / "profile" / "profile.json").read_text())["discovery"] == "export"
    calls = _count_captures(monkeypatch)
    res = CliRunner().invoke(app, ["split", "--budget-params", "0.2", "--budget-flops", "1.5", "--groups", "auto"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    plan = json.loads((run / "split" / "plan.json").read_text())
    assert plan["capture"] == "export" and plan["params_after"] - plan["params_before"] <= 0.2 * plan["params_before"]


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "hps"])
def test_budgets_on_exported_models(kind: str) -> None:
    from tests.test_transformers import _inputs, _model

    if kind == "hps":
        torch.manual_seed(0)
        model, x, tasks = HPS(), (images(),), HPS().task_name
    else:
        model, x, tasks = _model(kind), (_inputs(kind),), ("a", "b", "c")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    prof = _profile(model, x, tasks)
    plan = recon.plan_split(prof, model, budget_params=0.3, budget_flops=1.4, groups="auto", example_inputs=x)
    assert plan.capture == ("fx" if kind == "hps" else "export")
    base = sum(p.numel() for p in model.parameters())
    net = split(model, plan.layer_spec(), init="copy", example_inputs=x)  # checks the function on x itself
    added = sum(p.numel() for p in net.parameters()) - base
    assert added == plan.extra["params_after"] - base <= 0.3 * base
    with FlopCounterMode(display=False) as flops:
        net.eval()(*x)
    assert flops.get_total_flops() == pytest.approx(plan.extra["flops_after"])
    assert plan.extra["flops_after"] <= 1.4 * plan.extra["flops_before"]
    curve = recon._plan.budget_curve(prof, model, groups="auto", example_inputs=x)
    assert curve.score_removed.is_monotonic_increasing


def test_batchnorm_resnet_through_export_in_train_and_eval() -> None:
    torch.manual_seed(0)
    model, x = ResNet(), torch.randn(4, 3, 8, 8)
    reference = ResNet()
    reference.load_state_dict(model.state_dict())
    net = split(model, ["layer2.1.conv1"], init="copy", example_inputs=(x,), capture="export")
    assert all(m.training for m in model.modules())  # the capture gave the model its modes back
    bn = net.get_submodule("layer1.0.bn1")
    before = bn.running_mean.clone()
    net.train()
    reference.train()
    torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(bn.running_mean, before)  # running statistics update in train mode
    torch.testing.assert_close(bn.running_mean, reference.layer1[0].bn1.running_mean)
    net.eval()
    reference.eval()
    torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)


def test_a_backward_inside_forward_is_refused_at_its_line() -> None:
    for mode in ("auto", "export"):
        with pytest.raises(ReconError, match=r"calls backward\(\) at .*libmtl_models.py:\d+ `entropy.backward"):
            capture(DSelectK(), example_inputs=(images(),), mode=mode)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_arguments_the_batch_leaves_out_take_their_defaults(mode: str) -> None:
    torch.manual_seed(0)
    model, x = HPS().eval(), images()
    net = split(model, ["encoder.hidden_layer.0"], init="copy", example_inputs=(x,), capture=mode)
    assert plan_of(net).concrete_args == {"task_name": None}
    with pytest.raises(ReconError, match="captured with task_name=None") as info:
        net(x, task_name="amazon")
    assert "\n" not in str(info.value)
    plan = recon.SplitPlan.from_json(plan_of(net).to_json())
    rebuilt = load_split(lambda: HPS(), plan, example_inputs=(x,))
    rebuilt.load_state_dict(net.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), model(x))


def test_mmoe_with_resnet_experts_splits_any_layer_subset() -> None:
    torch.manual_seed(0)
    model, x = MMoE(), (images(),)
    tasks = model.task_name
    shared = [n for n in _shared_layers(model, x, tasks) if n]
    issue = [  # the set of issue 19, at this ResNet's depth
        "experts_shared.1.hidden_layer.0",
        "experts_shared.1.resnet_network.layer2.0.downsample.0",
        "experts_shared.0.resnet_network.layer2.0.downsample.1",
    ]
    subsets = [issue] + [random.Random(seed).sample(shared, 3) for seed in range(3)]
    for layers in subsets:
        _check_split(model, x, layers, tasks)


@pytest.mark.parametrize("make", [LMHeads, T5Heads], ids=["lm_head_tied", "t5_shared"])
def test_tied_weights_are_one_layer_under_all_names(make) -> None:
    torch.manual_seed(0)
    model, x = make().eval(), _tokens()
    tasks = list(model(*x))
    ties = recon._graph.tie_groups(model)
    assert ties
    prof = _profile(model, x, tasks, steps=1)
    assert set(prof.layers) <= set(_shared_layers(model, x, tasks)) | set(ties)
    names = sorted({n for group in ties.values() for n in group})
    for name in names:  # each name of the tied weight splits it, ties kept inside each copy
        net = _check_split(model, x, [name], tasks)
        copies = [net.get_submodule(f"{m}.{tasks[0]}") for m in ties[name]]
        assert len({id(c.weight) for c in copies}) == 1


@pytest.mark.parametrize("make", [ResNetHeads, CausalLM], ids=["hf_resnet_inplace", "causal_mask_frozen"])
def test_in_place_adds_lifted_constants_and_frozen_parameters(make) -> None:
    torch.manual_seed(0)
    model = make().eval()
    x = (torch.randn(2, 3, 16, 16),) if make is ResNetHeads else _tokens()
    tasks = ["a", "b"]
    shared = [n for n in _shared_layers(model, x, tasks) if n]
    for seed in range(2):
        _check_split(model, x, random.Random(seed).sample(shared, 2), tasks)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    params = {id(p) for p in shared_parameters(model, example_inputs=x)}
    params |= {id(p) for t in tasks for p in task_parameters(model, t, example_inputs=x)}
    assert not params & {id(p) for p in frozen}


def test_embedding_bag_recommender_keeps_ids_and_offsets_static() -> None:
    torch.manual_seed(0)
    model, x = BagExperts().eval(), _bag_inputs()
    tasks = model.tasks
    captured = capture(model, example_inputs=x, mode="export")
    assert captured.how == "export"
    prof = _profile(model, x, tasks, steps=1)
    assert set(prof.layers) == set(_shared_layers(model, x, tasks))
    shared = [n for n in _shared_layers(model, x, tasks) if n]
    for seed in range(2):
        _check_split(model, x, random.Random(seed).sample(shared, 2), tasks)
