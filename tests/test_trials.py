"""The paired-trial engine (recon/_trials.py): pairing, equal-cost candidates, paired statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

import recon
from recon._trials import (
    Candidate,
    CostModel,
    PairedBatches,
    TrialSetup,
    deeper_heads,
    forward_flops,
    match_width,
    paired_difference,
    paired_model,
    random_layers,
    run_trial,
)
from tests.conftest import ROOT
from tests.models import MLP, TASKS


class Pairs(TensorDataset):
    def __getitem__(self, i: int):
        x, y0, y1 = super().__getitem__(i)
        return x, {TASKS[0]: y0, TASKS[1]: y1}


def _setup() -> TrialSetup:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, :2] > 0).long()
    data = Pairs(x, y[:, 0], y[:, 1])

    def train_data() -> DataLoader:
        return DataLoader(data, batch_size=16, shuffle=True)

    def val_data() -> DataLoader:
        return DataLoader(data, batch_size=32)

    def accuracy(out, target) -> float:
        return (out.argmax(1) == target).float().mean().item()

    return TrialSetup(
        build_model=lambda hidden=16: MLP(TASKS, hidden=hidden),
        train_data=train_data,
        val_data=val_data,
        losses=dict.fromkeys(TASKS, F.cross_entropy),
        metrics={t: {"acc": (accuracy, "higher")} for t in TASKS},
        example_inputs=x[:16],
    )


def test_candidates_of_one_seed_see_the_same_batches_whatever_they_draw():
    setup = _setup()
    seen = {}
    for cand, method in [(Candidate("unsplit"), "joint"), (Candidate("split", ["trunk.2"]), "pcgrad")]:
        seen[cand.name] = []  # PCGrad draws a random task order every step: it must not move the data
        run_trial(setup, cand, seed=3, method=method, epochs=2, fingerprints=seen[cand.name], time_steps=False)
    assert len(seen["unsplit"]) == 2 * 6
    assert seen["unsplit"] == seen["split"]
    other = []
    run_trial(setup, Candidate("unsplit"), seed=4, epochs=2, fingerprints=other, time_steps=False)
    assert other != seen["unsplit"]  # a different seed, a different order
    assert seen["unsplit"][:6] != seen["unsplit"][6:]  # and a new order every epoch


def test_paired_batches_ignore_the_global_random_state_in_between():
    setup = _setup()
    a, b = PairedBatches(setup.train_data, 0, record=True), PairedBatches(setup.train_data, 0, record=True)
    for _batch in a():
        torch.rand(5)
    for _batch in b():
        pass
    assert a.fingerprints == b.fingerprints
    assert len(a()) == 6


def test_candidates_start_from_the_unsplit_models_values():
    setup = _setup()
    base = paired_model(setup, Candidate("unsplit"), 5)
    split = paired_model(setup, Candidate("split", ["trunk.0", "trunk.2"]), 5)
    wide = paired_model(setup, Candidate("wide", build={"hidden": 20}), 5)
    for task in TASKS:
        for layer in ("trunk.0", "trunk.2"):
            copy = split.get_submodule(f"{layer}.{task}")
            for name, p in base.get_submodule(layer).named_parameters():
                assert torch.equal(getattr(copy, name), p)
        assert torch.equal(split.get_submodule(f"heads.{task}").weight, base.heads[task].weight)
    own = dict(base.named_parameters())
    shared = [n for n, p in wide.named_parameters() if own[n].shape == p.shape]
    assert shared  # the heads' biases keep their shape
    for n in shared:
        assert torch.equal(dict(wide.named_parameters())[n], own[n])
    x = setup.example_inputs
    torch.testing.assert_close(split(x), base(x))  # init="copy": the same function


@pytest.fixture
def digits3(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    recipe = recon.load_recipe(ROOT / "examples" / "multidigits3.py")
    return recipe, torch.randn(4, 1, 10, 14)


def test_cost_model_matches_the_split_models_own_count(digits3):
    recipe, x = digits3
    model = recipe.build_model()
    cost = CostModel(model, recipe.tasks, x)
    spec = ["layer2.conv1", "layer3.bn2", "fc"]
    net = recon.split(model, spec)
    assert cost.added_params(spec) == sum(p.numel() for p in net.parameters()) - cost.base_params
    assert cost.flops(spec) == pytest.approx(forward_flops(net, x))
    assert cost.base_flops == pytest.approx(forward_flops(model, x))


def test_random_sets_lie_within_ten_percent_and_differ_across_seeds(digits3):
    recipe, x = digits3
    cost = CostModel(recipe.build_model(), recipe.tasks, x)
    plan = ["layer3.conv1", "layer1.bn2"]
    params, flops = cost.added_params(plan), cost.flops(plan)
    draws = [random_layers(cost, params=params, flops=flops, seed=s, avoid=plan) for s in range(5)]
    for d in draws:
        assert abs(cost.added_params(d) - params) <= 0.1 * params
        assert abs((cost.flops(d) - cost.base_flops) - (flops - cost.base_flops)) <= 0.1 * (flops - cost.base_flops)
        assert set(d) != set(plan)
    assert len({frozenset(d) for d in draws}) >= 3
    with pytest.raises(recon.ReconError, match="no random set"):
        random_layers(cost, params=10 * cost.base_params, flops=flops, seed=0, draws=200)


def test_deeper_heads_take_the_layers_nearest_the_outputs(digits3):
    recipe, x = digits3
    model = recipe.build_model()
    cost = CostModel(model, recipe.tasks, x)
    calls = []  # the oracle: the order in which the shared layers run in a forward pass
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.append(n)) for n in cost.layers]
    model(x)
    for h in hooks:
        h.remove()
    assert cost.layers == list(dict.fromkeys(calls))
    assert cost.layers[-1] == "fc"
    two = cost.added_params(["fc", "layer3.bn2"])
    assert deeper_heads(cost, max_params=two) == ["fc", "layer3.bn2"]
    assert deeper_heads(cost, max_params=two - 1) == ["fc"]
    assert deeper_heads(cost, max_params=math.inf, max_flops=cost.base_flops) == []


def test_match_width_is_the_closest_under_the_budget(digits3):
    recipe, x = digits3
    base = sum(p.numel() for p in recipe.build_model().parameters())
    flops = forward_flops(recipe.build_model(), x)
    option, params, _ = match_width(
        recipe.build_model, [{"hidden": h} for h in range(64, 160)], params=1.1 * base, max_flops=1.2 * flops,
        example_inputs=x,
    )  # fmt: skip
    assert params <= 1.1 * base
    bigger = sum(p.numel() for p in recipe.build_model(hidden=option["hidden"] + 1).parameters())
    assert bigger > 1.1 * base


def test_paired_interval_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 6), rng.normal(0.0, 1.0, 6)
    d = paired_difference(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))
    assert d.mean == pytest.approx(np.mean(a - b))
    boot = paired_difference(a, b, how="bootstrap")
    ref = stats.bootstrap((a - b,), np.mean, method="percentile", n_resamples=10_000, random_state=1)
    ci = ref.confidence_interval
    assert boot.low == pytest.approx(ci.low, abs=0.1) and boot.high == pytest.approx(ci.high, abs=0.1)
    same = paired_difference([1.0, 2.0, 3.0], [1.5, 1.5, 3.2])
    assert not same.resolved and "not resolved" in str(same)
    assert paired_difference([2.0, 2.1, 1.9], [0.0, 0.1, 0.0]).resolved
    with pytest.raises(recon.ReconError, match="pair them"):
        paired_difference([1.0], [1.0, 2.0])


def test_a_candidates_key_is_its_architecture_not_its_name():
    assert Candidate("a", ["fc", "stem.0"]).key() == Candidate("b", {"stem.0": None, "fc": None}).key()
    assert Candidate("unsplit").key() == Candidate("heads", []).key()
    assert Candidate("a", ["fc"]).key() != Candidate("a", {"fc": [["left"], ["right", "total"]]}).key()
    assert Candidate("w", build={"hidden": 80}).key() != Candidate("unsplit").key()
