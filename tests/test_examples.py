"""The shipped examples run: the own-trainer script (plain loop and torchjd) and the 3-task recipe."""

from __future__ import annotations

import os
import subprocess
import sys

from recon._recipe import check_recipe, load_recipe
from tests.conftest import ROOT


def test_own_trainer_script_runs_both_loops():
    env = {**os.environ, "RECON_DIGITS_TRAIN": "128", "RECON_DIGITS_VAL": "64"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "own_trainer.py"), "--epochs", "1", "--profile-steps", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "plain loop + recon.backward(pcgrad): val accuracy" in res.stdout
    assert "torchjd UPGrad: val accuracy" in res.stdout


def test_three_task_recipe_is_valid(monkeypatch):
    monkeypatch.setenv("RECON_DIGITS_TRAIN", "128")
    recipe = load_recipe(ROOT / "examples" / "multidigits3.py")
    assert recipe.tasks == ["left", "right", "total"]
    check_recipe(recipe)
    _, targets = next(iter(recipe.train_data()))
    assert (targets["total"] == targets["left"] + targets["right"]).all()


def test_forty_task_recipe_is_valid_and_labels_follow_the_digits(monkeypatch):
    monkeypatch.setenv("RECON_DIGITS_TRAIN", "128")
    recipe = load_recipe(ROOT / "examples" / "digits40.py")
    assert len(recipe.tasks) == 40 and len(set(recipe.tasks)) == 40
    check_recipe(recipe)
    import digits40
    from multidigits import make_pairs

    x, y = make_pairs("val", 256)
    labels = digits40.attributes(x, y)
    column = {t: labels[:, k] for k, t in enumerate(digits40.TASKS)}
    a, b = y[:, 0], y[:, 1]
    assert (column["left_odd"] == a % 2).all() and (column["right_large"] == (b >= 5).long()).all()
    assert (column["equal"] == (a == b).long()).all()
    assert (column["same_parity"] == (column["left_odd"] == column["right_odd"]).long()).all()
    rates = labels.float().mean(0)
    assert ((rates > 0.05) & (rates < 0.95)).all()  # every attribute varies: no constant task
    out = recipe.build_model()(x[:4])
    assert set(out) == set(recipe.tasks) and out["left_zero"].shape == (4, 2)
