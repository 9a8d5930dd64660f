"""Two gloo processes on CPU give the same scores and updates as one process on the global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

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


def test_a_failing_process_stops_all_with_its_message(tmp_path):
    recipe = tmp_path / "model.py"
    recipe.write_text(FAILING_RECIPE)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    start = time.monotonic()
    res = subprocess.run(
        [*torchrun, "-m", "cli.main", "profile", str(recipe), "--out", "runs/r", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert res.returncode != 0
    assert "rank one broke on purpose" in res.stderr + res.stdout
    assert elapsed < 120
    # nothing looks complete: no profile.json unless it is marked partial
    profile_json = tmp_path / "runs/r/profile/profile.json"
    assert not profile_json.exists() or json.loads(profile_json.read_text())["partial"] is True
