"""Many tasks (issue "forty tasks"): sampled profiling, task gradients in chunks, planning at K = 40."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

import recon
from recon._errors import ReconError
from tests.test_profile import LOSSES, BranchyNet, batches


def _plain_loop(model, data, method="mean"):
    """The oracle: recon.backward with the method on every step, Adam as the profiler's default."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        recon.backward({t: LOSSES[t](out[t], y[t]) for t in LOSSES}, model, method, batched=False)
        opt.step()
    return model


def _assert_same_weights(a, b, tol):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p.float(), q.float(), atol=tol, rtol=0), name


def test_every_one_is_the_full_profile(tmp_path):
    torch.manual_seed(0)
    model = BranchyNet()
    data = batches(5)
    default = recon.profile(copy.deepcopy(model), data, LOSSES, out=tmp_path / "a")
    every1 = recon.profile(copy.deepcopy(model), data, LOSSES, out=tmp_path / "b", every=1)
    np.testing.assert_array_equal(default.cosine_array, every1.cosine_array)
    assert (default.steps, every1.steps, every1.total_steps, every1.every) == (5, 5, 5, 1)
    assert "recorded" not in json.loads((tmp_path / "b" / "profile.json").read_text())
    assert every1.steps_text() == "5 steps"


@pytest.mark.parametrize("every", [2, 3])
def test_every_n_records_its_steps_and_trains_like_a_plain_loop(tmp_path, every):
    torch.manual_seed(0)
    model = BranchyNet()
    data = batches(7)
    full_model, sampled_model = copy.deepcopy(model), copy.deepcopy(model)
    full = recon.profile(full_model, data, LOSSES, out=tmp_path / "full")
    sampled = recon.profile(sampled_model, data, LOSSES, out=tmp_path / "sampled", every=every)
    recorded = list(range(0, 7, every))
    assert (sampled.steps, sampled.total_steps, sampled.every) == (len(recorded), 7, every)
    meta = json.loads((tmp_path / "sampled" / "profile.json").read_text())
    assert meta["recorded"] == recorded and meta["steps"] == len(recorded) and meta["total_steps"] == 7
    assert sorted(sampled.cosines["step"].unique()) == recorded
    # the recorded cosines are the full profile's at the same steps (the runs differ by float rounding only)
    np.testing.assert_allclose(sampled.cosine_array, full.cosine_array[recorded], atol=1e-4)
    # the steps in between train exactly as the mean method does: same weights as a plain loop
    _assert_same_weights(sampled_model, _plain_loop(copy.deepcopy(model), data), tol=1e-5)
    _assert_same_weights(full_model, _plain_loop(copy.deepcopy(model), data), tol=1e-5)
    assert sampled.steps_text() == f"{len(recorded)} recorded of 7 steps (1 in {every})"
    loaded = recon.ConflictProfile.load(tmp_path / "sampled")
    assert (loaded.steps, loaded.total_steps, loaded.every) == (len(recorded), 7, every)


def test_every_auto_and_bad_values():
    assert recon.sampling_period("auto", 40) == 39
    assert recon.sampling_period("auto", 2) == 1
    assert recon.sampling_period("5", 3) == 5
    for bad in (0, -1, "x", 1.5, True):
        with pytest.raises(ReconError, match="every"):
            recon.sampling_period(bad, 3)


