"""The step engine (recon._loop): one step against per-task autograd, observers, the non-finite stop, the
precision hook, the loop's stopping rules and the shard weighting."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recon
from recon import _distributed
from recon._errors import NonFiniteLossError
from recon._loop import FullPrecision, Observer, StepEngine
from recon.methods import resolve
from tests.models import TwoHeads as Net

TASKS = ("a", "b")
LOSSES = {t: F.cross_entropy for t in TASKS}


def batches(n: int, seed: int = 0, size: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 5, generator=g), {t: torch.randint(0, 3, (size,), generator=g) for t in TASKS})
        for _ in range(n)
    ]


def engine_for(net: nn.Module, method: str = "mean", lr: float = 0.1, **kwargs) -> StepEngine:
    m = resolve(method).bind(list(TASKS))
    opt = torch.optim.SGD([*net.parameters(), *m.parameters()], lr=lr)
    return StepEngine(net, LOSSES, TASKS, method=m, optimizer=opt, device=torch.device("cpu"), **kwargs)


def autograd_task_grads(net: nn.Module, batch) -> dict[str, list[torch.Tensor | None]]:
    x, y = batch
    out = net(x)
    params = list(net.parameters())
    return {
        t: list(torch.autograd.grad(LOSSES[t](out[t], y[t]), params, retain_graph=True, allow_unused=True))
        for t in TASKS
    }


class Spy(Observer):
    wants_gradients = True

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.J: list[torch.Tensor] = []

    def on_gradients(self, engine, grads):
        self.events.append(("gradients", engine.step))
        self.J.append(grads.J.clone())

    def on_step(self, engine, losses):
        self.events.append(("step", engine.step, tuple(losses)))

    def on_epoch_end(self, engine, epoch, n_steps):
        self.events.append(("epoch", epoch, n_steps))


def test_one_step_equals_per_task_autograd_and_the_mean_update():
    torch.manual_seed(0)
    net = Net()
    reference = copy.deepcopy(net)
    batch = batches(1)[0]
    spy = Spy()
    engine = engine_for(net, observers=[spy])
    losses = engine.run_step(batch)

    grads = autograd_task_grads(reference, batch)
    names = [n for n, _ in reference.named_parameters()]
    x, y = batch
    out = reference(x)
    assert losses == pytest.approx([LOSSES[t](out[t], y[t]).item() for t in TASKS])
    # J's rows: each task's gradient of the shared trunk, flattened in parameter order
    shared = [i for i, n in enumerate(names) if n.startswith("trunk")]
    for k, t in enumerate(TASKS):
        expected = torch.cat([grads[t][i].reshape(-1) for i in shared])
        torch.testing.assert_close(spy.J[0][k], expected)
    # SGD step: the trunk moves by the mean of the task gradients, each head by its own task's gradient
    for i, ((name, p), q) in enumerate(zip(net.named_parameters(), reference.parameters(), strict=True)):
        if name.startswith("trunk"):
            g = (grads["a"][i] + grads["b"][i]) / 2
        else:
            g = grads[name.split(".")[1]][i]
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * g)
    assert all(p.grad is None for p in net.parameters())  # .grad is not kept between steps


def test_a_loss_weighting_method_matches_recon_backward_and_observers_still_see_task_gradients():
    torch.manual_seed(1)
    net = Net()
    twin = copy.deepcopy(net)
    batch = batches(1)[0]
    spy = Spy()
    engine = engine_for(net, "uncertainty", observers=[spy])
    engine.run_step(batch)

    grads = autograd_task_grads(copy.deepcopy(twin), batch)
    method = resolve("uncertainty").bind(list(TASKS))
    opt = torch.optim.SGD([*twin.parameters(), *method.parameters()], lr=0.1)
    x, y = batch
    out = twin(x)
    recon.backward({t: LOSSES[t](out[t], y[t]) for t in TASKS}, twin, method)
    opt.step()
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    expected = torch.stack([torch.cat([g[i].reshape(-1) for i in (0, 1)]) for g in grads.values()])
    torch.testing.assert_close(spy.J[0], expected)


def test_hooks_run_in_order_and_the_loop_stops_at_max_steps_and_on_empty_passes():
    spy = Spy()
    engine = engine_for(Net(), observers=[spy])
    data = batches(3)
    assert engine.run(data, epochs=2) == 6
    kinds = [e[0] for e in spy.events]
    assert kinds == (["gradients", "step"] * 3 + ["epoch"]) * 2
    assert [e for e in spy.events if e[0] == "epoch"] == [("epoch", 0, 3), ("epoch", 1, 3)]

    spy.events.clear()
    assert engine.run(data, epochs=None, max_steps=engine.step + 4) == 4  # endless epochs, cut by steps
    assert sum(e[0] == "step" for e in spy.events) == 4
    assert engine.run(iter(batches(2)), epochs=None) == 2  # a one-shot iterator: stops once it is used up


def test_a_non_finite_loss_stops_before_any_update_and_names_task_and_step():
    net = Net()
    before = [p.detach().clone() for p in net.parameters()]
    losses = {"a": F.cross_entropy, "b": lambda out, y: F.cross_entropy(out, y) * float("nan")}
    m = resolve("mean").bind(list(TASKS))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    engine = StepEngine(net, losses, TASKS, method=m, optimizer=opt, device=torch.device("cpu"), step=7)
    with pytest.raises(NonFiniteLossError) as info:
        engine.run_step(batches(1)[0])
    assert (info.value.task, info.value.step) == ("b", 7)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


class ScalingPrecision(FullPrecision):
    """A precision hook that records its calls, scales the losses by 4 and reports ``ok`` from ``unscale``
    (False: overflowing gradients, the step is skipped)."""

    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.calls: list[str] = []

    def autocast(self):
        self.calls.append("autocast")
        return contextlib.nullcontext()

    def scale(self, values):
        self.calls.append("scale")
        return [v * 4.0 for v in values]

    def unscale(self, grads, *, update=True):
        self.calls.append("unscale")
        grads.J.div_(4.0)
        return self.ok

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()


@pytest.mark.parametrize("ok", [True, False])
def test_the_precision_hook_wraps_forward_scales_the_task_gradients_and_can_skip_the_step(ok):
    torch.manual_seed(2)
    net = Net()
    reference = copy.deepcopy(net)
    batch = batches(1)[0]
    spy = Spy()
    precision = ScalingPrecision(ok)
    engine_for(net, observers=[spy], precision=precision).run_step(batch)
    moved = not all(torch.equal(p, q) for p, q in zip(net.parameters(), reference.parameters(), strict=True))
    if not ok:  # overflow: the step is skipped whole, no optimizer step and nothing observed
        assert precision.calls == ["autocast", "scale", "unscale"]
        assert not moved and spy.J == []
        return
    assert precision.calls == ["autocast", "scale", "unscale", "step"] and moved
    grads = autograd_task_grads(reference, batch)  # unscaled: the observer saw the true task gradients
    expected = torch.stack([torch.cat([g[i].reshape(-1) for i in (0, 1)]) for g in grads.values()])
    torch.testing.assert_close(spy.J[0], expected)


def test_an_uneven_shard_weights_the_losses_not_the_averages(monkeypatch):
    """The one weighting scheme: a shard's losses are multiplied by its share n_r W / N before any backward."""
    batch = batches(1, size=6)[0]
    monkeypatch.setattr(_distributed, "shard", lambda inputs, targets, *rest: (inputs, targets, 0.5))
    torch.manual_seed(3)
    net = Net()
    reference = copy.deepcopy(net)
    spy = Spy()
    losses = engine_for(net, observers=[spy]).run_step(batch)
    x, y = batch
    out = reference(x)
    assert losses == pytest.approx([0.5 * LOSSES[t](out[t], y[t]).item() for t in TASKS])
    grads = autograd_task_grads(reference, batch)
    expected = torch.stack([torch.cat([g[i].reshape(-1) for i in (0, 1)]) for g in grads.values()])
    torch.testing.assert_close(spy.J[0], 0.5 * expected)
