"""recon on third-party models: Hugging Face transformers BERT, ViT and GPT-2 from tiny configs (no download)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import recon
from recon._split import load_split, plan_of, shared_parameters, split

transformers = pytest.importorskip("transformers")

TASKS = ("a", "b", "c")
LAYERS = 3
HIDDEN = 32


class Heads(nn.Module):
    """A transformers backbone shared by three heads: CLS state, pooled/last state, mean state."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "bert":
            config = transformers.BertConfig(
                vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                intermediate_size=2 * HIDDEN, max_position_embeddings=16,
            )  # fmt: skip
            self.backbone = transformers.BertModel(config)
        elif kind == "vit":
            config = transformers.ViTConfig(
                hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=2 * HIDDEN,
                image_size=8, patch_size=4, num_channels=3,
            )  # fmt: skip
            self.backbone = transformers.ViTModel(config)
        else:
            config = transformers.GPT2Config(
                vocab_size=50, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
            )
            self.backbone = transformers.GPT2Model(config)
        self.heads = nn.ModuleDict({t: nn.Linear(HIDDEN, 3) for t in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "gpt2":
            states = self.backbone(input_ids=x, use_cache=False).last_hidden_state
            return {
                "a": self.heads.a(states[:, -1]),
                "b": self.heads.b(states[:, 0]),
                "c": self.heads.c(states.mean(1)),
            }
        out = self.backbone(x)
        states = out.last_hidden_state
        pooled = out.pooler_output if out.pooler_output is not None else states[:, 1]
        return {"a": self.heads.a(states[:, 0]), "b": self.heads.b(pooled), "c": self.heads.c(states.mean(1))}


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Heads(kind)


def _inputs(kind: str, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return torch.randn(batch, 3, 8, 8, generator=g)
    return torch.randint(0, 50, (batch, 8), generator=g)


def _blocks(kind: str) -> str:
    return {"bert": "backbone.encoder.layer", "vit": "backbone.layers", "gpt2": "backbone.h"}[kind]


def _deep_layers(model: nn.Module, kind: str, k: int, seed: int) -> list[str]:
    """``k`` random layers of the encoder blocks after the first (deep in the encoder)."""
    prefix = _blocks(kind)
    names = [
        n
        for n, m in model.named_modules()
        if n.startswith(prefix + ".") and int(n.split(".")[len(prefix.split("."))]) >= 1 and m._parameters
    ]
    return sorted(random.Random(seed).sample(names, k))


def _losses(out: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: (out[t] * weights[t]).sum() for t in TASKS}


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2"])
def test_copy_split_preserves_outputs_and_gradients(kind: str) -> None:
    model = _model(kind).eval()
    x = _inputs(kind)
    layers = _deep_layers(model, kind, 2, seed=len(kind))
    net = split(model, layers, init="copy", example_inputs=(x,))
    assert net.meta["recon"]["capture"] == "export"
    net.eval()
    torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)
    for layer in layers:
        assert isinstance(net.get_submodule(f"{layer}.a"), type(model.get_submodule(layer)))
    weights = {t: torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(TASKS)}
    sum(_losses(model(x), weights).values()).backward()
    sum(_losses(net(x), weights).values()).backward()
    grads = dict(net.named_parameters())
    for name, p in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        if owner in layers:  # the copies' gradients add up to the original layer's
            total = sum(grads[f"{owner}.{t}.{attr}"].grad for t in net.get_submodule(owner).tasks)
            torch.testing.assert_close(total, p.grad, rtol=1e-4, atol=1e-6)
        elif p.grad is not None:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_flop_ratio_is_the_papers(kind: str) -> None:
    """One layer in the last encoder block branched: only the work downstream of it runs once per task."""
    model = _model(kind).eval()
    x = _inputs(kind)
    layer = f"{_blocks(kind)}.{LAYERS - 1}." + ("output.dense" if kind == "bert" else "mlp.fc2")
    net = split(model, [layer], init="copy", example_inputs=(x,)).eval()
    with FlopCounterMode(display=False) as total:
        model(x)
    before = {}
    with FlopCounterMode(display=False) as running:

        def mark(module: nn.Module, args: tuple) -> None:
            before.setdefault("f", running.get_total_flops())

        hook = model.get_submodule(layer).register_forward_pre_hook(mark)
        model(x)
    hook.remove()
    downstream = total.get_total_flops() - before["f"]
    ideal = (total.get_total_flops() + (len(TASKS) - 1) * downstream) / total.get_total_flops()
    with FlopCounterMode(display=False) as split_count:
        net(x)
    ratio = split_count.get_total_flops() / total.get_total_flops()
    assert ratio == pytest.approx(ideal, rel=0.10)
    assert ratio < 1.5  # far from the whole backbone once per task (3x)


def test_modes_switch_and_plan_rebuilds() -> None:
    model = _model("bert")
    x = _inputs("bert")
    net = split(model, ["backbone.encoder.layer.1.attention.self.query"], init="copy", example_inputs=(x,))
    net.train()
    assert not torch.equal(net(x)["a"], net(x)["a"])  # dropout is on
    net.eval()
    assert torch.equal(net(x)["a"], net(x)["a"])
    longer = torch.randint(0, 50, (3, 11))  # batch size and sequence length are both dynamic
    torch.testing.assert_close(net(longer), model.eval()(longer))
    rebuilt = load_split(lambda: _model("bert", seed=3), plan_of(net), example_inputs=(_inputs("bert", 6),))
    assert list(rebuilt.state_dict()) == list(net.state_dict())
    rebuilt.load_state_dict(net.state_dict())
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), net(x))


