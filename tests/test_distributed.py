"""Two gloo processes on CPU give the same scores and updates as one process on the global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import recon

TASKS = ("a", "b", "c")
LOSSES = {t: F.cross_entropy for t in TASKS}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 3) for t in TASKS})

    def forward(self, x):
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def batches(n: int = 4, size: int = 10):  # 10 over 2 processes; a batch of 7 also checks uneven shards
    g = torch.Generator().manual_seed(0)
    sizes = [size] * (n - 1) + [7]
    return [(torch.randn(s, 5, generator=g), {t: torch.randint(0, 3, (s,), generator=g) for t in TASKS}) for s in sizes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = Net()
        if job == "profile":
            prof = recon.profile(net, batches(), LOSSES, steps=4)
            if rank == 0:
                np.save(out, prof.cosine_array)
        else:
            recon.train(
                net, batches(), LOSSES, method=job, epochs=1, optimizer=torch.optim.SGD(net.parameters(), lr=0.1)
            )
            if rank == 0:
                torch.save(net.state_dict(), out)
    finally:
        dist.destroy_process_group()


def run_two(job: str, out) -> None:
    mp.spawn(_worker, args=(2, free_port(), job, str(out)), nprocs=2, join=True)


def test_profile_scores_equal_single_process(tmp_path):
    run_two("profile", tmp_path / "cos.npy")
    torch.manual_seed(0)
    single = recon.profile(Net(), batches(), LOSSES, steps=4)
    np.testing.assert_allclose(np.load(tmp_path / "cos.npy"), single.cosine_array, atol=1e-5)


@pytest.mark.parametrize("method", ["pcgrad", "cagrad"])
def test_training_step_equals_single_process(tmp_path, method):
    run_two(method, tmp_path / "state.pt")
    torch.manual_seed(0)
    net = Net()
    recon.train(net, batches(), LOSSES, method=method, epochs=1, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=1e-5)


FAILING_RECIPE = textwrap.dedent(
    """
    import os, torch, torch.nn.functional as F
    from torch import nn

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))

        def forward(self, x):
            out = self.body(x)
            return {"a": out[:, :2], "b": out[:, 2:]}

    def build_model():
        return Two()

    losses = {"a": F.mse_loss, "b": F.mse_loss}

    def train_data():
        for i in range(1000):
            if i == 3 and os.environ.get("RANK") == "1":
                raise RuntimeError("rank one broke on purpose")
            yield torch.randn(8, 4), {"a": torch.zeros(8, 2), "b": torch.ones(8, 2)}
    """
)


def torchrun_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m cli.main ARGS`` on the CPU (gloo), output captured."""
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    return subprocess.run(
        [*torchrun, "-m", "cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
    )  # fmt: skip


def test_a_failing_process_stops_all_with_its_message(tmp_path):
    recipe = tmp_path / "model.py"
    recipe.write_text(FAILING_RECIPE)
    start = time.monotonic()
    res = torchrun_cli("profile", str(recipe), "--out", "runs/r", "--device", "cpu", cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert res.returncode != 0
    assert "rank one broke on purpose" in res.stderr + res.stdout
    assert elapsed < 120
    # nothing looks complete: no profile.json unless it is marked partial
    profile_json = tmp_path / "runs/r/profile/profile.json"
    assert not profile_json.exists() or json.loads(profile_json.read_text())["partial"] is True


# --- each process loads only its shard -------------------------------------------------------------------------
class Recorded(torch.utils.data.Dataset):
    """A map-style dataset that remembers which samples this process loaded."""

    def __init__(self, n: int = 37, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, generator=g)
        self.y = {t: torch.randint(0, 3, (n,), generator=g) for t in TASKS}
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.loaded.append(int(i))
        return self.x[i], {t: self.y[t][i] for t in TASKS}


def accuracy(output, target) -> float:
    return float((output.argmax(1) == target).float().mean())


class WholeSetMedian:
    """A whole-set metric (the median over every sample of the target class's probability): not a mean of batch
    values, so sharded evaluation must see every process's samples."""

    def reset(self) -> None:
        self.values: list[torch.Tensor] = []

    def update(self, output, target) -> None:
        self.values.append(output.softmax(1).gather(1, target[:, None])[:, 0])

    def compute(self) -> float:
        return float(torch.cat(self.values).median())


def metrics():
    return {t: {"acc": (accuracy, "higher"), "median": (WholeSetMedian(), "higher")} for t in TASKS}


def _loader_run(folder=None, on_epoch=None, dataset=None):
    """The DataLoader recipe: profile one epoch, then train PCGrad for two epochs with sharded evaluation."""
    dataset = dataset if dataset is not None else Recorded()
    torch.manual_seed(0)
    prof = recon.profile(Net(), torch.utils.data.DataLoader(dataset, batch_size=10, shuffle=True), LOSSES, epochs=1)
    profile_loaded, dataset.loaded = dataset.loaded, []
    net = Net()
    result = recon.train(
        net, lambda: torch.utils.data.DataLoader(dataset, batch_size=10, shuffle=True), LOSSES, method="pcgrad",
        epochs=2, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), out=folder, on_epoch=on_epoch,
        val_data=torch.utils.data.DataLoader(Recorded(23, seed=1), batch_size=8), metrics=metrics(),
    )  # fmt: skip
    return prof, profile_loaded, net, result


def shards(rank: int = 0, world_size: int = 1):
    """A recipe function that yields its process's shard of every global batch of ``batches()``."""
    for x, y in batches():
        lo, hi = len(x) * rank // world_size, len(x) * (rank + 1) // world_size
        yield x[lo:hi], {t: v[lo:hi] for t, v in y.items()}


def _loader_worker(rank: int, world: int, port: int, tmp: str) -> None:
    import tempfile
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mine = Path(tmp) / f"rank{rank}"
    (mine / "tmp").mkdir(parents=True)
    tempfile.tempdir = str(mine / "tmp")  # the profile's temporary cosine folder would go here
    # torch.optim imports torch._dynamo, which makes its own (empty) cache folder in the temp folder: elsewhere
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / f"inductor{rank}")
    try:
        dataset = Recorded()
        marks: list[int] = []
        prof, profile_loaded, net, result = _loader_run(
            mine / "train", lambda epoch, record: marks.append(len(dataset.loaded)), dataset
        )
        torch.manual_seed(0)
        keyword = Net()
        recon.train(keyword, shards, LOSSES, method="pcgrad", optimizer=torch.optim.SGD(keyword.parameters(), lr=0.1))
        loaded = [None] * world
        dist.all_gather_object(loaded, {"profile": profile_loaded, "train": dataset.loaded, "marks": marks})
        if rank == 0:
            torch.save(
                {
                    "cos": torch.from_numpy(np.asarray(prof.cosine_array).copy()),
                    "state": net.state_dict(),
                    "history": json.dumps(result.history.drop(columns="seconds").to_dict("list")),
                    "keyword": keyword.state_dict(),
                    "loaded": loaded,
                },
                Path(tmp) / "out.pt",
            )
        del prof
    finally:
        dist.destroy_process_group()


