"""``recon search`` (recon/_search.py, cli/search.py): candidates, paired short trials, successive halving."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

import recon
from recon import _search
from recon._search import Budgets, Schedule, Standing, candidates, survivors
from recon._trials import Candidate, CostModel, TrialSetup, paired_difference, paired_model
from tests import copies
from tests.conftest import ROOT

PLANTED = ROOT / "examples" / "planted.py"


@pytest.fixture(scope="module")
def profile() -> recon.ConflictProfile:
    recon.seed_everything(0)
    return recon.profile(copies.build_model(), copies.train_data, copies.losses, steps=40)


def _copies_search(**kw) -> recon.SearchResult:
    args = dict(optimizer=copies.optimizer, budget_params=1.0, time_budget="10m", seeds=3, steps=32)
    args.update(kw)
    return recon.search(copies.build_model, copies.train_data, copies.val_data, copies.losses, copies.metrics, **args)


def _setup() -> TrialSetup:
    x = next(iter(copies.train_data()))[0]
    return TrialSetup(
        copies.build_model, copies.train_data, copies.val_data, copies.losses, copies.metrics, x, copies.optimizer
    )


# ---------------------------------------------------------------------------------------------- choices
@pytest.mark.skipif(not PLANTED.exists(), reason="examples/planted.py (the scores branch) is not merged yet")
def test_search_splits_the_planted_layer_within_its_time_budget(monkeypatch, tmp_path):
    monkeypatch.setenv("RECON_PLANTED_TRAIN", "512")
    monkeypatch.setenv("RECON_PLANTED_VAL", "256")
    recipe = recon.load_recipe(PLANTED)
    planted = recipe.module.PLANTED
    result = recon.search(
        recipe.build_model, recipe.train_data, recipe.val_data, recipe.losses, recipe.metrics,
        optimizer=recipe.make_optimizer, time_budget="3m", seeds=3, steps=32, out=tmp_path / "search",
    )  # fmt: skip
    assert result.chosen is not None and result.plan is not None
    assert planted in result.plan.layers
    assert result.seconds <= 180
    row = result.leaderboard.loc[result.chosen]
    assert row["low"] > 0 and row["vs unsplit"] == "better" and row["status"] == "chosen"
    # the plan is one recon train reads: it rebuilds the split model
    net = recon.load_split(recipe.build_model(), recon.SplitPlan.from_json(result.plan.to_json()))
    assert any(name.startswith(f"{planted}.") for name, _ in net.named_parameters())


def test_search_chooses_no_split_when_the_tasks_are_copies(tmp_path, profile):
    result = _copies_search(candidates=[["trunk.0"], ["trunk.2"]], out=tmp_path, profile=profile)
    board = result.leaderboard
    assert len(board) >= 4  # unsplit, the plans, the two user candidates
    assert result.chosen is None and result.plan is None
    assert "no split" in result.verdict
    assert not (board["vs unsplit"] == "better").any()
    assert board["rung"].max() == 2  # three split candidates: three rungs of successive halving
    assert (tmp_path / "leaderboard.csv").exists() and (tmp_path / "leaderboard.png").exists()
    text = (tmp_path / "leaderboard.md").read_text()
    assert "short trials: a ranking of candidates, not final accuracies" in text and "no split" in text
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["partial"] is False and saved["chosen"] is None


# --------------------------------------------------------------------------------------------- pairing
def test_candidates_of_one_seed_share_batches_and_initial_values(profile):
    setup = _setup()
    prof = profile
    extra = [["trunk.0"], ["trunk.2"]]
    cands = candidates(
        prof, copies.build_model(), setup.tasks, setup.example_inputs, budgets=Budgets(1.0, None), extra=extra
    )
    assert len(cands) >= 3 and cands[0].spec is None
    seen = {}
    for cand in cands:
        seen[cand.name] = []
        _search.trial(setup, cand, seed=5, steps=12, method="joint", epoch_length=4, fingerprints=seen[cand.name])
        base, net = paired_model(setup, cands[0], 5).state_dict(), paired_model(setup, cand, 5).state_dict()
        for name, value in net.items():
            layer, _, leaf = name.rpartition(".")
            original = name if name in base else f"{layer.rpartition('.')[0]}.{leaf}"  # a copy: layer.<task>.weight
            assert torch.equal(value, base[original]), (cand.name, name)
    assert all(len(v) == 12 for v in seen.values())  # 4 short epochs of 3 batches
    assert all(v == seen["unsplit"] for v in seen.values())


# -------------------------------------------------------------------------------------------- halving
def _standing(name: str, gains: list[float]) -> Standing:
    return Standing(Candidate(name, None if name == "unsplit" else [name]), 0, 8, [{}] * len(gains), gains)


def test_halving_drops_what_is_resolved_below_the_leader_and_keeps_the_best_half():
    table = {
        "unsplit": _standing("unsplit", [0.0, 0.0, 0.0]),
        "lead": _standing("lead", [5.0, 6.0, 5.5]),
        "close": _standing("close", [6.0, 1.0, 4.0]),  # below the leader on average, not resolved
        "bad": _standing("bad", [-1.0, -1.2, -0.9]),  # resolved below the leader
        "meh": _standing("meh", [5.0, 0.0, 3.0]),  # below "close" on average, not resolved
    }
    assert paired_difference(table["bad"].gains, table["lead"].gains).high < 0
    alive = [s.candidate for s in table.values()]
    kept, dropped = survivors(alive, table, eta=2)
    assert [c.name for c in kept] == ["unsplit", "lead", "close"]  # ceil(4 / 2) = 2 split candidates go on
    assert "below the leader (lead)" in dropped["bad"] and "not in the best 2" in dropped["meh"]


def test_schedule_grows_steps_and_seeds_and_ends_with_one_candidate():
    s = Schedule(steps=10, seeds=3, n_split=5)
    assert s.count == 4  # 5 -> 3 -> 2 -> 1
    assert s.plan() == [(5, 10, 2), (3, 20, 3), (2, 40, 3), (1, 80, 3)]
    assert s.steps_total() == 6 * 10 * 2 + 4 * 20 * 3 + 3 * 40 * 3 + 2 * 80 * 3
    assert Schedule(steps=10, seeds=4, n_split=1).plan() == [(1, 10, 4)]  # one candidate: one rung, every seed


def test_duplicate_plans_are_one_candidate_and_names_say_which(profile):
    setup = _setup()
    prof = profile
    cost = CostModel(copies.build_model(), setup.tasks, setup.example_inputs)
    cands = candidates(
        prof, copies.build_model(), setup.tasks, setup.example_inputs, budgets=Budgets(1.0, None),
        extra=[["trunk.2", "trunk.0"], ["trunk.0"]],
    )  # fmt: skip
    keys = [c.key() for c in cands]
    assert len(keys) == len(set(keys))
    both = next(c for c in cands if c.spec == ["trunk.0", "trunk.2"])
    assert "user-1" in both.name.split("=") and "heads" in both.name.split("=")
    for cand in cands[1:]:
        assert cost.added_params(cand.spec) <= cost.base_params or cand.name.startswith("user")


# ------------------------------------------------------------------------------------ interrupt, resume
def test_interrupt_then_resume_gives_the_leaderboard_of_an_uninterrupted_search(monkeypatch, tmp_path, profile):
    real, calls = _search.trial, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kw)

    extra = {"candidates": [["trunk.0"], ["trunk.2"]], "profile": profile, "seeds": 2, "steps": 16}
    whole = _copies_search(out=tmp_path / "whole", **extra).leaderboard
    monkeypatch.setattr(_search, "trial", flaky)
    with pytest.raises(KeyboardInterrupt):
        _copies_search(out=tmp_path / "cut", **extra)
    saved = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert saved["partial"] is True and saved["chosen"] is None
    assert "(partial)" in (tmp_path / "cut" / "leaderboard.md").read_text()
    done = len(list((tmp_path / "cut" / "trials").glob("*.json")))
    assert done == 6
    with pytest.raises(recon.ReconError, match="--resume"):
        _copies_search(out=tmp_path / "cut", **extra)
    resumed = _copies_search(out=tmp_path / "cut", resume=True, **extra).leaderboard
    assert len(calls) > 7  # the resumed search ran only what was missing
    timing = ["step time x"]
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), whole.drop(columns=timing))


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line(tmp_path, profile):
    with pytest.raises(recon.ReconError, match="val_data"):
        recon.search(copies.build_model, copies.train_data, None, copies.losses, copies.metrics)
    with pytest.raises(recon.ReconError, match="at least 2 seeds"):
        _copies_search(seeds=1)
    with pytest.raises(recon.ReconError, match="not a duration"):
        _copies_search(time_budget="soon")
    with pytest.raises(recon.ReconError, match="no split candidate fits the budgets"):
        _copies_search(budget_params=1e-6, profile=profile)
    with pytest.raises(recon.ReconError, match="too short for a search"):
        _copies_search(time_budget="1s", steps=None, profile=profile)
    assert not math.isnan(_search.parse_duration("1h30m")) and _search.parse_duration("1h30m") == 5400


def test_cli_bad_input_exits_2_with_one_line(cli, tmp_path):
    recipe = tmp_path / "noval.py"
    text = (ROOT / "tests" / "copies.py").read_text().replace("def val_data()", "def _val_data()")
    recipe.write_text(text)
    for args, words in [
        ((str(recipe),), "define val_data() and metrics"),
        ((str(ROOT / "tests" / "copies.py"), "--budget-params", "1e-6"), "no split candidate fits"),
        ((str(ROOT / "tests" / "copies.py"), "--time", "1s"), "too short"),
    ]:
        done = cli("search", *args, "--out", str(tmp_path / "run"))
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0], done.stderr


def test_cli_search_writes_the_leaderboard_and_the_plan_train_reads(cli, tmp_path):
    recipe = str(ROOT / "tests" / "copies.py")
    done = cli("search", recipe, "--out", "run", "--steps", "16", "--seeds", "2", "--candidate", "trunk.0")
    assert done.returncode == 0, done.stderr
    assert "short trials: a ranking of candidates, not final accuracies" in done.stdout
    assert (tmp_path / "run" / "search" / "leaderboard.csv").exists()
    board = pd.read_csv(tmp_path / "run" / "search" / "leaderboard.csv", index_col=0)
    assert "unsplit" in board.index and "user-1" in " ".join(board.index)
    chosen = json.loads((tmp_path / "run" / "search" / "result.json").read_text())["chosen"]
    assert (tmp_path / "run" / "split" / "plan.json").exists() == (chosen is not None)
    assert ("no split" in done.stdout) == (chosen is None)
