"""`recon.plots` on a real profile (3 tasks), and `recon report` through the real console script."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

import recon
from recon import plots
from recon._runs import Run
from tests.conftest import run_cli

TASKS = ("seg", "depth", "surface_normal")  # an underscore in a task name: metrics.csv columns must still parse
PNG = b"\x89PNG\r\n\x1a\n"


class ThreeTasks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 16)
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 16)
        self.heads = nn.ModuleDict({t: nn.Linear(16, 3) for t in TASKS})

    def forward(self, x):
        z = torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x))))))
        return {t: head(z) for t, head in self.heads.items()}


def batches(n: int = 10):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(16, 6, generator=g), {t: torch.randint(0, 3, (16,), generator=g) for t in TASKS}) for _ in range(n)
    ]


def make_profile(folder, steps: int = 10) -> recon.ConflictProfile:
    torch.manual_seed(0)
    return recon.profile(ThreeTasks(), batches(), {t: F.cross_entropy for t in TASKS}, steps=steps, out=folder)


@pytest.fixture(scope="module")
def prof(tmp_path_factory) -> recon.ConflictProfile:
    return make_profile(tmp_path_factory.mktemp("profile") / "profile")


def metrics_frame(tasks=TASKS, offset: float = 0.0, epochs: int = 3, share: bool = True) -> pd.DataFrame:
    ep = np.arange(1, epochs + 1)
    cols: dict = {"epoch": ep}
    cols |= {f"train_loss_{t}": 1.0 / ep + offset for t in tasks}
    cols |= {f"val_{t}_acc": 0.5 + 0.05 * ep - offset for t in tasks}
    cols |= {f"val_{t}_abs_err": 0.3 - 0.02 * ep + offset for t in tasks}
    cols["seconds"] = 1.0
    if share:
        cols["conflict_share"] = 0.45 - 0.03 * ep - offset
    return pd.DataFrame(cols)


def save_png(fig: Figure, path) -> bytes:
    assert isinstance(fig, Figure)
    fig.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 2000, path
    return data


FIGURES = {
    "conflict_heatmap": lambda p, m: plots.conflict_heatmap(p),
    "conflict_heatmap_S": lambda p, m: plots.conflict_heatmap(p, -0.1),
    "cosine_over_time": lambda p, m: plots.cosine_over_time(p),
    "cosine_over_time_pair": lambda p, m: plots.cosine_over_time(p, ("surface_normal", "seg"), max_bins=4),
    "cosine_distribution": lambda p, m: plots.cosine_distribution({"warm-up": p, "array": p.cosine_array[:5]}),
    "cosine_distribution_kde": lambda p, m: plots.cosine_distribution(p, kind="both", S=-0.05),
    "cosine_distributions": lambda p, m: plots.cosine_distributions(
        {"joint": {"joint": p, "joint+recon": p.cosine_array[:, 1:]}, "pcgrad": {"pcgrad": p}}, ncols=2
    ),
    "score_bars": lambda p, m: plots.score_bars(p, k=2),
    "score_bars_branched": lambda p, m: plots.score_bars(p, branched=["l2"]),
    "training_curves": lambda p, m: plots.training_curves(m),
    "training_curves_one": lambda p, m: plots.training_curves(m["joint"]),
    "conflict_share_curves": lambda p, m: plots.conflict_share_curves(m),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_writes_a_png_from_a_real_profile(prof, tmp_path, name):
    metrics = {"joint": metrics_frame(), "single-seg": metrics_frame(("seg",), 0.05, share=False)}
    csv = tmp_path / "metrics.csv"
    metrics_frame().to_csv(csv, index=False)
    metrics["from csv"] = csv
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    fig = FIGURES[name](prof, metrics)
    save_png(fig, tmp_path / f"{name}.png")
    assert set(plt.get_fignums()) == before, "figures must not pile up in pyplot's global state"
    assert any(ax.get_title() for ax in fig.axes) or fig.get_suptitle()


def test_profile_is_real_and_has_three_pairs(prof):
    assert prof.tasks == list(TASKS) and prof.layers == ["l1", "l2", "l3"]
    assert prof.cosine_array.shape == (10, 3, 3)


def test_cosine_over_time_bins_many_steps_and_picks_one_pair(prof):
    fig = plots.cosine_over_time(prof, max_bins=4)
    image = fig.axes[1].images[0].get_array()
    assert image.shape == (3, 4)  # layers x bins
    arr = np.asarray(prof.cosine_array)
    first_bin = np.nanmean(arr[:2].mean(axis=2), axis=0)  # 10 steps in 4 bins: edges 0, 2, 5, 8, 10
    np.testing.assert_allclose(np.asarray(image)[:, 0], first_bin, rtol=1e-5)
    pair = plots.cosine_over_time(prof, "seg-depth").axes[1].images[0].get_array()
    np.testing.assert_allclose(np.asarray(pair), arr[:, :, 0].T, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown task pair"):
        plots.cosine_over_time(prof, "seg-nothing")


def test_cosine_distribution_legend_gives_the_share_below_zero(prof):
    cos = prof.cosines["cos"].dropna().to_numpy()
    fig = plots.cosine_distribution({"warm-up": prof, "flipped": -cos}, kind="hist")
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert f"warm-up: {np.mean(cos < 0):.1%} below 0" in texts[0]
    assert f"flipped: {np.mean(-cos < 0):.1%} below 0" in texts[1]
    assert f"n={cos.size:,}" in texts[0]
    assert texts[-1] == "S = 0"
    with pytest.raises(ValueError, match="kind"):
        plots.cosine_distribution(prof, kind="violin")


def test_score_bars_mark_the_top_k(prof):
    fig = plots.score_bars(prof, k=2)
    bars = fig.axes[0].patches
    colours = [tuple(b.get_facecolor()) for b in bars]
    branched = [c for c in colours if c == colours[0]]
    assert len(bars) == 3 and len(branched) == 2
    heights = [b.get_width() for b in bars]
    assert heights == sorted(heights, reverse=True) == list(prof.scores()["score"])


def test_split_metric_columns_handles_underscores():
    cols = metrics_frame().columns
    parsed = plots.split_metric_columns(list(cols), TASKS)
    assert parsed["surface_normal"] == {
        "train_loss": "train_loss_surface_normal",
        "acc": "val_surface_normal_acc",
        "abs_err": "val_surface_normal_abs_err",
    }
    fig = plots.training_curves(metrics_frame(), directions={"seg": {"acc": "higher"}})
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.axison]
    assert "seg: val acc (higher is better)" in titles and "surface_normal: val abs_err" in titles
    assert len(titles) == 3 * 3  # train loss + 2 metrics per task


def test_a_profile_without_shared_layers_still_draws(tmp_path):
    class Apart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            return {"a": self.a(x), "b": self.b(x)}

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 6, generator=g), {t: torch.randint(0, 3, (4,), generator=g) for t in "ab"})]
    empty = recon.profile(Apart(), data, {t: F.cross_entropy for t in "ab"}, steps=1)
    assert empty.layers == []
    for fig in (
        plots.conflict_heatmap(empty),
        plots.cosine_over_time(empty),
        plots.cosine_distribution(empty),
        plots.score_bars(empty, k=0),
    ):
        save_png(fig, tmp_path / "empty.png")


# --- recon report through the console script ---------------------------------------------------------------
def build_run(root, *, train: bool = True, plan: bool = True) -> tuple[recon.ConflictProfile, dict]:
    """A run folder: a real profile, a split plan and hand-made train/<label>/ files in the lead's format."""
    run = Run.create(recipe=root / "model.py", tasks=list(TASKS), seed=0, out=root / "runs" / "tiny")
    run.record_command(["recon", "profile", "model.py"])
    prof = make_profile(run.dir / "profile", steps=12)
    top = prof.top_layers(2)
    if plan:
        (run.dir / "split").mkdir()
        plan_json = {"tasks": list(TASKS), "layers": top, "init": "reinit", "S": 0.0, "top_k": 2}
        (run.dir / "split" / "plan.json").write_text(json.dumps(plan_json))
    finals = {}
    if not train:
        return prof, finals

    def variant(label, method, split, params, offset, single=None, seed=0):
        folder = run.dir / "train" / label
        folder.mkdir(parents=True)
        tasks = (single,) if single else TASKS
        metrics_frame(tasks, offset, share=not single).to_csv(folder / "metrics.csv", index=False)
        final = {t: {"acc": 0.65 - offset, "abs_err": 0.24 + offset} for t in tasks}
        finals[label] = final
        summary = {
            "label": label,
            "method": method,
            "split": {"layers": top} if split else None,
            "params": params,
            "epochs": 3,
            "seed": seed,
            "final": final,
            "directions": {t: {"acc": "higher", "abs_err": "lower"} for t in tasks},
            "delta_m": None,
            "baseline": None,
            "conflict_share": None if single else 0.36 - offset,
        }
        if single:
            summary["single_task"] = single
        (folder / "summary.json").write_text(json.dumps(summary))

    for t in TASKS:
        variant(f"single-{t}", "joint", False, 500, 0.0, single=t)
    variant("joint", "joint", False, 800, 0.02)
    variant("pcgrad", "pcgrad", False, 800, 0.01)
    variant("pcgrad+recon", "pcgrad", True, 1300, -0.01)
    variant("pcgrad+recon-s1", "pcgrad", True, 1300, -0.02, seed=1)
    # a variant that recorded its cosines during training joins the distribution figure
    np.save(run.dir / "train" / "pcgrad+recon" / "cosines.npy", np.asarray(prof.cosine_array)[:, :1] * 0.5)
    np.save(run.dir / "train" / "joint" / "cosines.npy", np.asarray(prof.cosine_array))
    return prof, finals


