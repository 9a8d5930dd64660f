"""recon.backward routes each gradient where it belongs, on plain, hand-split and fx-traced models."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

import recon.methods as M
from recon._backward import backward, task_gradients
from recon._errors import NonFiniteLossError, ReconError

TASKS = ("seg", "depth", "normal")


class TrunkHeads(nn.Module):
    """Shared trunk, one head per task; returns {task: output}."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 2) for t in TASKS})
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        z = self.trunk(x)
        return {t: self.heads[t](z) for t in TASKS}


class HandSplit(nn.Module):
    """Like a split model: the second trunk layer has one copy per task (nn.ModuleDict), the first is shared."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.branch = nn.ModuleDict({t: nn.Linear(8, 8) for t in TASKS})
        self.heads = nn.ModuleDict({t: nn.Linear(8, 2) for t in TASKS})

    def forward(self, x):
        z = torch.tanh(self.stem(x))
        return {t: self.heads[t](torch.tanh(self.branch[t](z))) for t in TASKS}


def make_losses(net, x, y):
    out = net(x)
    return {t: ((out[t] - y[t]) ** 2).mean() * (i + 1) for i, t in enumerate(TASKS)}


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=g)
    y = {t: torch.randn(16, 2, generator=g) for t in TASKS}
    return x, y


def oracle(net, x, y, shared_names):
    """Each task's own autograd gradient of every parameter, and the (K, P) matrix of the shared ones."""
    named = dict(net.named_parameters())
    per_task = {}
    for t in TASKS:
        loss = make_losses(net, x, y)[t]
        gs = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        per_task[t] = dict(zip(named, gs, strict=True))
    J = torch.stack([torch.cat([per_task[t][n].reshape(-1) for n in shared_names]) for t in TASKS])
    return per_task, J


@pytest.mark.parametrize("method", ["mean", "pcgrad", "mgda", "cagrad", "upgrad", "gradops", "graddrop"])
@pytest.mark.parametrize("model_cls", [TrunkHeads, HandSplit])
def test_shared_get_the_methods_update_and_task_params_their_own_gradient(method, model_cls):
    torch.manual_seed(0)
    net = model_cls()
    x, y = data()
    shared_names = [n for n, _ in net.named_parameters() if n.startswith(("trunk", "stem"))]
    per_task, J = oracle(net, x, y, shared_names)
    torch.manual_seed(7)
    expected = M.get(method)(J)
    torch.manual_seed(7)
    result = backward(make_losses(net, x, y), net, method)
    named = dict(net.named_parameters())
    assert [id(p) for p in result.shared] == [id(named[n]) for n in shared_names]
    got = torch.cat([named[n].grad.reshape(-1) for n in shared_names])
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-5)
    for n, p in named.items():
        if n in shared_names:
            continue
        owners = [t for t in TASKS if per_task[t][n] is not None]
        if not owners:
            assert p.grad is None
            continue
        assert len(owners) == 1
        assert torch.allclose(p.grad, per_task[owners[0]][n], atol=1e-7)


def test_works_on_an_fx_graph_module_and_with_explicit_shared():
    torch.manual_seed(0)
    net = torch.fx.symbolic_trace(HandSplit())
    x, y = data(1)
    shared_names = ["stem.weight", "stem.bias"]
    per_task, J = oracle(net, x, y, shared_names)
    named = dict(net.named_parameters())
    res = backward(make_losses(net, x, y), net, "upgrad")
    first = {n: p.grad.clone() for n, p in named.items()}
    net.zero_grad()
    res2 = backward(make_losses(net, x, y), net, "upgrad", shared=res.shared)
    for n, p in named.items():
        assert torch.allclose(p.grad, first[n])
    assert res2.shared == res.shared
    got = torch.cat([named[n].grad.reshape(-1) for n in shared_names])
    assert torch.allclose(got, M.get("upgrad")(J), atol=1e-6)
    assert torch.allclose(named["branch.seg.weight"].grad, per_task["seg"]["branch.seg.weight"])


@pytest.mark.parametrize("known_shared", [False, True])
def test_accumulates_like_tensor_backward(known_shared):
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    shared = list(net.trunk.parameters()) if known_shared else None
    backward(make_losses(net, x, y), net, "mean", shared=shared)
    once = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    backward(make_losses(net, x, y), net, "mean", shared=shared)
    for n, p in net.named_parameters():
        if n in once:
            assert torch.allclose(p.grad, 2 * once[n])


