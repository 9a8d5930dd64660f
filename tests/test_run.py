"""recon.Run: the run folder the CLI writes through (docs/run-folder.md), without a subprocess."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import recon

DIRECTIONS = {"a": {"acc": "higher"}, "b": {"err": "lower"}}


def _result(final: dict) -> recon.TrainResult:
    summary = {"method": "joint", "final": final, "directions": DIRECTIONS}
    return recon.TrainResult(history=pd.DataFrame(), final=final, summary=summary)


def test_summary_gets_delta_m_only_when_every_task_has_a_baseline(tmp_path):
    run = recon.Run.create(recipe=tmp_path / "model.py", tasks=["a", "b"], seed=0, out=tmp_path / "run")
    single_a = run.stage("train", "single-a")
    run.save_summary(single_a, _result({"a": {"acc": 0.5}}), tasks=["a", "b"], delta_m=False)
    final = {"a": {"acc": 0.6}, "b": {"err": 0.3}}
    joint = run.stage("train", "joint")
    assert "delta_m" not in run.save_summary(joint, _result(final), tasks=["a", "b"])  # b has no baseline yet

    for task, value in (("a", {"acc": 0.5}), ("b", {"err": 0.2})):
        folder = run.stage("train", f"single-{task}", force=True)
        summary = _result({task: value}).summary | {"single_task": task}
        (folder / "summary.json").write_text(json.dumps(summary))
    written = run.save_summary(joint, _result(final), tasks=["a", "b"])
    expected = recon.delta_m(final, {"a": {"acc": 0.5}, "b": {"err": 0.2}}, DIRECTIONS)
    assert written["delta_m"] == pytest.approx(expected) == pytest.approx(100 / 2 * (-0.2 + 0.5))
    assert json.loads((joint / "summary.json").read_text()) == written
    assert list(run.summaries()) == ["joint", "single-a", "single-b"]


def test_for_recipe_reuses_the_recipes_latest_run(tmp_path):
    recipe, other = tmp_path / "model.py", tmp_path / "other.py"
    first = recon.Run.for_recipe(recipe, tasks=["a"], seed=0, root=tmp_path / "runs")
    recon.Run.create(recipe=other, tasks=["a"], seed=0, root=tmp_path / "runs")
    again = recon.Run.for_recipe(recipe, tasks=["a"], seed=0, root=tmp_path / "runs")
    assert again.dir == first.dir
    assert recon.Run.for_recipe(recipe, tasks=["a"], seed=0, out=tmp_path / "x").dir == tmp_path / "x"