REPORT_FIGURES = (
    "heatmap.png",
    "scores.png",
    "cosine_time.png",
    "cosine_distribution.png",
    "cosine_distributions.png",
    "training_curves.png",
    "conflict_share.png",
)


def test_report_writes_figures_and_markdown(tmp_path):
    prof, finals = build_run(tmp_path)
    res = run_cli("report", "runs/tiny", cwd=tmp_path, env={"COLUMNS": "300"})
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "runs" / "tiny" / "report"
    for name in REPORT_FIGURES:
        assert (folder / name).read_bytes().startswith(PNG), name
        assert (folder / name).stat().st_size > 2000, name
    md = (folder / "report.md").read_text()
    for name in REPORT_FIGURES:
        assert f"({name})" in md
    for heading in ("## Conflict profile", "## Branched layers", "## Trained variants", "## Layer-wise cosines"):
        assert heading in md
    top = prof.scores().iloc[0]
    assert re.search(rf"\| `{top.name}` \| 1 \| {int(top['score'])} \|", md)
    # Δm% of "joint": every acc 0.63 vs 0.65 (higher better), every abs_err 0.26 vs 0.24 (lower better)
    expected = 100 * np.mean([(0.65 - 0.63) / 0.65, (0.26 - 0.24) / 0.24])
    row = next(line for line in md.splitlines() if line.startswith("| `joint` |"))
    assert f"{expected:+.2f}" in row
    assert "+62.5" in next(line for line in md.splitlines() if line.startswith("| `pcgrad+recon` |"))  # params +%
    assert "Mean ± standard deviation over seeds" in md and "| `pcgrad+recon` | 2 |" in md
    assert not list(folder.glob(".*.tmp")), "atomic writes leave no temporary file"
    out = res.stdout
    assert "S-conflict scores" in out and "branched layers" in out and "trained variants" in out
    assert "surface_normal acc" in out and "pcgrad+recon" in out
    assert "report written to" in out


