"""Group copies trained as groups (issue 18, item 1; recon/_usage.py).

A copy of a layer split by a task partition, used by the tasks of group G, gets the method applied to G's tasks
alone; the parameters in no copy keep the global solve over all tasks on their own columns. Checked against
per-group autograd (mean) and per-group oracles: torchjd's PCGrad, scipy's SLSQP for MGDA's and CAGrad's
problems; in recon.backward, the training engine (recon.train), recon.lightning and under torchrun.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import recon
from recon._split import shared_parameters
from recon._usage import group_copies
from tests.models import FAMILIES, TASKS3, task_losses, task_matrix
from tests.test_distributed import LOSSES, batches, free_port
from tests.test_distributed import Net as DistNet
from tests.test_methods import slsqp_cagrad, slsqp_min_norm

TASKS4 = ("seg", "depth", "normal", "edge")


@dataclass(frozen=True)
class Case:
    family: str
    tasks: tuple[str, ...]
    plan: dict[str, list[list[str]]]


CASES = {
    "mlp-3": Case("mlp3", TASKS3, {"trunk.2": [["seg", "normal"], ["depth"]]}),
    "mlp-4": Case(
        "mlp",
        TASKS4,
        {"trunk.0": [["seg", "depth"], ["normal", "edge"]], "trunk.2": [["seg", "depth", "edge"], ["normal"]]},
    ),
    "resnet-4": Case(
        "resnet",
        TASKS4,
        {
            "layer1.0.conv1": [["seg", "normal"], ["depth", "edge"]],
            "layer2.1.conv2": [["seg", "depth", "normal"], ["edge"]],
        },
    ),
}


def build(case: Case, *, init: str = "reinit"):
    fam = dataclasses.replace(FAMILIES[case.family], tasks=case.tasks)
    torch.manual_seed(0)
    net = recon.split(fam.model().double(), case.plan, init=init)
    return net, fam.inputs(batch=8, dtype=torch.float64)


def groups_of(net: nn.Module, case: Case) -> dict[tuple[str, ...], list[nn.Parameter]]:
    """Each group of 2+ tasks (in task order) -> its copies' parameters, read from the plan itself."""
    out: dict[tuple[str, ...], list[nn.Parameter]] = {}
    for layer, groups in case.plan.items():
        for g in groups:
            group = tuple(t for t in case.tasks if t in g)
            if len(group) >= 2:
                out.setdefault(group, []).extend(net.get_submodule(f"{layer}.{group[0]}").parameters())
    return out


def solve_order(case: Case, groups) -> list[tuple[str, ...]]:
    """The documented order of the class solves (it fixes the RNG draws of PCGrad): classes sorted by their task
    indices, those with the same number of tasks together, sizes in the order of their first class."""
    ranked = sorted(groups, key=lambda g: [case.tasks.index(t) for t in g])
    sizes = list(dict.fromkeys(len(g) for g in ranked))
    return [g for n in sizes for g in ranked if len(g) == n]


def plain_of(net: nn.Module, groups) -> list[nn.Parameter]:
    copies = {id(p) for ps in groups.values() for p in ps}
    return [p for p in shared_parameters(net) if id(p) not in copies]


def oracle(method: str, J: torch.Tensor) -> torch.Tensor:
    if method == "pcgrad":
        from torchjd.aggregation import PCGrad

        return PCGrad()(J)
    if method == "cagrad":
        return slsqp_cagrad(J, 0.4)
    if method == "mgda":
        return slsqp_min_norm(J)
    raise AssertionError(method)


def expected_update(method: str, losses, params, tasks) -> torch.Tensor:
    """What ``params`` should get from ``tasks`` alone: autograd of the tasks' mean loss for mean, else the oracle."""
    if method == "mean":
        mean_loss = sum(losses[t] for t in tasks) / len(tasks)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean_loss, params, retain_graph=True)])
    return oracle(method, task_matrix(losses, params, tasks))


def assert_update(params, expected: torch.Tensor, tol: float) -> None:
    got = torch.cat([p.grad.reshape(-1) for p in params])
    assert float((got - expected).norm()) <= tol * max(float(expected.norm()), 1e-12), (got, expected)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", ["mean", "pcgrad", "cagrad", "mgda"])