def test_dataloader_recipe_shards_equal_one_process_and_only_rank_zero_writes(tmp_path):
    mp.spawn(_loader_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)

    # every training sample is loaded by exactly one process per epoch (profile: 1 epoch, train: 2)
    per_rank = got["loaded"]
    assert sorted(per_rank[0]["profile"] + per_rank[1]["profile"]) == list(range(37))
    assert all(len(r["profile"]) in (18, 19) for r in per_rank)  # each loads only its half
    for epoch in range(2):
        lo = [0 if epoch == 0 else r["marks"][0] for r in per_rank]
        seen = [i for r, start in zip(per_rank, lo, strict=True) for i in r["train"][start : r["marks"][epoch]]]
        assert sorted(seen) == list(range(37))

    # scores, PCGrad steps and evaluation (sums and a whole-set metric) equal one process on the same batches
    prof, _, net, result = _loader_run()
    np.testing.assert_allclose(got["cos"].numpy(), prof.cosine_array, atol=1e-5)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(got["state"][key], value, atol=1e-5, rtol=1e-5)
    history = json.loads(got["history"])
    for column, values in result.history.drop(columns="seconds").to_dict("list").items():
        np.testing.assert_allclose(history[column], values, atol=1e-5, err_msg=column)

    # a recipe taking rank/world_size yields its own shard: same PCGrad step as one process
    torch.manual_seed(0)
    keyword = Net()
    recon.train(keyword, batches(), LOSSES, method="pcgrad", optimizer=torch.optim.SGD(keyword.parameters(), lr=0.1))
    for key, value in keyword.state_dict().items():
        torch.testing.assert_close(got["keyword"][key], value, atol=1e-5, rtol=1e-5)

    # only rank 0 touches the disk: rank 1's temporary and run folders stay empty
    assert [p for p in (tmp_path / "rank1").rglob("*") if p.name != "tmp"] == []
    assert list((tmp_path / "rank0" / "tmp").iterdir()) == []  # rank 0's temporary profile folder went with it
    assert (tmp_path / "rank0" / "train" / "checkpoint.pt").exists()


