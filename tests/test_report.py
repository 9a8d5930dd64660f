"""`recon.report`: the report's tables from a hand-written run folder, checked against hand computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import recon

TASKS = ["seg", "depth"]
DIRECTIONS = {"seg": {"acc": "higher"}, "depth": {"abs_err": "lower"}}
LAYERS = ["enc.0", "enc.1", "enc.2"]
# (steps, layers, pairs): one pair (seg, depth); NaN = a zero gradient, skipped
COSINES = np.array(
    [
        [[-0.5], [0.2], [np.nan]],
        [[-0.1], [-0.3], [0.4]],
        [[0.3], [-0.6], [-0.05]],
        [[-0.2], [-0.4], [0.1]],
    ],
    dtype=np.float32,
)
PARAMS = {"enc.0": 100, "enc.1": 40, "enc.2": 10}


def write_json(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def summary(method, *, final, seed=0, split=None, params=800, single=None, delta_m=None, share=None) -> dict:
    out = {
        "method": method,
        "split": {"layers": split} if split else None,
        "params": params,
        "epochs": 2,
        "seed": seed,
        "final": final,
        "directions": {t: DIRECTIONS[t] for t in final},
        "delta_m": delta_m,
        "conflict_share": share,
    }
    if single:
        out["single_task"] = single
    return out


def final(acc: float, err: float) -> dict:
    return {"seg": {"acc": acc}, "depth": {"abs_err": err}}


BASE = {"seg": {"acc": 0.8}, "depth": {"abs_err": 0.5}}
VARIANTS = {
    "single-seg": summary("joint", final={"seg": {"acc": 0.8}}, single="seg", params=500),
    "single-depth": summary("joint", final={"depth": {"abs_err": 0.5}}, single="depth", params=500),
    # older summary.json files hold the method's class name
    "joint": summary("Mean", final=final(0.76, 0.55), share=0.4),
    "pcgrad": summary("PCGrad", final=final(0.78, 0.52), share=0.3),
    "cagrad+recon": summary("cagrad:c=0.4", final=final(0.79, 0.45), split=["enc.0"], params=900, share=0.2),
    "cagrad+recon-s1": summary(
        "cagrad:c=0.4", final=final(0.83, 0.47), seed=1, split=["enc.0"], params=900, share=0.25
    ),
    "cagrad+recon-s2": summary(
        "cagrad:c=0.4", final=final(0.81, 0.40), seed=2, split=["enc.0"], params=900, delta_m=-3.0, share=0.1
    ),
}


def build_run(root, *, profile=True, plan=True, train=True):
    run = root / "run"
    write_json(
        run / "run.json",
        {"recipe": "/x/model.py", "tasks": TASKS, "seed": 0, "created": "2026-01-01T00:00:00", "commands": []},
    )
    if profile:
        info = {n: {"params": p, "type": "Linear", "tasks": TASKS} for n, p in PARAMS.items()}
        meta = {"format": 1, "tasks": TASKS, "layers": LAYERS, "pairs": [TASKS], "S": 0.0, "layer_info": info}
        write_json(run / "profile" / "profile.json", meta)
        np.save(run / "profile" / "cosines.npy", COSINES)
    if plan:
        write_json(run / "split" / "plan.json", {"tasks": TASKS, "layers": ["enc.1", "enc.0"], "S": 0.0, "top_k": 2})
    if train:
        for label, s in VARIANTS.items():
            write_json(run / "train" / label / "summary.json", s)
        metrics = pd.DataFrame({"epoch": [1, 2], "train_loss_seg": [1.0, 0.5], "val_seg_acc": [0.6, 0.7]})
        metrics.to_csv(run / "train" / "joint" / "metrics.csv", index=False)
    return run


def hand_delta_m(acc: float, err: float) -> float:
    """Δm% by hand: seg acc higher is better, depth abs_err lower is better, baselines 0.8 and 0.5."""
    return 100.0 * np.mean([-(acc - 0.8) / 0.8, (err - 0.5) / 0.5])


def test_scores_table_counts_cosines_below_S(tmp_path):
    rep = recon.report(build_run(tmp_path), write=False)
    scores = rep.scores
    # S = 0 (the plan's): enc.0 has -0.5, -0.1, -0.2 -> 3; enc.1 -0.3, -0.6, -0.4 -> 3; enc.2 -0.05 -> 1 (NaN skipped)
    assert scores["score"].to_dict() == {"enc.0": 3, "enc.1": 3, "enc.2": 1}
    assert list(scores.index) == ["enc.0", "enc.1", "enc.2"]  # ties keep the model's order
    assert list(scores["rank"]) == [1, 2, 3]
    assert scores.loc["enc.2", "in conflict"] == pytest.approx(1 / 3)
    assert scores.loc["enc.1", "mean cos"] == pytest.approx(np.mean([0.2, -0.3, -0.6, -0.4]))
    assert scores["branched"].to_dict() == {"enc.0": "yes", "enc.1": "yes", "enc.2": ""}
    low = recon.report(tmp_path / "run", write=False, S=-0.25)
    assert low.S == -0.25
    assert low.scores["score"].to_dict() == {"enc.1": 3, "enc.0": 1, "enc.2": 0}


def test_branched_table_in_plan_order(tmp_path):
    rep = recon.report(build_run(tmp_path), write=False)
    table = rep.branched
    assert list(table.index) == ["enc.1", "enc.0"]
    assert table["order"].tolist() == [1, 2]
    assert table["score"].tolist() == [3, 3]
    assert table["copies"].tolist() == [2, 2]
    assert table["added params"].tolist() == [40, 100]  # one extra copy per layer (two tasks)
    assert "top_k = `2`" in rep.plan_summary


def test_branched_table_counts_one_copy_per_task_group(tmp_path):
    run = build_run(tmp_path)
    plan = json.loads((run / "split" / "plan.json").read_text())
    plan["groups"] = {"enc.1": [["seg", "depth"]], "enc.0": [["seg"], ["depth"]]}  # enc.1: one group, no copy
    write_json(run / "split" / "plan.json", plan)
    table = recon.report(run, write=False).branched
    assert table["copies"].tolist() == [1, 2]
    assert table["added params"].tolist() == [0, 100]


def test_variants_table_delta_m_against_hand_computation(tmp_path):
    rep = recon.report(build_run(tmp_path), write=False)
    v = rep.variants
    # baselines first, then joint, then the other methods; class names of older files read as the user's names
    assert list(v.index[:3]) == ["single-depth", "single-seg", "joint"]
    assert v.loc["joint", "method"] == "joint" and v.loc["pcgrad", "method"] == "pcgrad"
    assert v.loc["cagrad+recon", "method"] == "cagrad:c=0.4"
    dm = v["Δm% ↓"]
    assert dm["joint"] == pytest.approx(hand_delta_m(0.76, 0.55))
    assert dm["pcgrad"] == pytest.approx(hand_delta_m(0.78, 0.52))
    assert dm["cagrad+recon-s1"] == pytest.approx(hand_delta_m(0.83, 0.47))
    assert dm["cagrad+recon-s2"] == -3.0  # a summary's own Δm% is shown as written
    assert math.isnan(dm["single-seg"])
    assert "cagrad+recon-s2" not in rep.delta_m_computed and "joint" in rep.delta_m_computed
    assert dm["joint"] == pytest.approx(recon.delta_m(final(0.76, 0.55), BASE, DIRECTIONS))
    assert v.loc["cagrad+recon", "params +%"] == pytest.approx(12.5)  # 900 vs the unsplit 800
    assert v.loc["cagrad+recon", "branched"] == 1 and v.loc["joint", "branched"] == "—"
    assert v.loc["pcgrad", "seg acc ↑"] == 0.78 and v.loc["joint", "depth abs_err ↓"] == 0.55


def test_seeds_table_mean_and_std_against_numpy(tmp_path):
    rep = recon.report(build_run(tmp_path), write=False)
    seeds = rep.seeds
    row = seeds.loc["cagrad:c=0.4+recon"]
    assert row["seeds"] == 3
    accs = np.array([0.79, 0.83, 0.81])
    assert row["seg acc ↑ mean"] == pytest.approx(accs.mean())
    assert row["seg acc ↑ std"] == pytest.approx(np.std(accs, ddof=1))
    dms = np.array([hand_delta_m(0.79, 0.45), hand_delta_m(0.83, 0.47), -3.0])
    assert row["Δm% ↓ mean"] == pytest.approx(dms.mean())
    assert row["Δm% ↓ std"] == pytest.approx(np.std(dms, ddof=1))
    assert row["cos<0 std"] == pytest.approx(np.std([0.2, 0.25, 0.1], ddof=1))
    assert seeds.loc["joint", "seeds"] == 1 and math.isnan(seeds.loc["joint", "seg acc ↑ std"])
    text = rep.seeds_text()
    assert text.loc["cagrad:c=0.4+recon", "seg acc ↑"] == f"{accs.mean():.4g} ± {np.std(accs, ddof=1):.2g}"
    assert text.loc["joint", "seg acc ↑"] == "0.76"  # one run: the mean alone


def test_no_seeds_table_with_one_run_per_variant(tmp_path):
    run = build_run(tmp_path)
    for label in ("cagrad+recon-s1", "cagrad+recon-s2"):
        for f in (run / "train" / label).iterdir():
            f.unlink()
        (run / "train" / label).rmdir()
    assert recon.report(run, write=False).seeds is None


def test_write_false_writes_nothing_write_true_writes_report(tmp_path):
    run = build_run(tmp_path)
    rep = recon.report(run, write=False)
    assert rep.folder is None and rep.figures == [] and not (run / "report").exists()
    assert "## Trained variants" in rep.markdown and "![" not in rep.markdown
    rep = recon.report(run)
    assert rep.folder == run / "report"
    assert (run / "report" / "report.md").read_text() == rep.markdown
    assert sorted(p.name for p in rep.folder.glob("*.png")) == sorted(rep.figures)
    assert {"heatmap.png", "scores.png", "training_curves.png"} <= set(rep.figures)
    assert "| `cagrad:c=0.4+recon` | 3 |" in rep.markdown


def test_empty_run_and_unreadable_parts(tmp_path):
    run = build_run(tmp_path, profile=False, plan=False, train=False)
    rep = recon.report(run, write=False)
    assert rep.scores is None and rep.branched is None and rep.variants is None and rep.seeds is None
    assert "No profile in this run yet" in rep.markdown and rep.problems == []
    write_json(run / "train" / "joint" / "summary.json", {})
    (run / "train" / "joint" / "summary.json").write_text("{broken")
    rep = recon.report(run, write=False)
    assert rep.variants is None and len(rep.problems) == 1 and "train/joint/" in rep.problems[0]


def test_a_variant_still_training_reads_its_last_epoch(tmp_path):
    run = build_run(tmp_path, train=False)
    frame = pd.DataFrame({"epoch": [1, 2], "val_seg_acc": [0.6, 0.7], "val_depth_abs_err": [0.9, 0.6]})
    (run / "train" / "joint").mkdir(parents=True)
    frame.to_csv(run / "train" / "joint" / "metrics.csv", index=False)
    v = recon.report(run, write=False).variants
    assert v.loc["joint", "seg acc"] == 0.7 and v.loc["joint", "depth abs_err"] == 0.6
    assert v.loc["joint", "method"].startswith("(no summary.json")


def test_bad_input_raises_recon_error(tmp_path):
    with pytest.raises(recon.ReconError, match="not a run folder"):
        recon.report(tmp_path / "nothing", write=False)
    run = build_run(tmp_path)
    with pytest.raises(recon.ReconError, match="-1 < S <= 0"):
        recon.report(run, S=0.5)
