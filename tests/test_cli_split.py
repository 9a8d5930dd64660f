"""`recon split` on a run folder: the happy paths, what it writes, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import recon
from cli.main import app

RECIPE = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(4, 8)
            self.norm = nn.LayerNorm(8)
            self.mid = nn.Linear(8, 8)
            self.a = nn.Linear(8, 2)
            self.b = nn.Linear(8, 2)
        def forward(self, x):
            z = torch.relu(self.mid(self.norm(self.trunk(x))))
            return {"a": self.a(z), "b": self.b(z)}

    def build_model():
        return Net()

    losses = {"a": F.cross_entropy, "b": F.cross_entropy}

    def train_data():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(8, 4, generator=g), {"a": torch.randint(0, 2, (8,), generator=g),
                                                  "b": torch.randint(0, 2, (8,), generator=g)}) for _ in range(3)]
    """
)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> Path:
    """A folder with the tiny recipe and a run that holds its profile (made once for the module)."""
    home = tmp_path_factory.mktemp("profiled")
    (home / "model.py").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        res = CliRunner().invoke(app, ["profile", "model.py", "--steps", "3"])
    assert res.exit_code == 0, res.output
    return home


@pytest.fixture
def run(profiled: Path, tmp_path: Path, monkeypatch):
    """A fresh copy of the profiled run in this test's folder; returns a function that invokes `recon split`."""
    shutil.copytree(profiled / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def split(*args: str):
        return runner.invoke(app, ["split", *args])

    split.folder = next((tmp_path / "runs").iterdir())
    return split


def test_split_top_k_writes_plan_and_code(run) -> None:
    res = run("--top-k", "2")
    assert res.exit_code == 0, res.output
    assert "parameters:" in res.output and "split / original" in res.output
    plan = json.loads((run.folder / "split" / "plan.json").read_text())
    scores = json.loads((run.folder / "profile" / "scores.json").read_text())
    assert plan["layers"] == list(scores)[:2] and plan["top_k"] == 2 and plan["tasks"] == ["a", "b"]
    assert plan["init"] == "reinit" and plan["S"] == 0.0 and plan["params_after"] > plan["params_before"]
    assert (run.folder / "split" / "network.png").stat().st_size > 0
    code = (run.folder / "split" / "model.py").read_text()
    compile(code, "model.py", "exec")
    assert "def forward(self, x):" in code and "_a" in code

    # the plan rebuilds the model, and it is the one `recon train` will load
    import importlib.util

    recipe = json.loads((run.folder / "run.json").read_text())["recipe"]
    spec = importlib.util.spec_from_file_location("tiny_recipe", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = recon.load_split(module.build_model, run.folder / "split" / "plan.json")
    assert sum(p.numel() for p in net.parameters()) == plan["params_after"]
    assert isinstance(net(torch.randn(2, 4)), dict)

    # no silent overwrite
    again = run("--top-k", "1")
    assert again.exit_code == 2 and "--force" in again.output
    assert run("--top-k", "1", "--force").exit_code == 0
    assert json.loads((run.folder / "split" / "plan.json").read_text())["top_k"] == 1


def test_split_layers_scores_and_copy(run, tmp_path: Path) -> None:
    res = run("--layers", "mid,norm", "--init", "copy", "--run", str(run.folder))
    assert res.exit_code == 0, res.output
    plan = json.loads((run.folder / "split" / "plan.json").read_text())
    assert plan["layers"] == ["mid", "norm"] and plan["init"] == "copy"

    (tmp_path / "official.json").write_text(json.dumps({"trunk": 9, "mid": 4, "norm": 1}))
    res = run("--scores", str(tmp_path / "official.json"), "--top-k", "1", "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((run.folder / "split" / "plan.json").read_text())["layers"] == ["trunk"]


@pytest.mark.parametrize(
    ("args", "message", "lists_layers"),
    [
        (["--layers", "nope"], "unknown layer 'nope'", True),
        (["--layers", "a"], "not shared", True),
        (["--top-k", "9"], "exceeds the 3 shared layers", True),
        ([], "say which layers to branch", False),
        (["--top-k", "1", "--init", "fresh"], "--init 'fresh'", False),
        (["--top-k", "1", "--S", "0.5"], "out of range", False),
        (["--layers", "mid", "--top-k", "1"], "either --layers or --top-k", False),
        (["--top-k", "1", "--run", "nowhere"], "not a run folder", False),
    ],
)
def test_bad_input_exits_2_with_one_line(run, args: list[str], message: str, lists_layers: bool) -> None:
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert len(res.output.strip().splitlines()) == 1
    if lists_layers:
        assert "mid" in res.output and "trunk" in res.output  # the valid names are listed


def test_split_within_budgets_prints_groups_scores_and_totals(run) -> None:
    res = run("--budget-params", "0.6", "--budget-flops", "1.5", "--groups", "auto")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "score removed" in text and "params added" in text and "budget +60.0%" in text and "budget 1.50x" in text
    plan = json.loads((run.folder / "split" / "plan.json").read_text())
    assert plan["budget_params"] == 0.6 and plan["budget_flops"] == 1.5
    assert set(plan["groups"]) == set(plan["layers"]) and plan["layers"]
    assert plan["params_after"] - plan["params_before"] <= 0.6 * plan["params_before"]
    assert plan["flops_after"] <= 1.5 * plan["flops_before"]
    assert sum(plan["params_added"].values()) == plan["params_after"] - plan["params_before"]
    rep = recon.report(run.folder)  # the report draws the budget curve, with this plan marked on it
    assert "budget_curve.png" in rep.figures and (run.folder / "report" / "budget_curve.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget-params", "-0.1"], "out of range"),
        (["--budget-params", "lots"], "--budget-params must be a number"),
        (["--budget-flops", "0.5"], "out of range"),
        (["--budget-params", "0"], "no layer fits within --budget-params 0"),
        (["--budget-params", "0.1", "--top-k", "1"], "--top-k is the paper's unbudgeted rule"),
        (["--budget-params", "0.1", "--groups", "some"], "groups='some'"),
        (["--budget-params", "0.1", "--layers", "mid"], "either --layers or"),
    ],
)
def test_bad_budgets_exit_2_with_one_line(run, args: list[str], message: str) -> None:
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert len(res.output.strip().splitlines()) == 1