def test_report_on_the_latest_run_with_only_a_profile(tmp_path):
    build_run(tmp_path, train=False, plan=False)
    res = run_cli("report", cwd=tmp_path)  # no RUN_DIR: the most recent run under ./runs
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "runs" / "tiny" / "report"
    md = (folder / "report.md").read_text()
    assert "No split plan yet" in md and "No trained variant yet" in md
    assert {p.name for p in folder.glob("*.png")} == {
        "heatmap.png",
        "scores.png",
        "cosine_time.png",
        "cosine_distribution.png",
    }
    res = run_cli("report", "--S", "-0.2", "--out", "elsewhere", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "S = -0.2" in (tmp_path / "elsewhere" / "report.md").read_text()


def test_report_bad_input_exits_2(tmp_path):
    res = run_cli("report", cwd=tmp_path)
    assert res.returncode == 2 and "no run found" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("report", str(tmp_path / "nothing"), cwd=tmp_path)
    assert res.returncode == 2 and "not a run folder" in res.stderr
    build_run(tmp_path, train=False, plan=False)
    res = run_cli("report", "runs/tiny", "--S", "0.5", cwd=tmp_path)
    assert res.returncode == 2 and "-1 < S <= 0" in res.stderr


def test_report_skips_unreadable_parts(tmp_path):
    build_run(tmp_path)
    (tmp_path / "runs/tiny/train/joint/summary.json").write_text("{broken")
    res = run_cli("report", "runs/tiny", cwd=tmp_path, env={"COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "train/joint/ could not be read fully" in res.stderr
    assert "## Problems" in (tmp_path / "runs/tiny/report/report.md").read_text()
    assert os.path.getsize(tmp_path / "runs/tiny/report/training_curves.png") > 2000
