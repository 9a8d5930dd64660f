"""The interference score (issue 18 item 2): the profiler's Gram matrices against per-task autograd, the
planner's use of it, old profiles without Gram matrices."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import recon
from recon._errors import ReconError
from recon._plan import removed_score
from tests.models import FAMILIES

TASKS3 = ("seg", "depth", "normal")


def _regression_data(family, tasks, n_steps: int, batch: int = 6):
    g = torch.Generator().manual_seed(1)
    out = []
    for s in range(n_steps):
        x = family.inputs(batch, seed=s)
        out.append((x, {t: torch.randn(batch, 2, generator=g) for t in tasks}))
    return out


def _loss(output, target):
    return F.mse_loss(output.reshape(target.shape[0], -1)[:, :2], target)


def oracle_grams(model, data, tasks, layers, lr: float) -> np.ndarray:
    """Independent reference: per step, one autograd.grad per task on a copy of the model, each shared layer's
    Gram matrix of the flattened per-task gradients (float64), then the joint SGD update the profiler takes
    (shared parameters: the mean over tasks; a task's own parameters: its gradient)."""
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    out = []
    for x, y in data:
        outputs = model(x)
        if not isinstance(outputs, dict):
            outputs = dict(zip(tasks, outputs, strict=True))
        grads = [
            torch.autograd.grad(_loss(outputs[t], y[t]), params, retain_graph=True, allow_unused=True) for t in tasks
        ]
        step = []
        for layer in layers:
            idx = [i for i, n in enumerate(names) if n.rpartition(".")[0] == layer]
            flat = torch.stack(
                [
                    torch.cat([(g[i] if g[i] is not None else torch.zeros_like(params[i])).reshape(-1) for i in idx])
                    for g in grads
                ]
            ).double()
            step.append((flat @ flat.T).numpy())
        out.append(step)
        for i, p in enumerate(params):
            got = [g[i] for g in grads if g[i] is not None]
            p.grad = None if not got else (got[0] if len(got) == 1 else torch.stack(got).sum(0) / len(tasks))
        opt.step()
    return np.array(out)  # (steps, layers, K, K)


def _profile_and_oracle(family_name: str, tasks=TASKS3, steps: int = 4):
    fam = dataclasses.replace(FAMILIES[family_name], tasks=tasks)
    model = fam.model(seed=0)
    data = _regression_data(fam, tasks, steps)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prof = recon.profile(model, data, dict.fromkeys(tasks, _loss), steps=steps, optimizer=opt, tasks=fam.tasks_arg)
    return prof, oracle_grams(reference, data, list(tasks), prof.layers, lr=0.05)


@pytest.mark.parametrize("family", ["mlp", "resnet", "unet"])  # MLP, conv + BatchNorm, tuple outputs
def test_interference_equals_per_task_autograd(family: str) -> None:
    prof, grams = _profile_and_oracle(family)
    K = len(TASKS3)
    iu = np.triu_indices(K, 1)
    expected = -grams[:, :, iu[0], iu[1]].sum(axis=2).mean(axis=0)  # mean over steps of sum_{i<j} -<g_i, g_j>
    scale = np.abs(grams).max()
    frame = prof.scores(score="interference")
    got = frame["score"].reindex(prof.layers).to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(frame["interference"].reindex(prof.layers), expected, rtol=1e-4, atol=1e-6 * scale)
    # the stored rows: K squared norms, then the pairs in the cosines' order
    stored = np.asarray(prof.gram_array, dtype=np.float64)
    np.testing.assert_allclose(stored[:, :, :K], np.diagonal(grams, axis1=2, axis2=3), rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(stored[:, :, K:], grams[:, :, iu[0], iu[1]], rtol=1e-4, atol=1e-6 * scale)
    # S-conflict is untouched: the sort by score is the sort by the count of cos < S
    s = prof.scores()
    assert s.attrs["score"] == "s-conflict" and s["score"].dtype.kind == "i"
    assert (np.diff(s["score"].to_numpy()) <= 0).all()


def test_a_group_partition_removes_the_interference_of_the_pairs_it_separates() -> None:
    tasks = ("seg", "depth", "normal", "edge")
    prof, grams = _profile_and_oracle("mlp", tasks=tasks, steps=3)
    partitions = [[["seg", "depth"], ["normal", "edge"]], [["seg"], ["depth", "normal", "edge"]], [list(tasks)]]
    for layer_index, layer in enumerate(prof.layers):
        matrix = prof.interference_matrix(layer)
        assert (np.diag(matrix.to_numpy()) == 0).all() and np.allclose(matrix, matrix.T)
        for part in partitions:
            label = {t: g for g, group in enumerate(part) for t in group}
            separated = [(i, j) for i, j in itertools.combinations(range(4), 2) if label[tasks[i]] != label[tasks[j]]]
            expected = -sum(grams[:, layer_index, i, j] for i, j in separated) if separated else np.zeros(1)
            got = removed_score(matrix.to_numpy(), part, tasks)
            assert isinstance(got, float)
            scale = np.abs(grams).max()
            assert got == pytest.approx(float(np.mean(expected)), rel=1e-4, abs=1e-6 * scale)


@pytest.fixture(scope="module")
def deep_profile():
    from tests.test_plan import TASKS4, Deep, _data

    torch.manual_seed(0)
    model = Deep()
    data = _data(lambda g, b: torch.randn(b, 6, generator=g))
    prof = recon.profile(model, data, {t: F.cross_entropy for t in TASKS4}, steps=8, S=0.0)
    return prof, model, data[0][0]


@pytest.mark.parametrize("groups", ["none", "auto"])
@pytest.mark.parametrize("budget", [0.05, 0.2, 0.6, 2.0])
def test_the_planner_stays_in_budget_and_never_picks_a_non_positive_interference(deep_profile, groups, budget):
    prof, model, x = deep_profile
    base = sum(p.numel() for p in model.parameters())
    matrices = {layer: prof.interference_matrix(layer).to_numpy() for layer in prof.layers}
    try:
        plan = recon.plan_split(prof, model, budget_params=budget, groups=groups, score="interference")
    except ReconError as e:
        assert "no layer fits" in str(e) or "positive interference" in str(e)
        return
    assert plan.extra["score"] == "interference"
    assert sum(plan.extra["params_added"].values()) <= budget * base
    ranked = list(prof.scores(score="interference").index)  # confidence: over the band the plan draws from
    k = max(ranked.index(layer) for layer in plan.layers) + 1
    assert plan.extra["confidence_k"] == k
    assert plan.extra["p_top_k"] == {
        n: round(float(prof.confidence(k, score="interference")[n]), 4) for n in plan.layers
    }
    for layer, part in plan.groups.items():
        removed = removed_score(matrices[layer], part, prof.tasks)
        assert removed > 0 and removed == pytest.approx(plan.extra["removed"][layer])
    # optimal among the positive options: brute force over every per-layer choice (none or one partition)
    from recon._plan import _layer_options

    _, options = _layer_options(prof, copy.deepcopy(model).eval(), groups, 0.0, [], "interference")
    assert all(o.score > 0 for opts in options for o in opts)
    best = max(
        sum(o.score for o in combo if o is not None)
        for combo in itertools.product(*[[None, *opts] for opts in options])
        if sum(o.params for o in combo if o is not None) <= budget * base
    )
    assert sum(plan.extra["removed"].values()) == pytest.approx(best)


def test_negative_interference_is_never_branched(deep_profile, monkeypatch) -> None:
    """With every layer's interference made negative except one, plans hold that layer alone; with none
    positive, planning is a one-line error."""
    prof, model, _ = deep_profile
    real = prof.interference()
    keep = prof.layers.index("l3")
    fake = -np.abs(real) - 1e-3
    fake[keep] = np.abs(real[keep]) + 1e-3
    monkeypatch.setattr(type(prof), "interference", lambda self: fake)
    plan = recon.plan_split(prof, model, budget_params=10.0, groups="auto", score="interference")
    assert plan.layers == ["l3"]
    top = recon.plan_split(prof, model, top_k=3, score="interference")
    assert top.layers == ["l3"] and top.top_k == 3
    monkeypatch.setattr(type(prof), "interference", lambda self: -np.abs(real) - 1e-3)
    with pytest.raises(ReconError, match="no shared layer has positive interference"):
        recon.plan_split(prof, model, budget_params=10.0, score="interference")


def test_a_profile_without_gram_matrices_still_loads_and_says_how_to_get_interference(tmp_path) -> None:
    from tests.test_plan import TASKS4, Deep, _data

    torch.manual_seed(0)
    model = Deep()
    data = _data(lambda g, b: torch.randn(b, 6, generator=g), n_steps=3)
    prof = recon.profile(model, data, {t: F.cross_entropy for t in TASKS4}, steps=3, out=tmp_path / "p")
    assert (tmp_path / "p" / "gram.npy").exists()
    assert "interference" in (tmp_path / "p" / "scores.csv").read_text().splitlines()[0]
    full = recon.ConflictProfile.load(tmp_path / "p").scores()
    (tmp_path / "p" / "gram.npy").unlink()  # what a profile of the previous release holds
    meta = json.loads((tmp_path / "p" / "profile.json").read_text())
    old = recon.ConflictProfile.load(tmp_path / "p")
    assert old.tasks == meta["tasks"] and not old.has_gram
    frame = old.scores()
    assert "interference" not in frame.columns
    assert frame["score"].equals(full["score"]) and frame.index.equals(full.index)
    for call in (
        lambda: old.scores(score="interference"),
        lambda: recon.plan_split(old, model, budget_params=0.5, score="interference"),
        lambda: recon.plan_split(old, model, top_k=1, score="interference"),
    ):
        with pytest.raises(ReconError, match="no Gram matrices.*re-run `recon profile`") as info:
            call()
        assert "\n" not in str(info.value)
    assert recon.plan_split(old, model, top_k=2).layers == list(full.index[:2])
    with pytest.raises(ReconError, match="score='cosine' is not one of"):
        prof.scores(score="cosine")
