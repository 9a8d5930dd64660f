"""The ranking's confidence (issue 18 item 3): a seeded bootstrap over recorded steps, against slow and exact
oracles, and where it shows (prof.scores, recon split, the report)."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch

import recon
from recon import _confidence
from recon._confidence import resampled_steps, top_k_probability, unstable
from tests.conftest import ROOT
from tests.test_profile import hand_profile


def slow_probability(per_step: np.ndarray, k: int, resamples: int, seed: int) -> np.ndarray:
    """One resample at a time, each layer's score summed in Python and ranked with ties in layer order."""
    T, L = per_step.shape
    hits = np.zeros(L)
    for block in resampled_steps(T, resamples, seed):
        for idx in block:
            totals = [sum(per_step[t, layer] for t in idx) for layer in range(L)]
            ranked = sorted(range(L), key=lambda layer: (-totals[layer], layer))
            for layer in ranked[:k]:
                hits[layer] += 1
    return hits / resamples


@pytest.mark.parametrize("integer", [True, False])
def test_the_bootstrap_equals_a_slow_computation_with_the_same_draws(integer: bool) -> None:
    rng = np.random.default_rng(3)
    per_step = rng.integers(0, 3, size=(9, 5)) if integer else rng.normal(size=(9, 5))
    for k in (1, 2, 4):
        fast = top_k_probability(per_step, k, resamples=300, seed=7)
        np.testing.assert_allclose(fast, slow_probability(per_step, k, 300, 7))
        assert fast.sum() == pytest.approx(k)


def test_the_bootstrap_converges_to_the_exact_resampling_distribution() -> None:
    """T = 3 steps: all 27 resamples are equally likely, so p_top_k is an exact average over them."""
    per_step = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5], [1.0, 1.0, 1.0]])
    exact = np.zeros(3)
    for idx in itertools.product(range(3), repeat=3):
        totals = per_step[list(idx)].sum(axis=0)
        exact[sorted(range(3), key=lambda layer: (-totals[layer], layer))[0]] += 1 / 27
    got = top_k_probability(per_step, 1, resamples=20000, seed=0)
    np.testing.assert_allclose(got, exact, atol=0.015)


def test_the_bootstrap_is_seeded_and_handles_no_steps() -> None:
    per_step = np.random.default_rng(0).normal(size=(30, 6))
    a, b = top_k_probability(per_step, 2, seed=1), top_k_probability(per_step, 2, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, top_k_probability(per_step, 2, seed=2))
    assert np.isnan(top_k_probability(np.zeros((0, 3)), 2)).all()
    np.testing.assert_array_equal(top_k_probability(per_step, 6), np.ones(6))  # k = every layer


def test_profile_confidence_resamples_the_steps_that_make_the_score(tmp_path) -> None:
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, size=(12, 4, 3)).astype(np.float32)
    prof = hand_profile(tmp_path, cos, layers=("l1", "l2", "l3", "l4"))
    per_step = prof.per_step_scores(S=-0.2)
    np.testing.assert_array_equal(per_step, (cos < -0.2).sum(axis=2))
    frame = prof.scores(S=-0.2, k=2)
    assert frame.attrs["k"] == 2
    expected = top_k_probability(per_step, 2)
    np.testing.assert_allclose(frame["p_top_k"].reindex(prof.layers), expected)
    np.testing.assert_allclose(prof.confidence(2, S=-0.2), expected)
    assert prof.scores().attrs["k"] == 4


def test_the_unstable_warning_names_the_weak_layers() -> None:
    assert unstable({"conv1": 0.95, "conv2": 0.9}, 2) is None
    line = unstable({"conv1": 0.95, "conv2": 0.55, "fc": 0.7}, 4)
    assert line == "the top-4 is unstable over steps (conv2: 0.55, fc: 0.70); profile longer with --steps"


def test_split_prints_confidence_and_warns_when_the_set_is_unstable(monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    shutil.copy(ROOT / "examples" / "planted.py", tmp_path / "model.py")  # interference is positive on its neck
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["profile", "model.py", "--steps", "40"]).exit_code == 0
    monkeypatch.setattr(_confidence, "STABLE", 1.01)  # every chosen layer counts as unstable
    res = runner.invoke(app, ["split", "--top-k", "2", "--score", "interference"])
    assert res.exit_code == 0, res.output
    assert "p(top-2)" in res.output and "interference" in res.output
    assert "the top-2 is unstable over steps (" in res.output and "profile longer with --steps" in res.output
    folder = next((tmp_path / "runs").iterdir())
    plan = json.loads((folder / "split" / "plan.json").read_text())
    assert plan["score"] == "interference" and plan["confidence_k"] == 2
    assert set(plan["p_top_k"]) == set(plan["layers"]) and plan["unstable"].startswith("the top-2")
    prof = recon.ConflictProfile.load(folder / "profile")
    assert plan["layers"] == [n for n in prof.scores(score="interference").index if n][: len(plan["layers"])]
    rep = recon.report(folder, write=False)
    assert rep.score == "interference" and "p(top-2)" in rep.scores.columns and "S-conflict" in rep.scores
    assert "p(top-2)" in rep.branched.columns and "**Warning:** the top-2 is unstable" in rep.markdown
    monkeypatch.setattr(_confidence, "STABLE", 0.0)
    res = runner.invoke(app, ["split", "--top-k", "1", "--force"])
    assert res.exit_code == 0 and "unstable" not in res.output
    assert json.loads((folder / "split" / "plan.json").read_text())["score"] == "s-conflict"
    bad = runner.invoke(app, ["split", "--top-k", "1", "--score", "cosine", "--force"])
    assert bad.exit_code == 2 and "is not one of" in bad.output


def test_a_sampled_profile_bootstraps_over_its_recorded_steps() -> None:
    """Issue 21's every=N: only every N-th step is recorded, and the bootstrap resamples those steps."""
    import torch.nn.functional as F

    from tests.test_plan import TASKS4, Deep, _data

    data = _data(lambda g, b: torch.randn(b, 6, generator=g), n_steps=9)
    prof = recon.profile(Deep(), data, {t: F.cross_entropy for t in TASKS4}, steps=9, every=3)
    assert prof.steps == 3 and prof.total_steps == 9
    assert prof.gram_array.shape[0] == 3
    for score in ("s-conflict", "interference"):
        per_step = prof.per_step_scores(score=score)
        assert per_step.shape == (3, len(prof.layers))
        np.testing.assert_allclose(prof.confidence(2, score=score), top_k_probability(per_step, 2))
    np.testing.assert_allclose(
        prof.scores(score="interference")["score"].reindex(prof.layers),
        prof.per_step_scores(score="interference").mean(0),
    )