def test_a_group_copy_gets_the_method_on_its_group_and_the_rest_the_global_solve(name: str, method: str) -> None:
    if method == "pcgrad":
        pytest.importorskip("torchjd")
    case = CASES[name]
    net, x = build(case)
    losses = task_losses(net(x), case.tasks)
    groups = groups_of(net, case)
    plain = plain_of(net, groups)
    torch.manual_seed(7)  # PCGrad's random orders: the global solve's draws, then the classes' in solve order
    expected = {(): expected_update(method, losses, plain, case.tasks)} if plain else {}
    for g in solve_order(case, groups):
        expected[g] = expected_update(method, losses, groups[g], g)
    torch.manual_seed(7)
    recon.backward(losses, net, method, retain_graph=True)
    tol = 1e-9 if method in ("mean", "pcgrad") else 1e-4  # SLSQP converges to ~1e-6
    for g, params in [((), plain), *groups.items()] if plain else groups.items():
        assert_update(params, expected[g], tol)
    for layer, gs in case.plan.items():  # a one-task copy keeps its task's own gradient
        for (t,) in (g for g in gs if len(g) == 1):
            for p in net.get_submodule(f"{layer}.{t}").parameters():
                (own,) = torch.autograd.grad(losses[t], [p], retain_graph=True)
                torch.testing.assert_close(p.grad, own, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layers", [None, ["trunk.2"]], ids=["unsplit", "per-task"])
def test_unsplit_and_per_task_splits_have_no_usage_class_and_keep_the_global_solve(layers) -> None:
    fam = dataclasses.replace(FAMILIES["mlp"], tasks=TASKS4)
    torch.manual_seed(0)
    model = fam.model().double()
    net = model if layers is None else recon.split(model, layers, init="reinit")
    assert group_copies(net, TASKS4, list(net.parameters())) == {}
    losses = task_losses(net(fam.inputs(batch=8, dtype=torch.float64)), TASKS4)
    shared = shared_parameters(net)
    torch.manual_seed(3)
    expected = recon.methods.get("pcgrad")(task_matrix(losses, shared, TASKS4))
    torch.manual_seed(3)
    recon.backward(losses, net, "pcgrad", retain_graph=True)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in shared]), expected)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to the K passes would warn
def test_batched_task_gradients_give_group_copies_the_same_update() -> None:
    """The vectorised backward (one pass for the K tasks) fills J's group-copy columns as the K passes do."""
    case = CASES["mlp-4"]
    grads = {}
    for batched in (False, True):
        net, x = build(case)
        shared = None
        for _ in range(2):  # the second step takes the batched path (the first one learns the partition)
            net.zero_grad()
            shared = recon.backward(
                task_losses(net(x), case.tasks), net, "cagrad", shared=shared, batched=batched
            ).shared
        grads[batched] = [p.grad for p in net.parameters()]
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_classes_with_the_same_number_of_tasks_share_one_host_transfer(monkeypatch) -> None:
    import recon._usage as usage

    calls = []
    real = usage.host_gram
    monkeypatch.setattr(usage, "host_gram", lambda G: calls.append(tuple(G.shape)) or real(G))
    case = CASES["resnet-4"]  # classes {seg, normal}, {depth, edge} (2 tasks) and {seg, depth, normal} (3 tasks)
    net, x = build(case)
    recon.backward(task_losses(net(x), case.tasks), net, "cagrad")
    assert calls == [(2, 2, 2)]  # the two 2-task classes in one transfer; the lone 3-task one by its method


@pytest.mark.parametrize("name", ["gradvac", "nashmtl"])
def test_stateful_methods_keep_one_state_per_group_and_resume_exactly(name: str) -> None:
    """Each group's instance follows its group's gradients only (equal to a standalone instance fed them), and
    ``state_dict`` carries the group instances, so a resumed method continues exactly."""
    case = CASES["resnet-4"]
    net, x = build(case)
    groups = groups_of(net, case)
    plain = plain_of(net, groups)
    method = recon.methods.get(name)
    alone = {g: recon.methods.get(name) for g in [(), *solve_order(case, groups)]}
    for step in range(3):
        if step == 2:  # resume from a checkpoint of the method
            state = copy.deepcopy(method.state_dict())
            method = recon.methods.get(name)
            method.load_state_dict(state)
        net.zero_grad()
        losses = task_losses(net(x * (1 + step)), case.tasks)
        torch.manual_seed(step)
        expected = {g: m(task_matrix(losses, groups.get(g, plain), g or case.tasks)) for g, m in alone.items()}
        torch.manual_seed(step)
        recon.backward(losses, net, method, retain_graph=True)
        for g, e in expected.items():
            assert_update(groups.get(g, plain), e, 1e-9)
    state = method.state_dict()
    key = "group_methods.seg+depth+normal." + ("phi" if name == "gradvac" else "alpha")
    assert state[key].shape[0] == 3


def test_loss_weightings_and_gradnorm_weight_a_group_s_tasks_with_their_global_weights() -> None:
    """Loss weightings run one backward of sum_k w_k L_k: a group copy gets sum_{k in G} w_k g_k. GradNorm on the
    shared parameters weights a class's rows with the same (global) weights."""
    case = CASES["mlp-4"]
    for name in ("uncertainty", "gradnorm"):
        net, x = build(case)
        groups = groups_of(net, case)
        method = recon.methods.get(name).bind(case.tasks)
        with torch.no_grad():
            next(method.parameters()).copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        losses = task_losses(net(x), case.tasks)
        result = recon.backward(losses, net, method, retain_graph=True)
        w = result.weights.double()
        for g, params in groups.items():
            weighted = sum(w[case.tasks.index(t)] * losses[t] for t in g)
            grads = torch.autograd.grad(weighted, params, retain_graph=True)
            assert_update(params, torch.cat([gr.reshape(-1) for gr in grads]), 1e-6)


