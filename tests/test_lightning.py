"""`recon.lightning.ReconMixin`: one Lightning step equals recon.backward + optimizer.step by hand; the example runs,
also under Lightning's DDP strategy on 2 CPU processes."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import recon
from tests.conftest import ROOT
from tests.models import TwoHeads as Net

L = pytest.importorskip("lightning")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from recon.lightning import ReconMixin  # noqa: E402

TASKS = ("a", "b")


class Batches(Dataset):
    """Whole batches as items (``batch_size=None`` in the loader)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.items = [(torch.randn(16, 5, generator=g), {t: torch.randint(0, 3, (16,), generator=g) for t in TASKS})]
        self.items *= n

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def losses_of(net, batch):
    x, y = batch
    out = net(x)
    return {t: F.cross_entropy(out[t], y[t]) for t in TASKS}


class Module(ReconMixin, L.LightningModule):
    def __init__(self, net: nn.Module, method, tasks=TASKS, **options) -> None:
        super().__init__()
        self.net = net
        self.configure_recon(method, tasks=tasks, **options)

    def training_step(self, batch, batch_idx):
        return self.recon_step(losses_of(self.net, batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit(module: L.LightningModule, steps: int, **trainer_options) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_options,
    )
    trainer.fit(module, DataLoader(Batches(steps), batch_size=None))
    return trainer


@pytest.mark.parametrize("method", ["pcgrad", "cagrad:c=0.4", "uncertainty"])
def test_lightning_steps_equal_recon_backward_by_hand(method):
    torch.manual_seed(0)
    net = Net()
    hand_net = copy.deepcopy(net)
    module = Module(net, method)
    fit(module, steps=2)

    hand_method = recon.methods.resolve(method).bind(TASKS)
    opt = torch.optim.SGD([*hand_net.parameters(), *hand_method.parameters()], lr=0.1, momentum=0.9)
    for batch in Batches(2):
        opt.zero_grad()
        recon.backward(losses_of(hand_net, batch), hand_net, hand_method)
        opt.step()
    for (name, p), q in zip(net.named_parameters(), hand_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    for p, q in zip(module.recon_method.parameters(), hand_method.parameters(), strict=True):
        torch.testing.assert_close(p, q)  # a learnable method's weights are trained by the same optimiser
    assert not torch.equal(net.trunk.weight, Net().trunk.weight)


def test_losses_are_logged_and_clip_bounds_the_step():
    torch.manual_seed(0)
    module = Module(Net(), "mean", clip=1e-3)
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = fit(module, steps=1)
    assert {"train/loss_a_step", "train/loss_b_step", "train/loss_step"} <= set(trainer.logged_metrics)
    # SGD with momentum, first step: the update is lr * g; the gradients' total norm (far above 1e-3) is clipped
    # to 1e-3, so the parameters move by 0.1 * 1e-3 (up to float32 rounding of the differences)
    moved = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(module.net.parameters(), before, strict=True)])
    assert moved.norm().item() == pytest.approx(1e-4, rel=1e-3)


def test_bad_configuration_is_a_recon_error():
    with pytest.raises(recon.ReconError, match="task names"):
        Module(Net(), "pcgrad", tasks=())
    with pytest.raises(recon.ReconError, match="clip"):
        Module(Net(), "pcgrad", clip=0.0)
    with pytest.raises(recon.ReconError, match="unknown method"):
        Module(Net(), "nope")
    with pytest.raises(recon.ReconError, match="bf16-mixed"):
        fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))  # what 16-mixed is on CUDA
        fit(Module(Net(), "pcgrad"), steps=1, plugins=[fp16])


def run_example(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECON_DIGITS_TRAIN": "256", "RECON_DIGITS_VAL": "128", "RECON_LIGHTNING_LOGS": "logs"}
    script = ROOT / "examples" / "lightning_trainer.py"
    cmd = [sys.executable, str(script), "--profile-steps", "4", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_example_trains_a_split_model(tmp_path):
    res = run_example("--max-steps", "20", "--method", "cagrad:c=0.4", tmp_path=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "method cagrad:c=0.4, branched: " in res.stdout
    assert re.search(r"validation: val/acc_left \d\.\d+", res.stdout)
    assert "rank 0 step 20 parameters" in res.stdout
    logged = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/loss_left" in logged and "train/loss_right" in logged


def test_example_under_ddp_keeps_processes_identical(tmp_path):
    """Lightning's DDP strategy on 2 CPU processes (gloo): each rank draws its own shard of every batch, so the
    ranks' parameters stay equal only if recon.backward averages the task gradients across them."""
    res = run_example(
        "--max-steps", "4", "--devices", "2", "--strategy", "ddp", "--layers", "layer2.conv1", tmp_path=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d) step 4 parameters ([0-9a-f]{16})", res.stdout))  # lines may interleave
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], res.stdout