def test_cli_every_says_what_it_recorded(cli, tmp_path):
    from tests.test_cli_profile import recipe

    path = recipe(tmp_path)
    res = cli("profile", str(path), "--every", "3", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())  # the table's title may wrap
    assert "on 1 step in 3;" in text and "2 recorded of 4 steps (1 in 3)" in text
    meta = json.loads((tmp_path / "run" / "profile" / "profile.json").read_text())
    assert (meta["every"], meta["recorded"], meta["total_steps"]) == (3, [0, 3], 4)
    bad = cli("profile", str(path), "--every", "0", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "every" in bad.stderr and not (tmp_path / "bad").exists()


# --- task gradients in chunks --------------------------------------------------------------------------------
K5 = tuple(f"t{k}" for k in range(5))


class FiveTasks(torch.nn.Module):
    """A shared trunk, a layer two of the five tasks share, one layer only t4 uses, a head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12))
        self.pair = torch.nn.Linear(12, 12)  # t0 and t1 only
        self.solo = torch.nn.Linear(12, 12)  # t4 only
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(12, 2) for t in K5})

    def forward(self, x):
        z = torch.tanh(self.trunk(x))
        p = torch.tanh(self.pair(z))
        inputs = {"t0": p, "t1": p, "t4": torch.tanh(self.solo(z))}
        return {t: self.heads[t](inputs.get(t, z)) for t in K5}


def _five_losses(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = model(torch.randn(16, 6, generator=g))
    return {t: torch.nn.functional.cross_entropy(out[t], torch.randint(0, 2, (16,), generator=g)) for t in K5}


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_chunked_gram_and_whole_j_equal_the_unchunked_ones(size, batched):
    from recon._backward import task_gradients
    from recon._chunks import TaskChunks

    torch.manual_seed(0)
    model = FiveTasks()
    params = list(model.parameters())
    full = task_gradients(list(_five_losses(model).values()), params, retain_graph=True)  # discovers the set
    shared = full.shared_idx
    J = full.J.double()
    for _ in range(2):  # the batched path learns each chunk's partition on its first step
        chunks = TaskChunks(list(_five_losses(model).values()), params, shared, size=size, batched=batched)
        grams = chunks.param_grams()
    m = -(-5 // size)
    assert chunks.passes == m + (m - 1) * (m - 2) // 2
    offset = 0
    for j, i in enumerate(shared):  # per parameter, against float64 products of the unchunked J
        n = params[i].numel()
        expect = J[:, offset : offset + n] @ J[:, offset : offset + n].T
        torch.testing.assert_close(grams[j].double(), expect, atol=1e-5, rtol=1e-5)
        offset += n
    torch.testing.assert_close(chunks.gram().double(), J @ J.T, atol=1e-5, rtol=1e-5)
    whole = TaskChunks(list(_five_losses(model).values()), params, shared, size=size, batched=batched).whole()
    torch.testing.assert_close(whole.J, full.J, atol=1e-6, rtol=1e-6)
    assert sorted(whole.own) == sorted(full.own)
    for i, k in full.own:
        torch.testing.assert_close(whole.rows[k][i], full.rows[k][i], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["mean", "sum", "pcgrad", "cagrad", "mgda", "imtl_g", "upgrad", "nashmtl"])
def test_backward_in_chunks_equals_the_unchunked_backward(method):
    torch.manual_seed(1)
    model = FiveTasks()
    torch.manual_seed(2)  # PCGrad's random order comes from the global RNG
    first = recon.backward(_five_losses(model), model, method)
    expect = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = first.weights
    for size in (2, 3):
        model.zero_grad(set_to_none=True)
        m = recon.methods.get(method)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(2)
            result = recon.backward(_five_losses(model), model, m, shared=first.shared, task_chunk=size)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expect[n], atol=1e-5, rtol=1e-4, msg=f"{method} {size} {n}")
        torch.testing.assert_close(result.weights, weights, atol=1e-5, rtol=1e-4)
        needs_j = method == "nashmtl"
        assert any("needs the whole task-gradient matrix" in str(w.message) for w in caught) == needs_j or size > 2


@pytest.mark.parametrize("method", ["joint", "cagrad"])
def test_profile_in_chunks_equals_the_unchunked_profile(method):
    torch.manual_seed(0)
    model = FiveTasks()
    data = [(x, {t: torch.randint(0, 2, (8,)) for t in K5}) for x in torch.randn(4, 8, 6)]
    losses = dict.fromkeys(K5, torch.nn.functional.cross_entropy)
    whole = recon.profile(copy.deepcopy(model), data, losses, method=method)
    for size in (2, 3):
        chunked_model = copy.deepcopy(model)
        chunked = recon.profile(chunked_model, data, losses, method=method, task_chunk=size)
        np.testing.assert_allclose(chunked.cosine_array, whole.cosine_array, atol=1e-5)
        assert chunked.layers == whole.layers and "pair" in whole.layers and "solo" not in whole.layers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("size", [2, 3])
def test_chunked_batched_gram_on_cuda_equals_the_unchunked_one(size):
    from recon._backward import task_gradients
    from recon._chunks import TaskChunks

    torch.manual_seed(0)
    model = FiveTasks().cuda()
    params = list(model.parameters())
    _five_losses_cuda = lambda: {k: v for k, v in _five_losses_on(model, "cuda").items()}  # noqa: E731
    full = task_gradients(list(_five_losses_cuda().values()), params, batched=True)
    full = task_gradients(list(_five_losses_cuda().values()), params, shared_idx=full.shared_idx, batched=True)
    for _ in range(2):
        chunks = TaskChunks(list(_five_losses_cuda().values()), params, full.shared_idx, size=size, batched=True)
        gram = chunks.gram()
    J = full.J.double()
    torch.testing.assert_close(gram.double(), J @ J.T, atol=1e-5, rtol=1e-5)


def _five_losses_on(model, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g).to(device)
    out = model(x)
    y = {t: torch.randint(0, 2, (16,), generator=g).to(device) for t in K5}
    return {t: torch.nn.functional.cross_entropy(out[t], y[t]) for t in K5}


# --- planning for many tasks ---------------------------------------------------------------------------------
def _planted_counts(n, rng, n_groups=3):
    label = rng.integers(0, n_groups, n)
    base = rng.integers(0, 5, (n, n))
    counts = np.triu(np.where(label[:, None] != label[None, :], base + 20, base), 1)
    return counts + counts.T


@pytest.mark.parametrize("n", [7, 8])
def test_groups_above_exact_size_against_every_partition(n):
    from recon._plan import _grouped, _partitions, removed_score

    rng = np.random.default_rng(n)
    tasks = [f"t{i}" for i in range(n)]
    found = total = 0
    for trial in range(6):
        counts = _planted_counts(n, rng) if trial % 2 == 0 else np.triu(rng.integers(0, 30, (n, n)), 1)
        counts = counts if trial % 2 == 0 else counts + counts.T
        best: dict[int, int] = {}
        for part in _partitions(tasks):  # brute force: every set partition
            best[len(part)] = max(best.get(len(part), -1), removed_score(counts, part, tasks))
        for part in _grouped(tasks, counts, tasks):
            assert sorted(t for g in part for t in g) == tasks  # a partition of the tasks
            score = removed_score(counts, part, tasks)
            assert score >= 0.9 * best[len(part)]
            found += score == best[len(part)]
            total += 1
            if trial % 2 == 0 and len(part) == 3:  # planted groups: found exactly
                assert score == best[3]
    assert found >= 0.85 * total


def test_plan_split_auto_groups_at_forty_tasks_is_valid_and_within_budget(tmp_path):
    from recon._profile import CosineRecorder

    tasks = [f"t{k}" for k in range(40)]
    model = Forty(tasks)
    layers = ["trunk.0", "trunk.2", "fc"]
    rng = np.random.default_rng(0)
    recorder = CosineRecorder(tmp_path / "cosines.npy", len(layers), 40 * 39 // 2, device=torch.device("cpu"))
    for _ in range(12):
        recorder.append(torch.from_numpy(rng.uniform(-1, 1, (len(layers), 780)).astype(np.float32)))
    recorder.close()
    info = {n: {"params": sum(p.numel() for p in model.get_submodule(n).parameters()), "tasks": tasks} for n in layers}
    prof = recon.ConflictProfile(tasks=tasks, layers=layers, folder=tmp_path, layer_info=info)
    base = sum(p.numel() for p in model.parameters())
    plan = recon.plan_split(prof, model, budget_params=0.3, groups="auto")
    assert plan.layers and plan.extra["params_after"] - base <= 0.3 * base
    for layer, parts in plan.groups.items():
        assert sorted(t for g in parts for t in g) == sorted(tasks) and len(parts) >= 2
        own = sum(p.numel() for p in model.get_submodule(layer).parameters(recurse=False))
        assert plan.extra["params_added"][layer] == (len(parts) - 1) * own
    net = recon.split(model, plan.layer_spec(), init="copy")
    out = net(torch.randn(3, 6))
    assert set(out) == set(tasks)
    from recon import plots

    usage = {n: frozenset(tasks) for n in ["trunk.0", "trunk.2", "fc"]}
    fig = plots.network_figure(usage, tasks, {k: tasks for k in plan.groups}, {}, groups=plan.groups)
    assert fig.get_size_inches()[0] <= 10.0  # bars, not 40 columns
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any(text.endswith("copies") for text in texts)
    from cli.split import _copies

    line = _copies([tasks[:30], tasks[30:39], tasks[39:]], len(tasks))
    assert line == "3 copies: t0+29 | t30+8 | t39"


class Forty(torch.nn.Module):
    def __init__(self, tasks):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
        self.fc = torch.nn.Linear(16, 16)
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(16, 2) for t in tasks})

    def forward(self, x):
        z = torch.relu(self.fc(torch.relu(self.trunk(x))))
        return {t: h(z) for t, h in self.heads.items()}


def test_a_sampled_profile_bootstraps_over_its_recorded_steps_only(tmp_path):
    torch.manual_seed(0)
    model = BranchyNet()
    data = batches(9)
    sampled = recon.profile(copy.deepcopy(model), data, LOSSES, out=tmp_path / "s", every=4)
    full = recon.profile(copy.deepcopy(model), data, LOSSES, out=tmp_path / "f")
    assert sampled.per_step_scores().shape == (3, len(sampled.layers))  # steps 0, 4, 8
    assert full.per_step_scores().shape == (9, len(full.layers))
    assert sampled.has_gram and np.load(tmp_path / "s" / "gram.npy").shape[0] == 3
    p = sampled.confidence(k=1)
    assert ((p >= 0) & (p <= 1)).all()
