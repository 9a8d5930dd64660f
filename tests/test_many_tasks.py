"""Many tasks (issue "forty tasks"): sampled profiling, task gradients in chunks, planning at K = 40."""

from __future__ import annotations

import copy
import json

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
