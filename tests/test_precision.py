"""Mixed precision: bf16 cosines and scores against float32, exact resume, fp16's loss scale (GradScaler's rule)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recon
from recon._backward import TaskGradients
from recon._precision import Precision
from tests.conftest import EXAMPLE
from tests.models import MLP, TASKS

LOSSES = {t: F.cross_entropy for t in TASKS}


def data(n: int = 8, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 8, generator=g), {t: torch.randint(0, 2, (size,), generator=g) for t in TASKS})
        for _ in range(n)
    ]


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(TASKS)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05)


# --- the object ---------------------------------------------------------------------------------------------
def test_unknown_precision_is_one_line_listing_the_choices():
    with pytest.raises(recon.ReconError) as e:
        Precision("16")
    assert "32, bf16, fp16" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(recon.ReconError):
        recon.train(net(), data(1), LOSSES, precision="half")


def test_autocast_runs_the_forward_in_half_and_leaves_gradients_float32():
    model = net()
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with Precision(mode).autocast():
            out = model(data(1)[0][0])
        assert out[TASKS[0]].dtype == dtype
        loss = sum(F.cross_entropy(out[t].float(), data(1)[0][1][t]) for t in TASKS)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert all(g.dtype == torch.float32 for g in grads)  # float32 parameters: float32 J
    with Precision("32").autocast():
        assert model(data(1)[0][0])[TASKS[0]].dtype == torch.float32


def _grads(J: torch.Tensor) -> TaskGradients:
    return TaskGradients(J, [[None], [None]], [], [0])


def test_fp16_overflow_skips_halves_and_counts_then_grows_after_clean_steps():
    amp = Precision("fp16", init_scale=8.0, growth_interval=2)
    J = torch.tensor([[8.0, 16.0], [24.0, 32.0]])
    assert amp.unscale(_grads(J))
    torch.testing.assert_close(J, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # unscaled in place
    assert (amp.scale_value, amp.growth_tracker, amp.skipped) == (8.0, 1, 0)
    assert not amp.unscale(_grads(torch.tensor([[1.0, float("inf")], [0.0, 0.0]])))
    assert (amp.scale_value, amp.growth_tracker, amp.skipped) == (4.0, 0, 1)  # backoff 0.5, counted
    assert not amp.unscale(_grads(torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])))
    assert (amp.scale_value, amp.skipped) == (2.0, 2)
    assert amp.unscale(_grads(torch.ones(2, 2))) and amp.scale_value == 2.0
    assert amp.unscale(_grads(torch.ones(2, 2))) and amp.scale_value == 4.0  # x2 after growth_interval clean steps
    state = amp.state_dict()
    again = Precision("fp16")
    again.load_state_dict(state)
    assert again.state_dict() == state
    with pytest.raises(recon.ReconError, match="--precision fp16"):
        Precision("bf16").load_state_dict(state)


def test_growth_defaults_are_gradscalers():
    scaler = torch.amp.GradScaler("cpu")
    amp = Precision("fp16")
    assert amp.scale_value == scaler.get_scale()
    assert amp.growth_interval == scaler.get_growth_interval()
    assert amp.backoff_factor == scaler.get_backoff_factor()
    assert amp.growth_factor == scaler.get_growth_factor()


def test_forced_overflow_in_training_skips_the_step():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    amp = Precision("fp16", init_scale=2.0**140)  # float32 losses times 2^140 overflow: inf gradients
    recon.train(model, data(1), LOSSES, method="pcgrad", optimizer=sgd(model), precision=amp)
    assert amp.skipped == 1 and amp.scale_value == 2.0**139
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no optimizer step


@pytest.mark.parametrize("method", ["pcgrad", "uncertainty", "gradnorm", "dwa"])
def test_fp16_loss_scale_is_undone_exactly(method):
    """A power-of-two scale is exact: training with scale 2^8 equals training with scale 1 (every method kind:
    the K scaled task passes for gradient methods, the scaled combined loss for loss-weighting ones)."""
    states = []
    for scale in (1.0, 2.0**8):
        model = net()
        amp = Precision("fp16", init_scale=scale)
        torch.manual_seed(0)
        recon.train(model, data(3), LOSSES, method=method, optimizer=sgd(model), precision=amp, epochs=2)
        assert amp.skipped == 0
        states.append(model.state_dict())
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, atol=1e-6, rtol=1e-6)


# --- bf16 against float32 ---------------------------------------------------------------------------------
def test_bf16_profile_is_close_to_float32():
    """Same batches, same start; plain SGD keeps the two warm-up trajectories together (Adam's sign-like first
    steps would amplify bf16's rounding into a different trajectory, not a different measurement)."""
    batches = data(8, size=32)
    profs = {}
    for mode in ("32", "bf16"):
        torch.manual_seed(0)
        model = MLP(TASKS, hidden=64)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        profs[mode] = recon.profile(model, batches, LOSSES, precision=mode, optimizer=opt)
    a, b = profs["32"].cosine_array, profs["bf16"].cosine_array
    assert a.shape == b.shape and a.shape[0] == 8
    np.testing.assert_allclose(b, a, atol=2e-2)
    T, pairs = a.shape[0], a.shape[2]
    diff = (profs["bf16"].scores()["score"] - profs["32"].scores()["score"]).abs()
    assert (diff <= 0.02 * T * pairs).all()
    assert profs["bf16"].meta["precision"] == "bf16"


def test_bf16_training_resumes_bit_exactly(tmp_path):
    model = net()
    recon.train(model, data(3), LOSSES, method="cagrad", precision="bf16", epochs=2, out=tmp_path / "whole")
    half = net()
    recon.train(half, data(3), LOSSES, method="cagrad", precision="bf16", epochs=1, out=tmp_path / "half")
    resumed = net()
    recon.train(
        resumed, data(3), LOSSES, method="cagrad", precision="bf16", epochs=2, out=tmp_path / "half", resume=True
    )
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["precision"] == "bf16"


def test_fp16_resume_restores_the_scale(tmp_path):
    def run(epochs, folder, resume=False):
        model = net()
        amp = Precision("fp16", growth_interval=2)
        recon.train(
            model, data(3), LOSSES, method="mean", optimizer=sgd(model), precision=amp, epochs=epochs,
            out=folder, resume=resume,
        )  # fmt: skip
        return model, amp

    whole, amp_whole = run(2, tmp_path / "w")
    run(1, tmp_path / "h")
    resumed, amp_resumed = run(2, tmp_path / "h", resume=True)
    assert amp_whole.scale_value == 2.0**16 * 2**3  # 6 clean steps, growth every 2
    assert amp_resumed.state_dict() == amp_whole.state_dict()
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_cli_precision_option(cli, tmp_path):
    res = cli("profile", str(EXAMPLE), "--steps", "2", "--out", "runs/r", "--precision", "bf16", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "runs/r/profile/profile.json").read_text())["precision"] == "bf16"
    bad = cli("train", str(EXAMPLE), "--out", "runs/r", "--precision", "fp8", "--epochs", "1", "--device", "cpu")
    assert bad.returncode == 2 and "32, bf16, fp16" in bad.stderr + bad.stdout