def test_joint_mean_equals_plain_backward_of_the_mean_loss_on_shared_params():
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    losses = make_losses(net, x, y)
    ref = torch.autograd.grad(sum(losses.values()) / 3, list(net.trunk.parameters()), retain_graph=True)
    backward(losses, net, "mean")
    for p, g in zip(net.trunk.parameters(), ref, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-7)


def test_torchjd_aggregator_and_callable_methods():
    ta = pytest.importorskip("torchjd.aggregation")
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    shared_names = [n for n, _ in net.named_parameters() if n.startswith("trunk")]
    _, J = oracle(net, x, y, shared_names)
    named = dict(net.named_parameters())
    for method, expected in ((ta.UPGrad(), ta.UPGrad()(J)), (lambda J: J.max(dim=0).values, J.max(dim=0).values)):
        net.zero_grad()
        res = backward(make_losses(net, x, y), net, method)
        got = torch.cat([named[n].grad.reshape(-1) for n in shared_names])
        assert torch.allclose(got, expected, atol=1e-6)
        assert res.weights is None
    with pytest.raises(ReconError, match=r"must return a \(\d+,\) update"):
        backward(make_losses(net, x, y), net, lambda J: J)


def test_loss_weighting_is_one_backward_of_the_weighted_sum():
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    m = M.get("uncertainty").bind(TASKS)
    with torch.no_grad():
        m.log_vars.copy_(torch.tensor([0.0, 1.0, -1.0]))
    losses = make_losses(net, x, y)
    w = 0.5 * torch.exp(-torch.tensor([0.0, 1.0, -1.0]))
    params = list(net.parameters())
    ref = torch.autograd.grad(
        sum(w[i] * losses[t] for i, t in enumerate(TASKS)), params, retain_graph=True, allow_unused=True
    )
    res = backward(losses, net, m)
    assert torch.allclose(res.weights, w)
    for p, g in zip(params, ref, strict=True):
        assert (p.grad is None) if g is None else torch.allclose(p.grad, g, atol=1e-7)
    assert m.log_vars.grad is not None
    with pytest.raises(ReconError, match="bind"):
        backward(make_losses(net, x, y), net, "uncertainty")


def test_representation_methods_use_the_features_gradients():
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    z = net.trunk(x)
    out = {t: net.heads[t](z) for t in TASKS}
    losses = {t: ((out[t] - y[t]) ** 2).mean() * (i + 1) for i, t in enumerate(TASKS)}
    R = torch.stack([torch.autograd.grad(losses[t], z, retain_graph=True)[0].reshape(-1) for t in TASKS])
    alpha = M.get("mgda").weights(R @ R.T)
    ref = torch.autograd.grad(
        sum(alpha[i] * losses[t] for i, t in enumerate(TASKS)),
        list(net.parameters()),
        retain_graph=True,
        allow_unused=True,
    )
    res = backward(losses, net, "mgda_ub", features=z)
    assert torch.allclose(res.weights, alpha, atol=1e-6)
    for p, g in zip(net.parameters(), ref, strict=True):
        assert (p.grad is None) if g is None else torch.allclose(p.grad, g, atol=1e-6)
    with pytest.raises(ReconError, match="features="):
        backward(make_losses(net, x, y), net, "mgda_ub")


def test_gradnorm_without_features_weights_every_gradient():
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    m = M.get("gradnorm").bind(TASKS)
    with torch.no_grad():
        m.weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
    shared_names = [n for n, _ in net.named_parameters() if n.startswith("trunk")]
    per_task, J = oracle(net, x, y, shared_names)
    res = backward(make_losses(net, x, y), net, m)
    named = dict(net.named_parameters())
    got = torch.cat([named[n].grad.reshape(-1) for n in shared_names])
    assert torch.allclose(got, res.weights @ J, atol=1e-6)
    assert torch.allclose(named["heads.depth.weight"].grad, 1.0 * per_task["depth"]["heads.depth.weight"])
    assert m.weights.grad is not None


def test_non_finite_loss_names_the_task_and_step():
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    losses = make_losses(net, x, y)
    losses["depth"] = losses["depth"] * float("nan")
    with pytest.raises(NonFiniteLossError) as info:
        backward(losses, net, "pcgrad", step=12)
    assert (info.value.task, info.value.step) == ("depth", 12)