def _notice_worker(rank: int, world: int, port: int, out: str) -> None:
    import warnings

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recon.train(Net(), batches(), LOSSES, method="mean")
        notices = [str(w.message) for w in caught if "reads the full global batch" in str(w.message)]
        with open(f"{out}.{rank}", "w") as f:
            json.dump(notices, f)
    finally:
        dist.destroy_process_group()


def test_plain_iterable_keeps_slicing_with_one_notice(tmp_path):
    mp.spawn(_notice_worker, args=(2, free_port(), str(tmp_path / "n")), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "n.0").read_text())
    assert len(rank0) == 1 and "\n" not in rank0[0]
    assert json.loads((tmp_path / "n.1").read_text()) == []  # rank 0 alone prints


def _average_worker(rank: int, world: int, port: int, out: str) -> None:
    from recon import _distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        big = torch.randn(3, (_distributed._IN_PLACE_BYTES // 4) // 3 + 5, generator=g)  # J-sized: in place
        small = [torch.randn(7, generator=g), torch.randn(2, 3, generator=g).t(), torch.randn(4, generator=g).double()]
        tensors = [big, *small]
        originals = [t.clone() for t in tensors]
        calls, all_reduce = [], dist.all_reduce

        def spy(t, *args, **kwargs):
            calls.append((t.data_ptr(), t.numel(), t.dtype))
            return all_reduce(t, *args, **kwargs)

        dist.all_reduce = spy
        try:
            _distributed.average_(tensors, weight=0.5 + rank)
        finally:
            dist.all_reduce = all_reduce
        # J itself is reduced (no K x P copy); the small ones in one bucket per dtype
        assert calls[0] == (big.data_ptr(), big.numel(), big.dtype)
        assert sorted((n, str(d)) for _, n, d in calls[1:]) == [(4, "torch.float64"), (13, "torch.float32")]
        everyone = [None] * world
        dist.all_gather_object(everyone, originals)
        if rank == 0:
            for i, t in enumerate(tensors):
                want = sum(o[i] * (0.5 + r) for r, o in enumerate(everyone)) / world
                torch.testing.assert_close(t, want.to(t.dtype))
            with open(out, "w") as f:
                f.write("ok")
    finally:
        dist.destroy_process_group()


def test_average_is_in_place_and_bucketed(tmp_path):
    mp.spawn(_average_worker, args=(2, free_port(), str(tmp_path / "ok")), nprocs=2, join=True)
    assert (tmp_path / "ok").read_text() == "ok"
