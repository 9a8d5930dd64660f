"""Stage 1: the profiler's cosines against independent per-task autograd, scores, discovery, persistence."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recon
from recon._cosines import CosineRecorder
from recon._errors import NonFiniteLossError, ReconError
from recon._profile import ConflictProfile

TASKS = ("a", "b", "c")


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.bn1(self.conv1(x)))))


class BranchyNet(nn.Module):
    """Residual trunk with BatchNorm; ``only_a`` is a trunk layer that feeds task ``a`` alone; per-task heads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = ResBlock(4)
        self.fc = nn.Linear(4, 8)
        self.only_a = nn.Linear(8, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 3) for t in TASKS})

    def forward(self, x):
        z = self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))
        return {
            "a": self.heads["a"](torch.tanh(self.only_a(z))),
            "b": self.heads["b"](z),
            "c": self.heads["c"](z),
        }


LOSSES = {t: F.cross_entropy for t in TASKS}


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(6, 1, 5, 5, generator=g), {t: torch.randint(0, 3, (6,), generator=g) for t in TASKS})
        for _ in range(n)
    ]


def oracle_cosines(model: nn.Module, data, steps: int) -> list[dict[tuple[str, str, str], float]]:
    """Independent reference: one forward and one autograd.grad per task, then the same joint update."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    out = []
    for x, y in data[:steps]:
        grads = {}
        for t in TASKS:
            loss = LOSSES[t](model(x)[t], y[t])
            grads[t] = torch.autograd.grad(loss, params, allow_unused=True)
        layers = sorted({n.rpartition(".")[0] for n in names})
        record = {}
        for layer in layers:
            idx = [i for i, n in enumerate(names) if n.rpartition(".")[0] == layer]
            flat = {
                t: torch.cat([(g[i] if g[i] is not None else torch.zeros_like(params[i])).reshape(-1) for i in idx])
                for t, g in grads.items()
            }
            for i, a in enumerate(TASKS):
                for b in TASKS[i + 1 :]:
                    if flat[a].norm() > 0 and flat[b].norm() > 0:
                        record[(layer, a, b)] = F.cosine_similarity(flat[a], flat[b], dim=0).item()
        out.append(record)
        for i, p in enumerate(params):
            got = [g[i] for g in grads.values() if g[i] is not None]
            p.grad = None if not got else (got[0] if len(got) == 1 else torch.stack(got).sum(0) / len(TASKS))
        opt.step()
    return out


@pytest.mark.parametrize("model_cls", ["BranchyNet", "Untraceable"])  # fx and autograd discovery
def test_cosines_match_independent_autograd(model_cls):
    torch.manual_seed(0)
    model = globals()[model_cls]()
    data = batches(4)
    expected = oracle_cosines(model, data, steps=4)
    prof = recon.profile(model, data, LOSSES, steps=4, chunk=3)  # chunk < steps: exercises the streaming path
    assert prof.steps == 4
    assert prof.discovery == ("fx" if model_cls == "BranchyNet" else "autograd")
    frame = prof.cosines.dropna()
    assert len(frame) > 0
    for row in frame.itertuples():
        assert row.cos == pytest.approx(expected[row.step][(row.layer, row.task_a, row.task_b)], abs=1e-5)
    # every pair the oracle defines among shared layers was recorded
    recorded = {(r.step, r.layer, r.task_a, r.task_b) for r in frame.itertuples()}
    for step, rec in enumerate(expected):
        for layer, a, b in rec:
            if layer in prof.layers:
                assert (step, layer, a, b) in recorded


def test_shared_layer_discovery_excludes_single_task_layers():
    prof = recon.profile(BranchyNet(), batches(1), LOSSES, steps=1)
    assert "only_a" not in prof.layers
    assert not any(layer.startswith("heads.") for layer in prof.layers)
    assert prof.layers == ["stem", "block.conv1", "block.bn1", "block.conv2", "fc"]
    assert prof.layer_info["fc"]["tasks"] == list(TASKS)


class Untraceable(BranchyNet):
    """Data-dependent control flow: torch.fx cannot trace it, so discovery falls back to autograd."""

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 2
        return super().forward(x)


def test_autograd_fallback_finds_the_same_shared_layers():
    prof = recon.profile(Untraceable(), batches(1), LOSSES, steps=1)
    assert prof.discovery == "autograd"
    assert prof.layers == ["stem", "block.conv1", "block.bn1", "block.conv2", "fc"]


def test_task_tuple_outputs_follow_losses_order():
    class TupleNet(BranchyNet):
        def forward(self, x):
            out = super().forward(x)
            return out["a"], out["b"], out["c"]

    torch.manual_seed(1)
    a = recon.profile(TupleNet(), batches(2), LOSSES, steps=2, seed=3)
    torch.manual_seed(1)
    b = recon.profile(BranchyNet(), batches(2), LOSSES, steps=2, seed=3)
    np.testing.assert_allclose(a.cosine_array, b.cosine_array, atol=1e-6)


def hand_profile(tmp_path, cos: np.ndarray, tasks=("a", "b", "c"), layers=("l1", "l2")) -> ConflictProfile:
    rec = CosineRecorder(tmp_path / "cosines.npy", cos.shape[1], cos.shape[2], device=torch.device("cpu"), chunk=2)
    for row in cos:
        rec.append(torch.from_numpy(row))
    rec.close()
    return ConflictProfile(tasks=list(tasks), layers=list(layers), folder=tmp_path)


def test_scores_on_a_hand_built_table(tmp_path):
    nan = np.nan
    # steps x layers x pairs (a-b, a-c, b-c)
    cos = np.array(
        [
            [[-0.5, 0.0, 0.3], [nan, -0.2, -0.9]],
            [[-0.1, -1e-7, nan], [0.9, nan, -0.5]],
            [[0.0, 0.0, 0.0], [-0.6, -0.4, 0.1]],
        ],
        dtype=np.float32,
    )
    prof = hand_profile(tmp_path, cos)
    s0 = prof.scores(0.0)
    # l1: -0.5, -0.1, -1e-7 are < 0; exact 0.0 is not (strict <); NaN is skipped
    assert s0.loc["l1", "score"] == 3
    assert s0.loc["l2", "score"] == 5
    assert list(s0.index) == ["l2", "l1"]
    s = prof.scores(-0.45)
    assert s.loc["l1", "score"] == 1 and s.loc["l2", "score"] == 3
    assert s0["score"].dtype.kind == "i"
    assert s0.loc["l1", "conflict_rate"] == pytest.approx(3 / 8)
    assert s0.loc["l2", "mean_cos"] == pytest.approx(np.nanmean(cos[:, 1, :]), abs=1e-6)
    assert prof.top_layers(1) == ["l2"]
    assert prof.top_layers(1, S=-0.95) == ["l1"]  # a tie at 0: model order decides
    with pytest.raises(ReconError, match="exceeds the 2 shared layers"):
        prof.top_layers(3)
    with pytest.raises(ReconError, match="-1 < S <= 0"):
        prof.scores(0.5)


def test_scores_upper_bound_and_recompute_for_other_S():
    prof = recon.profile(BranchyNet(), batches(5), LOSSES, steps=5)
    bound = prof.steps * 3
    for S in (0.0, -0.1, -0.5, -0.99):
        scores = prof.scores(S)["score"]
        assert ((scores >= 0) & (scores <= bound)).all()
    cos = prof.cosines
    for S in (0.0, -0.3):
        expected = cos[cos["cos"] < S].groupby("layer", observed=False).size()
        for layer, value in prof.scores(S)["score"].items():
            assert value == expected.get(layer, 0)


def test_zero_gradient_pairs_are_skipped():
    losses = {"a": F.cross_entropy, "b": lambda out, y: (out * 0.0).sum(), "c": F.cross_entropy}
    prof = recon.profile(BranchyNet(), batches(2), losses, steps=2)
    cos = prof.cosines
    with_b = cos[(cos.task_a == "b") | (cos.task_b == "b")]
    assert with_b["cos"].isna().all()
    assert cos[(cos.task_a == "a") & (cos.task_b == "c")]["cos"].notna().all()
    assert prof.scores(-0.0)["score"].max() <= prof.steps  # only the a-c pair can count


def test_save_load_and_official_scores_json(tmp_path):
    prof = recon.profile(BranchyNet(), batches(3), LOSSES, steps=3, S=-0.1)
    prof.save(tmp_path / "p")
    for name in ("profile.json", "cosines.npy", "scores.csv", "scores.json", "losses.csv"):
        assert (tmp_path / "p" / name).stat().st_size > 0
    loaded = recon.ConflictProfile.load(tmp_path / "p")
    assert loaded.tasks == prof.tasks and loaded.layers == prof.layers and loaded.S == -0.1
    np.testing.assert_array_equal(loaded.cosine_array, prof.cosine_array)
    assert loaded.scores().equals(prof.scores())
    official = recon.read_scores_json(tmp_path / "p" / "scores.json")
    assert official == {k: int(v) for k, v in prof.scores()["score"].items()}
    assert list(official.values()) == sorted(official.values(), reverse=True)
    assert np.load(tmp_path / "p" / "cosines.npy").shape == (3, len(prof.layers), 3)


def test_interrupt_keeps_what_was_recorded(tmp_path):
    def data():
        for i, batch in enumerate(batches(10)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt) as info:
        recon.profile(BranchyNet(), data, LOSSES, out=tmp_path / "p")
    prof = info.value.profile
    assert prof.partial and prof.steps == 3
    loaded = recon.ConflictProfile.load(tmp_path / "p")
    assert loaded.partial and loaded.steps == 3


def test_non_finite_loss_names_task_and_step(tmp_path):
    calls = {"n": 0}

    def flaky(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * math.nan if calls["n"] == 3 else loss

    losses = {"a": F.cross_entropy, "b": flaky, "c": F.cross_entropy}
    with pytest.raises(NonFiniteLossError, match="task 'b' is nan at step 2") as info:
        recon.profile(BranchyNet(), batches(5), losses, out=tmp_path / "p")
    assert info.value.profile.steps == 2 and info.value.profile.partial


def test_bad_arguments_are_clear():
    with pytest.raises(ReconError, match="at least two tasks"):
        recon.profile(BranchyNet(), batches(1), {"a": F.cross_entropy}, tasks=["a"])
    with pytest.raises(ReconError, match="not valid Python identifiers"):
        recon.profile(BranchyNet(), batches(1), {"a.b": F.cross_entropy, "c": F.cross_entropy})
    with pytest.raises(ReconError, match="returned a tensor"):
        recon.profile(nn.Linear(3, 3), [(torch.randn(2, 3), {"a": 0, "b": 0})], {"a": F.mse_loss, "b": F.mse_loss})


def test_steps_beyond_a_one_shot_iterator_stop_when_it_runs_out():
    prof = recon.profile(BranchyNet(), iter(batches(3)), LOSSES, steps=10)
    assert prof.steps == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_cosine_kernel_against_float64_per_layer_products(dtype):
    """Spans of J across block boundaries, layers made of several parameters, and a parameter of a measured
    layer that only one task reached (it may only add to that task's diagonal)."""
    from recon._backward import TaskGradients
    from recon._gram import LayerCosines

    torch.manual_seed(0)
    K = 3
    sizes = [300_000, 7, 5, 11, 4]  # the first one spans several column blocks
    params = [torch.zeros(n, dtype=dtype) for n in sizes]
    layer_params = [(0, 0), (0, 1), (1, 2), (1, 4)]  # parameter 3 belongs to no measured layer
    shared_idx = [0, 1, 2, 3]
    J = torch.randn(K, sum(sizes[i] for i in shared_idx), dtype=dtype)
    own_grad = torch.randn(4, dtype=dtype)
    rows = [[None] * len(sizes) for _ in range(K)]
    rows[2][4] = own_grad
    grads = TaskGradients(J, rows, [(4, 2)], shared_idx)
    got = LayerCosines(params, layer_params, 2, K)(grads, torch.device("cpu"))

    J64 = J.double()
    full = [torch.cat([J64[k], torch.zeros(4, dtype=torch.float64)]) for k in range(K)]
    full[2][-4:] = own_grad.double()
    layer_cols = [range(0, 300_007), [*range(300_007, 300_012), *range(300_023, 300_027)]]
    for layer, cols in enumerate(layer_cols):
        idx = torch.tensor(list(cols))
        M = torch.stack([f[idx] for f in full])
        for p, (a, b) in enumerate(zip(*torch.triu_indices(K, K, 1).tolist(), strict=True)):
            expected = F.cosine_similarity(M[a], M[b], dim=0).item()
            assert got[layer, p].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_running_counts_equal_one_pass_over_the_file(tmp_path, chunk):
    """The counts kept while streaming (any chunk size) equal the counts of the whole array read back."""
    from recon._cosines import ConflictCounts

    rng = np.random.default_rng(chunk)
    cos = rng.uniform(-1, 1, size=(7, 3, 6)).astype(np.float32)
    cos[rng.random(cos.shape) < 0.2] = np.nan
    cos[0, 0, 0] = -0.25  # exactly at S: strict < does not count it
    rec = CosineRecorder(tmp_path / "c.npy", 3, 6, device=torch.device("cpu"), chunk=chunk, S=-0.25)
    for row in cos:
        rec.append(torch.from_numpy(row))
    rec.close()
    whole = ConflictCounts.of(np.load(tmp_path / "c.npy"), -0.25)
    assert rec.counts.steps == whole.steps == 7
    np.testing.assert_array_equal(rec.counts.below, (cos < -0.25).sum(axis=0))
    np.testing.assert_array_equal(rec.counts.below, whole.below)
    np.testing.assert_array_equal(rec.counts.valid, (~np.isnan(cos)).sum(axis=0))
    np.testing.assert_allclose(rec.counts.total, np.nansum(cos.astype(np.float64), axis=0), rtol=1e-12)


def test_the_end_of_a_profile_reads_no_cosine_back_and_another_S_reads_it_once(tmp_path, monkeypatch):
    import recon._profile as rp

    reads = []
    monkeypatch.setattr(rp, "open_cosines", lambda path: reads.append("array") or np.load(path, mmap_mode="r"))
    monkeypatch.setattr(rp, "read_shape", lambda path: reads.append("header") or (0,))
    prof = recon.profile(BranchyNet(), batches(4), LOSSES, steps=4, S=-0.1, out=tmp_path / "p")  # saves scores
    prof.scores(), prof.conflict_rates(), prof.top_layers(2), prof.export_scores_json(tmp_path / "s.json")
    assert prof.steps == 4 and reads == []
    cos = np.load(tmp_path / "p" / "cosines.npy")
    for S in (-0.1, -0.3, -0.3):
        expected = (cos < S).sum(axis=(0, 2))
        assert [int(prof.scores(S)["score"][layer]) for layer in prof.layers] == expected.tolist()
    assert reads == ["array"]  # S = -0.3 once, then kept; the profiled S = -0.1 came from the running counts


def test_a_process_other_than_rank_0_writes_nothing_and_keeps_the_same_scores(monkeypatch):
    from recon import _distributed

    torch.manual_seed(0)
    model = BranchyNet()
    main = recon.profile(copy.deepcopy(model), batches(3), LOSSES, steps=3, chunk=2)
    monkeypatch.setattr(_distributed, "is_main", lambda: False)

    def no_temporary_folder(*args, **kwargs):
        raise AssertionError("a non-zero rank made a temporary folder")

    monkeypatch.setattr("tempfile.TemporaryDirectory", no_temporary_folder)
    other = recon.profile(model, batches(3), LOSSES, steps=3, chunk=2)
    assert other.folder is None and other.steps == 3
    assert other.scores().drop(columns="mean_cos").equals(main.scores().drop(columns="mean_cos"))
    np.testing.assert_allclose(other.scores()["mean_cos"], main.scores()["mean_cos"], rtol=1e-12)
    assert other.losses.equals(main.losses)
    with pytest.raises(ReconError, match="only rank 0"):
        _ = other.cosines