def test_bad_inputs_are_recon_errors():
    net = TrunkHeads()
    x, y = data()
    with pytest.raises(ReconError, match="non-empty dict"):
        backward({}, net, "mean")
    with pytest.raises(ReconError, match="scalar"):
        backward({"a": net(x)["seg"]}, net, "mean")
    with pytest.raises(ReconError, match="unknown method"):
        backward(make_losses(net, x, y), net, "nope")


def test_dwa_through_backward_and_end_epoch():
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    m = M.get("dwa")
    for _epoch in range(3):
        for _ in range(2):
            net.zero_grad()
            res = backward(make_losses(net, x, y), net, m)
        m.end_epoch()
    assert int(m.epochs) == 3
    assert res.weights.shape == (3,) and float(res.weights.sum()) == pytest.approx(3.0)


def test_task_gradients_with_a_known_partition_equal_discovery_and_keep_the_callers_grads():
    """Known partition: task k's backward writes into J[k] in place; the result equals the autograd.grad path."""
    torch.manual_seed(0)
    net = TrunkHeads()
    x, y = data()
    params = list(net.parameters())
    found = task_gradients(list(make_losses(net, x, y).values()), params)
    before = [torch.randn_like(p) for p in params]
    for p, g in zip(params, before, strict=True):
        p.grad = g.clone()
    known = task_gradients(list(make_losses(net, x, y).values()), params, shared_idx=found.shared_idx)
    assert torch.equal(known.J, found.J)
    assert known.own == found.own
    for i, k in found.own:
        assert torch.equal(known.rows[k][i], found.rows[k][i])
    for p, g in zip(params, before, strict=True):  # the caller's .grad are put back untouched
        assert torch.equal(p.grad, g)
    # mixed dtypes cannot be views of one J: the copying path, checked against autograd
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    values = [(a.float() * b).sum(), (a * b.double()).pow(2).sum()]
    ref = [torch.cat([g.double() for g in torch.autograd.grad(v, [a, b], retain_graph=True)]) for v in values]
    mixed = task_gradients(values, [a, b], shared_idx=[0, 1])
    assert mixed.J.dtype == torch.float64
    assert torch.allclose(mixed.J, torch.stack(ref))


# --- a loss scale (fp16) through every kind of method -----------------------------------------------------------
def _scaled_equals_plain(make, method, **kwargs):
    """``recon.backward`` with a power-of-two loss scale fills the same ``.grad`` as without one (the scale is
    undone exactly before the method and on every ``.grad``)."""
    from recon._precision import Precision

    grads = []
    for precision in (None, Precision("fp16", init_scale=2.0**10)):
        torch.manual_seed(0)
        net, losses, extra = make()
        res = backward(losses, net, method, precision=precision, **extra, **kwargs)
        assert res.finite
        grads.append([None if p.grad is None else p.grad.clone() for p in net.parameters()])
        if precision is not None:
            assert precision.skipped == 0 and precision.growth_tracker == 1  # one decision per step
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def _trunk_heads():
    net = TrunkHeads()
    x, y = data()
    z = net.trunk(x)
    losses = {t: ((net.heads[t](z) - y[t]) ** 2).mean() * (i + 1) for i, t in enumerate(TASKS)}
    return net, losses, {"features": z}


def _rotograd():
    backbone = nn.Linear(5, 4)
    net = M.RotoGrad(backbone, {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)}, latent_size=4)
    out = net(torch.randn(8, 5))
    return net, {"a": out["a"].pow(2).mean(), "b": (out["b"] - 1).pow(2).mean()}, {}


@pytest.mark.parametrize("method", ["mgda_ub", "uncertainty", "pcgrad", "gradnorm", "rotograd"])
def test_a_loss_scale_is_undone_for_every_kind_of_method(method):
    if method == "rotograd":
        _scaled_equals_plain(_rotograd, method)
    elif method == "mgda_ub":
        _scaled_equals_plain(_trunk_heads, method)
    else:
        _scaled_equals_plain(lambda: (*_trunk_heads()[:2], {}), M.get(method).bind(list(TASKS)))


def test_an_overflowing_scale_reports_a_skipped_step():
    from recon._precision import Precision

    net, losses, _ = _trunk_heads()
    amp = Precision("fp16", init_scale=2.0**140)
    res = backward(losses, net, M.get("uncertainty").bind(list(TASKS)), precision=amp)
    assert not res.finite and amp.skipped == 1 and amp.scale_value == 2.0**139