def test_pooler_inside_a_backbone_leaf_belongs_to_its_task() -> None:
    model = _model("bert")
    x = _inputs("bert")
    shared = {id(p) for p in shared_parameters(model, leaf_modules=["backbone"], example_inputs=(x,))}
    pooler = model.backbone.pooler.dense
    assert id(pooler.weight) not in shared and id(model.backbone.encoder.layer[2].output.dense.weight) in shared
    own = {id(p) for p in recon.task_parameters(model, "b", leaf_modules=["backbone"], example_inputs=(x,))}
    assert id(pooler.weight) in own


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_profile_equals_independent_autograd(kind: str) -> None:
    model = _model(kind)
    for m in model.modules():  # profiling trains: no dropout, so that the oracle below sees the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = _inputs(kind)
    weights = {t: torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(TASKS)}
    losses = {t: (lambda o, w, _t=t: (o * w).sum()) for t in TASKS}
    reference = copy.deepcopy(model)
    prof = recon.profile(model, [(x, weights)], losses, steps=1)
    out = reference(x)
    names = [n for n, p in reference.named_parameters()]
    params = list(reference.parameters())
    per_task = {}
    for t in TASKS:
        grads = torch.autograd.grad((out[t] * weights[t]).sum(), params, retain_graph=True, allow_unused=True)
        per_task[t] = dict(zip(names, grads, strict=True))
    owners = {n.rpartition(".")[0] for n in names}
    reached = {
        o: sum(any(per_task[t][n] is not None for n in names if n.rpartition(".")[0] == o) for t in TASKS)
        for o in owners
    }
    shared = {o for o, k in reached.items() if k >= 2}
    assert set(prof.layers) == shared
    frame = prof.cosines
    layer = prof.layers[-1]
    row = frame[(frame.layer == layer) & (frame.task_a == "a") & (frame.task_b == "c")].iloc[0]
    ga = torch.cat([per_task["a"][n].flatten() for n in names if n.rpartition(".")[0] == layer])
    gc = torch.cat([per_task["c"][n].flatten() for n in names if n.rpartition(".")[0] == layer])
    assert row.cos == pytest.approx(float(torch.nn.functional.cosine_similarity(ga, gc, dim=0)), abs=1e-4)


def test_cli_profile_and_split_a_transformers_recipe_without_leaves(tmp_path: Path, monkeypatch) -> None:
    """`recon profile` and `recon split` on examples/bert_tasks.py: torch.export capture, no --leaf."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECON_BERT_BATCH", "8")
    recipe = str(Path(__file__).resolve().parents[1] / "examples" / "bert_tasks.py")
    res = CliRunner().invoke(app, ["profile", recipe, "--steps", "1"])
    assert res.exit_code == 0, res.output
    layer = "bert.encoder.layer.3.output.dense"  # the recipe has 4 layers
    res = CliRunner().invoke(app, ["split", "--layers", layer, "--init", "copy"])
    assert res.exit_code == 0, res.output
    folder = next((tmp_path / "runs").iterdir()) / "split"
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["capture"] == "export" and plan["layers"] == [layer]
    code = (folder / "model.py").read_text()
    assert "torch.export" in code and f"# {layer} (Linear)" in code  # aten-level code names its modules
    assert 'getattr(self.bert.encoder.layer, "3").output.dense.digit(' in code