def test_sparse_training_masks_a_group_copy_before_its_group_s_solve() -> None:
    case = CASES["mlp-4"]
    net, x = build(case)
    groups = groups_of(net, case)
    sparse = recon.methods.SparseTraining(ratio=0.5).attach(shared_parameters(net))
    try:
        losses = task_losses(net(x), case.tasks)
        expected = {g: recon.methods.get("mgda")(task_matrix(losses, ps, g)) for g, ps in groups.items()}
        recon.backward(losses, net, "mgda", retain_graph=True)
        for g, params in groups.items():
            assert_update(params, expected[g], 1e-9)  # the oracle's autograd passes are masked by the same hooks
            for p in (p for p in params if p.dim() >= 2):
                frozen = ~sparse.masks[p]
                assert frozen.any() and not p.grad[frozen].any() and p.grad[~frozen].any()
    finally:
        sparse.remove()


def test_the_training_engine_trains_group_copies_as_groups() -> None:
    """recon.train's step engine gives the same steps as recon.backward by hand (checked against oracles above)."""
    case = CASES["mlp-3"]
    net, x = build(case, init="copy")
    hand = copy.deepcopy(net)
    g = torch.Generator().manual_seed(0)
    data = [
        (x + 0.1 * k * torch.randn(x.shape, generator=g, dtype=x.dtype), {t: torch.zeros(8) for t in TASKS3})
        for k in range(3)
    ]
    losses = {t: (lambda out, y: out.pow(2).mean() + out.mean()) for t in TASKS3}
    recon.train(net, data, losses, method="cagrad", epochs=1, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    method = recon.methods.get("cagrad")
    for xb, yb in data:
        opt.zero_grad()
        out = hand(xb)
        recon.backward({t: losses[t](out[t], yb[t]) for t in TASKS3}, hand, method)
        opt.step()
    for (n, p), q in zip(net.named_parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)


def test_lightning_trains_a_group_copy_with_its_group_s_mean() -> None:
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader

    from recon.lightning import ReconMixin

    case = CASES["mlp-3"]
    net, x = build(case)
    net = net.float()
    x = x.float()

    class Module(ReconMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.configure_recon("mean", tasks=TASKS3)

        def training_step(self, batch, batch_idx):
            return self.recon_step(task_losses(self.net(batch), TASKS3))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    losses = task_losses(net(x), TASKS3)
    groups = groups_of(net, case)
    expected = {g: expected_update("mean", losses, ps, g) for g, ps in groups.items()}
    before = {g: torch.cat([p.detach().reshape(-1) for p in ps]) for g, ps in groups.items()}
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), DataLoader([x], batch_size=None))
    for g, ps in groups.items():  # SGD with lr=1: the step is minus the gradient
        moved = before[g] - torch.cat([p.detach().reshape(-1) for p in ps])
        torch.testing.assert_close(moved, expected[g].float(), rtol=1e-5, atol=1e-6)


# --- torchrun ------------------------------------------------------------------------------------------------
DIST_PLAN = {"trunk.0": [["a", "b"], ["c"]], "trunk.2": [["a"], ["b", "c"]]}


def split_net() -> nn.Module:
    torch.manual_seed(0)
    return recon.split(DistNet(), DIST_PLAN, init="copy")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        net = split_net()
        recon.train(
            net, batches(), LOSSES, method="pcgrad", epochs=1, optimizer=torch.optim.SGD(net.parameters(), lr=0.1)
        )
        if rank == 0:
            torch.save(net.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_torchrun_trains_group_copies_as_one_process_does(tmp_path) -> None:
    """Two gloo processes (the global batch split between them) end where one process ends, and one process's
    step gives each group copy its group's PCGrad update (the oracle: torchjd on the group's rows)."""
    pytest.importorskip("torchjd")
    from torchjd.aggregation import PCGrad

    out = tmp_path / "net.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    net = split_net()
    recon.train(net, batches(), LOSSES, method="pcgrad", epochs=1, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    for k, v in torch.load(out).items():
        torch.testing.assert_close(v, net.state_dict()[k], atol=1e-5, rtol=1e-5, msg=k)

    net = split_net()  # the first step by hand: the {b, c} copy of trunk.2 gets PCGrad on b's and c's rows
    x, y = batches()[0]
    output = net(x)
    losses = {t: F.cross_entropy(output[t], y[t]) for t in ("a", "b", "c")}
    copy_params = list(net.get_submodule("trunk.2.b").parameters())
    expected = PCGrad()(task_matrix(losses, copy_params, ("b", "c")))  # (two tasks: no dependence on the order)
    recon.backward(losses, net, "pcgrad", retain_graph=True)
    assert_update(copy_params, expected, 1e-5)


def test_the_split_step_benchmark_runs_and_prints_its_table() -> None:
    """Smoke test of ``benchmarks/methods.py --splits`` (no timing asserted)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    argv = ["--splits", "--reps", "1", "--threads", "1", "--methods", "mean", "--markdown"]
    out = subprocess.check_output([sys.executable, "benchmarks/methods.py", *argv], cwd=ROOT, text=True, timeout=300)
    rows = [line for line in out.splitlines() if line.startswith("| mean |")]
    assert [row.split("|")[2].strip() for row in rows] == ["16", "256"]
    assert "groups/per-task" in out
