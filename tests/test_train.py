"""Stage 3: recon.train, exact resume, Δm%, and `recon train` through the console script."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import recon
from recon._errors import ReconError
from recon._train import delta_m
from tests.conftest import EXAMPLE

TASKS = ("a", "b")


class DictData(TensorDataset):
    def __getitem__(self, i):
        x, ya, yb = super().__getitem__(i)
        return x, {"a": ya, "b": yb}


def loader(n=64, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    ya = (x[:, 0] > 0).long()
    yb = (x[:, 1] + x[:, 0] > 0).long()
    return DataLoader(DictData(x, ya, yb), batch_size=16, shuffle=shuffle)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 16), nn.ReLU())
        self.a = nn.Linear(16, 2)
        self.b = nn.Linear(16, 2)

    def forward(self, x):
        z = self.trunk(x)
        return {"a": self.a(z), "b": self.b(z)}


def acc(out, y):
    return (out.argmax(1) == y).float().mean().item()


LOSSES = {t: F.cross_entropy for t in TASKS}
METRICS = {t: {"acc": (acc, "higher")} for t in TASKS}


def fresh(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_train_writes_metrics_checkpoint_summary(tmp_path):
    res = recon.train(
        fresh(), lambda: loader(), LOSSES, method="joint", epochs=2, val_data=lambda: loader(shuffle=False),
        metrics=METRICS, out=tmp_path,
    )  # fmt: skip
    assert list(res.history.columns[:3]) == ["epoch", "train_loss_a", "train_loss_b"]
    assert "val_a_acc" in res.history and len(res.history) == 2
    assert (tmp_path / "metrics.csv").exists() and (tmp_path / "checkpoint.pt").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["a"]["acc"] == pytest.approx(res.history["val_a_acc"].iloc[-1])
    assert summary["directions"] == {"a": {"acc": "higher"}, "b": {"acc": "higher"}}
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no pickled code in checkpoints
    assert ckpt["epoch"] == 2


def test_training_lowers_the_losses():
    res = recon.train(fresh(), lambda: loader(256), LOSSES, method="joint", epochs=8)
    first, last = res.history.iloc[0], res.history.iloc[-1]
    assert last["train_loss_a"] < first["train_loss_a"] and last["train_loss_b"] < first["train_loss_b"]


@pytest.mark.parametrize("method", ["joint", "pcgrad"])
def test_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, method):
    kwargs = dict(method=method, epochs=3, val_data=lambda: loader(shuffle=False), metrics=METRICS, seed=5)
    full = recon.train(fresh(), lambda: loader(), LOSSES, out=tmp_path / "full", **kwargs)
    full_state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recon.train(fresh(), lambda: loader(), LOSSES, out=tmp_path / "cut", on_epoch=stop_after_first, **kwargs)
    resumed = recon.train(fresh(99), lambda: loader(), LOSSES, out=tmp_path / "cut", resume=True, **kwargs)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in full_state.items():
        assert torch.equal(value, state[key]), key
    cols = [c for c in full.history.columns if c != "seconds"]
    assert full.history[cols].equals(resumed.history[cols])


def test_resume_without_checkpoint_is_clear(tmp_path):
    with pytest.raises(ReconError, match="nothing to resume"):
        recon.train(fresh(), lambda: loader(), LOSSES, out=tmp_path, resume=True)


def test_delta_m_hand_derived():
    final = {"a": {"acc": 0.9}, "b": {"err": 0.2}}
    base = {"a": {"acc": 0.8}, "b": {"err": 0.25}}
    dirs = {"a": {"acc": "higher"}, "b": {"err": "lower"}}
    # a: -(0.9-0.8)/0.8 = -0.125 ; b: +(0.2-0.25)/0.25 = -0.2 ; mean -0.1625 -> -16.25 %
    assert delta_m(final, base, dirs) == pytest.approx(-16.25)
    assert delta_m(base, base, dirs) == 0.0


def test_cli_train_single_task_then_joint_gives_delta_m(cli, tmp_path):
    res = cli("train", str(EXAMPLE), "--single-task", "--epochs", "1", "--split", "none", "--out", "runs/r")
    assert res.returncode == 0, res.stderr
    res = cli("train", str(EXAMPLE), "--method", "pcgrad", "--epochs", "1", "--split", "none", "--out", "runs/r")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "runs/r/train/pcgrad/summary.json").read_text())
    singles = [json.loads((tmp_path / f"runs/r/train/single-{t}/summary.json").read_text()) for t in ("left", "right")]
    base = {s["single_task"]: s["final"][s["single_task"]] for s in singles}
    assert summary["delta_m"] == pytest.approx(delta_m(summary["final"], base, summary["directions"]))
    assert "Δm%" in res.stdout


def test_cli_train_unknown_method_lists_choices(cli):
    res = cli("train", str(EXAMPLE), "--method", "gradsurgery")
    assert res.returncode == 2
    assert "pcgrad" in res.stderr and "cagrad" in res.stderr and "Traceback" not in res.stderr


def test_cli_train_existing_variant_needs_force(cli, tmp_path):
    args = ("train", str(EXAMPLE), "--epochs", "1", "--split", "none", "--out", "runs/r")
    assert cli(*args).returncode == 0
    again = cli(*args)
    assert again.returncode == 2 and "--force" in again.stderr


def test_sparse_training_freezes_the_masked_shared_weights():
    net = fresh()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    recon.train(net, lambda: loader(), LOSSES, method="pcgrad", epochs=2, sparse=0.5)
    for name in ("trunk.0.weight", "trunk.3.weight"):
        w0, w1 = before[name], dict(net.named_parameters())[name].detach()
        keep = w0.abs() >= w0.abs().quantile(0.5, dim=1, keepdim=True)  # top half of each neuron's inputs
        assert torch.equal(w1[~keep], w0[~keep]), name  # frozen entries never move
        assert not torch.equal(w1[keep], w0[keep]), name  # the kept ones train
    assert not torch.equal(before["a.weight"], net.a.weight)  # heads are not masked


@pytest.mark.parametrize("model_cls", ["BranchyNet", "Untraceable"])
def test_recorded_cosines_match_independent_autograd_and_leave_training_unchanged(model_cls):
    """record_cosines: every step's layer-wise cosines equal per-task autograd on the same joint/Adam run (the
    profiler's oracle), and recording them changes nothing in the training itself."""
    from tests import test_profile as tp

    torch.manual_seed(0)
    model = getattr(tp, model_cls)()
    data = tp.batches(4)
    expected = tp.oracle_cosines(model, data, steps=4)
    kwargs = dict(method="joint", epochs=1, seed=0, tasks=list(tp.TASKS))
    recorded, plain = copy.deepcopy(model), copy.deepcopy(model)
    result = recon.train(recorded, data, tp.LOSSES, record_cosines=True, **kwargs)
    recon.train(plain, data, tp.LOSSES, **kwargs)
    layers = ["stem", "block.conv1", "block.bn1", "block.conv2", "fc"]  # the shared layers, in parameter order
    pairs = [(a, b) for i, a in enumerate(tp.TASKS) for b in tp.TASKS[i + 1 :]]
    assert result.cosines.shape == (4, len(layers), len(pairs))
    for step in range(4):
        for li, layer in enumerate(layers):
            for pi, (a, b) in enumerate(pairs):
                assert result.cosines[step, li, pi] == pytest.approx(expected[step][(layer, a, b)], abs=1e-5)
    for p, q in zip(recorded.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_recorded_cosines_with_a_loss_weighting_method_take_their_own_pass_and_change_nothing():
    """Loss-weighting methods compute no per-task gradients: the meter runs its own backward passes."""
    from tests import test_profile as tp

    torch.manual_seed(0)
    model = tp.BranchyNet()
    data = tp.batches(3)
    first = tp.oracle_cosines(model, data, steps=1)[0]  # before any update: the same for every method
    kwargs = dict(method="uncertainty", epochs=1, seed=0, tasks=list(tp.TASKS))
    recorded, plain = copy.deepcopy(model), copy.deepcopy(model)
    result = recon.train(recorded, data, tp.LOSSES, record_cosines=True, **kwargs)
    recon.train(plain, data, tp.LOSSES, **kwargs)
    assert result.cosines.shape[0] == 3
    pairs = [(a, b) for i, a in enumerate(tp.TASKS) for b in tp.TASKS[i + 1 :]]
    for li, layer in enumerate(["stem", "block.conv1", "block.bn1", "block.conv2", "fc"]):
        for pi, (a, b) in enumerate(pairs):
            assert result.cosines[0, li, pi] == pytest.approx(first[(layer, a, b)], abs=1e-5)
    for p, q in zip(recorded.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_cli_summary_holds_the_method_spec_the_user_gave(cli, tmp_path):
    """summary.json's "method" is the user's spec, not the class name (``Mean``, ``CAGrad``)."""
    for method in ("joint", "cagrad:c=0.4"):
        res = cli("train", str(EXAMPLE), "--method", method, "--epochs", "1", "--split", "none", "--out", "runs/r")
        assert res.returncode == 0, res.stderr
        summary = json.loads((tmp_path / f"runs/r/train/{method}/summary.json").read_text())
        assert summary["method"] == method
        assert json.loads((tmp_path / "runs/r/run.json").read_text())["commands"][-1]["method"] == method


def test_one_hyperparameter_reader_for_both_forms_and_specs_round_trip():
    from recon.methods import canonical_name, format_spec, get, parse_hparams, spec_of

    assert parse_hparams(["c=0.4", "x=none", "flag=True", "name=min"]) == {
        "c": 0.4, "x": None, "flag": True, "name": "min",
    }  # fmt: skip
    by_hp = get("cagrad", **parse_hparams(["c=0.4", "rescale=2"]))  # what `--method cagrad --hp ...` builds
    assert by_hp.hparams() == get("cagrad:c=0.4,rescale=2").hparams() and by_hp.spec == "cagrad:c=0.4,rescale=2"
    with pytest.raises(ReconError, match="key=value"):
        parse_hparams(["c"])
    for spec in ("joint", "pcgrad", "cagrad:c=0.4", "cagrad:c=0.25,rescale=2", "gradvac:beta=0.1"):
        method = get(spec)
        assert method.spec == spec == spec_of(method) == spec_of(spec)
        assert get(method.spec).hparams() == method.hparams()  # the spec rebuilds the same method
    assert spec_of("CAGrad: c=0.4") == "cagrad:c=0.4" == format_spec("cagrad", {"c": 0.4})
    assert spec_of(recon.methods.PCGrad()) == "pcgrad"  # built directly: its registry name
    # older summary.json files hold class names
    assert [canonical_name(n) for n in ("Mean", "PCGrad", "CAGrad", "IMTLG", "joint", "cagrad:c=0.4")] == [
        "joint", "pcgrad", "cagrad", "imtl_g", "joint", "cagrad:c=0.4",
    ]  # fmt: skip
