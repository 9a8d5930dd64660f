"""Batched task gradients (one vmapped backward pass) equal the K sequential passes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import recon
from recon._backward import _batched, task_gradients
from tests.models import FAMILIES, task_losses


def _losses(model, fam, seed=0):
    return list(task_losses(model(fam.inputs(seed=seed)), fam.tasks).values())


def _assert_same(a, b, atol=1e-5):
    assert a.shared_idx == b.shared_idx
    assert a.own == b.own
    if b.J is None:
        assert a.J is None
    else:
        torch.testing.assert_close(a.J, b.J, atol=atol, rtol=1e-5)
    for i, k in b.own:
        torch.testing.assert_close(a.rows[k][i], b.rows[k][i], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_batched_equals_sequential(name):
    fam = FAMILIES[name]
    model = fam.model()
    params = [p for p in model.parameters() if p.requires_grad]
    first = task_gradients(_losses(model, fam), params, batched=True)  # learns the partition (K passes)
    assert first.users is not None
    for seed in (1, 2):  # known partition (as the loops pass it) and rediscovery from the remembered one
        shared = first.shared_idx if seed == 1 else None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # vmap runs on every family here: no fallback notice
            got = task_gradients(_losses(model, fam, seed), params, shared_idx=shared, batched=True)
        want = task_gradients(_losses(model, fam, seed), params, shared_idx=shared, batched=False)
        _assert_same(got, want)
    memo = _batched._memo(params)
    assert memo.tried and not memo.failed  # the vmapped pass really ran


class _HostScale(torch.autograd.Function):
    """A custom function whose backward leaves torch (numpy): vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.detach().numpy() * 2)


class _HostNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        z = _HostScale.apply(self.trunk(x))
        return {"a": self.a(z).mean(), "b": self.b(z).pow(2).mean()}


def test_falls_back_once_per_model_with_one_notice():
    torch.manual_seed(0)
    net = _HostNet()
    params = list(net.parameters())
    x = torch.randn(5, 3)
    known = task_gradients(list(net(x).values()), params, batched=True).shared_idx
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = task_gradients(list(net(x).values()), params, shared_idx=known, batched=True)
        second = task_gradients(list(net(x).values()), params, shared_idx=known, batched=True)
    notices = [w for w in caught if "batched task gradients" in str(w.message)]
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    want = task_gradients(list(net(x).values()), params, shared_idx=known, batched=False)
    _assert_same(first, want)
    _assert_same(second, want)
    assert _batched._memo(params).failed


def test_auto_is_sequential_on_cpu():
    fam = FAMILIES["mlp"]
    model = fam.model()
    params = list(model.parameters())
    known = task_gradients(_losses(model, fam), params, batched="auto").shared_idx
    task_gradients(_losses(model, fam), params, shared_idx=known, batched="auto")
    assert not _batched._memo(params).tried


def test_bad_batched_value():
    fam = FAMILIES["mlp"]
    model = fam.model()
    with pytest.raises(recon.ReconError, match="batched="):
        task_gradients(_losses(model, fam), list(model.parameters()), batched="yes")


@pytest.mark.parametrize("method", ["mean", "pcgrad", "cagrad"])
def test_backward_batched_fills_the_same_grad(method):
    fam = FAMILIES["resnet"]
    grads = []
    for batched in (False, True):
        model = fam.model()
        shared = None
        for seed in range(2):  # the second step runs batched (the first learns the partition)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)  # PCGrad's random task order
            values = task_losses(model(fam.inputs(seed=seed)), fam.tasks)
            shared = recon.backward(values, model, method, shared=shared, batched=batched).shared
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
