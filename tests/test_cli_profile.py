"""`recon profile` through the real console script: the happy path and every bad input (exit 2, one line)."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.conftest import EXAMPLE

GOOD = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(4, 8)
            self.a = nn.Linear(8, 2)
            self.b = nn.Linear(8, 2)
        def forward(self, x):
            z = torch.relu(self.trunk(x))
            return {OUTPUT}

    def build_model():
        return Net()

    losses = {LOSSES}

    def train_data():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 4, generator=g), {{"a": torch.randint(0, 2, (8,), generator=g),
                                                   "b": torch.randint(0, 2, (8,), generator=g)}}) for _ in range(4)]
    """
)


def recipe(tmp_path, output='{"a": self.a(z), "b": self.b(z)}', losses='{"a": F.cross_entropy, "b": F.cross_entropy}'):
    path = tmp_path / "model.py"
    path.write_text(GOOD.replace("{OUTPUT}", output).replace("{LOSSES}", losses).replace("{{", "{").replace("}}", "}"))
    return path


def test_profile_example_writes_the_run_folder(cli, tmp_path):
    res = cli("profile", str(EXAMPLE), "--steps", "3", "--seed", "1")
    assert res.returncode == 0, res.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    folder = runs[0] / "profile"
    for name in ("scores.csv", "scores.json", "cosines.npy", "heatmap.png", "profile.json"):
        assert (folder / name).stat().st_size > 0, name
    info = json.loads((runs[0] / "run.json").read_text())
    assert info["tasks"] == ["left", "right"] and info["seed"] == 1
    assert info["commands"][0]["argv"][:2] == ["recon", "profile"]
    assert "S-conflict score" in res.stdout and "layer" in res.stdout
    header = (folder / "scores.csv").read_text().splitlines()[0]
    assert header.startswith("layer,score,conflict_rate,mean_cos,params,type")


def test_existing_profile_is_not_overwritten(cli, tmp_path):
    path = recipe(tmp_path)
    assert cli("profile", str(path), "--out", "runs/r", "--steps", "1").returncode == 0
    again = cli("profile", str(path), "--out", "runs/r", "--steps", "1")
    assert again.returncode == 2 and "--force" in again.stderr
    assert cli("profile", str(path), "--out", "runs/r", "--steps", "2", "--force").returncode == 0
    assert json.loads((tmp_path / "runs/r/profile/profile.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p.unlink(), "no such file"),
        (lambda p: p.write_text(p.read_text() + "\ndef broken(:\n"), "syntax error"),
        (
            lambda p: p.write_text(p.read_text().replace("def build_model", "def build_it")),
            "no `build_model`",
        ),
        (lambda p: p.write_text(p.read_text().replace("losses = ", "losses_ = ")), "no `losses`"),
        (
            lambda p: p.write_text(p.read_text().replace('return {"a": self.a(z), "b": self.b(z)}', "return z")),
            "returned a tensor of shape",
        ),
        (
            lambda p: p.write_text(p.read_text().replace('"b": F.cross_entropy}', '"b": lambda o, t: o.sum(1)}')),
            "not a scalar tensor",
        ),
        (
            lambda p: p.write_text(p.read_text().replace('{"a": F.cross_entropy', '{"a-1": F.cross_entropy')),
            "not valid Python identifiers",
        ),
        (lambda p: p.write_text(p.read_text() + "\nraise RuntimeError('boom')\n"), "RuntimeError: boom"),
    ],
    ids=[
        "missing-file",
        "syntax",
        "no-build-model",
        "no-losses",
        "wrong-output",
        "non-scalar-loss",
        "bad-task",
        "import-error",
    ],
)
def test_bad_recipe_is_one_clear_line(cli, tmp_path, mutate, expected):
    path = recipe(tmp_path)
    mutate(path)
    res = cli("profile", str(path), "--steps", "1")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert expected in lines[0] and "model.py" in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [(["--S", "0.5"], "-1 < S <= 0"), (["--device", "tpu9"], "--device"), (["--method", "nope"], "nope")],
)
def test_bad_flags_exit_2(cli, tmp_path, args, expected):
    res = cli("profile", str(recipe(tmp_path)), "--steps", "1", *args)
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr and "Traceback" not in res.stderr


def test_unknown_flag_is_a_usage_error(cli, tmp_path):
    res = cli("profile", str(recipe(tmp_path)), "--stepz", "1")
    assert res.returncode == 2


def test_nan_loss_stops_with_task_and_step_and_keeps_the_record(cli, tmp_path):
    path = recipe(tmp_path, losses='{"a": F.cross_entropy, "b": lambda o, t: F.cross_entropy(o, t) * float("nan")}')
    res = cli("profile", str(path), "--out", "runs/r")
    assert res.returncode == 1
    assert "task 'b' is nan at step 0" in res.stderr
    meta = json.loads((tmp_path / "runs/r/profile/profile.json").read_text())
    assert meta["partial"] is True and meta["steps"] == 0
