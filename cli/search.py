"""``recon search MODEL_PY``: choose the split by short paired trials of the candidate plans (``recon.search``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

import recon
from cli._common import command, console, frame_table, say
from recon import ConflictProfile, ReconError, Run, load_recipe


def search_command(
    model_py: Path = typer.Argument(..., help="The recipe file (it needs val_data() and metrics)."),
    budget_params: float | None = typer.Option(
        None, "--budget-params", help="Candidates add at most this fraction of parameters (default 0.1)."
    ),
    budget_flops: float | None = typer.Option(
        None, "--budget-flops", help="... and at most this ratio of the forward FLOPs on the first batch (1.3)."
    ),
    time_budget: str = typer.Option("20m", "--time", help="Time for the whole search: 20m, 90s, 1h30m."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds of the last rung (earlier rungs use fewer); at least 2."),
    method: str = typer.Option("joint", "--method", "-m", help="Gradient method of every trial."),
    candidate: list[str] = typer.Option(
        [], "--candidate", help="A plan of your own to try: comma-separated layers (repeatable)."
    ),
    steps: int | None = typer.Option(
        None, "--steps", min=1, help="First-rung steps per trial (default: what fits --time)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: the latest run of this recipe)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search stored in the run folder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing split/plan.json with the choice."),
) -> None:
    """Choose the split by measurement: short paired trials of the candidate plans, by successive halving."""
    recipe = load_recipe(model_py)
    if recipe.val_data is None or not recipe.metrics:
        raise ReconError(f"{model_py}: search compares candidates on validation data; define val_data() and metrics")
    extra = [[n for n in (s.strip() for s in c.split(",")) if n] for c in candidate]
    if any(not layers for layers in extra):
        raise ReconError("--candidate is empty; give comma-separated layer names, e.g. --candidate layer3.conv1")
    run = Run.for_recipe(model_py, tasks=recipe.tasks, seed=0, out=out)
    plan_file = run.dir / "split" / "plan.json"
    if plan_file.exists() and not force:
        raise ReconError(f"{plan_file} already holds a plan; pass --force to let search replace it, or --out")
    profile = None
    if (run.dir / "profile").is_dir() and any((run.dir / "profile").iterdir()):
        profile = ConflictProfile.load(run.dir / "profile")
    else:
        console.print("no profile in the run folder: search runs a short one for the score-based candidates")
    run.record_command()
    result = recon.search(
        recipe.build_model, recipe.train_data, recipe.val_data, recipe.losses, recipe.metrics,
        budget_params=budget_params, budget_flops=budget_flops, time_budget=time_budget, seeds=seeds,
        method=method, candidates=extra, profile=profile, steps=steps, optimizer=recipe.make_optimizer,
        baselines=run.dir / "train", out=run.dir / "search", resume=resume,
        progress=True,
    )  # fmt: skip
    _print(result)
    if result.plan is None:
        say(f"no split: keep the model as it is ({command('train', model_py, split='none', out=out)})")
        return
    result.plan.save(plan_file)
    say(f"plan written to {plan_file}")
    say("next: " + command("train", model_py, split="latest", out=out))


def _print(result: recon.SearchResult) -> None:
    frame = result.leaderboard.drop(columns=["low", "high"], errors="ignore")
    if "gain %" in frame:
        lb = result.leaderboard
        frame["gain %"] = [
            f"{g:+.2f}" + ("" if pd.isna(lo) else f" [{lo:+.2f}, {hi:+.2f}]")
            for g, lo, hi in zip(lb["gain %"], lb["low"], lb["high"], strict=True)
        ]
    fmt = {c: ".4g" for c in frame.columns if "/" in c}
    fmt.update({"params": ",", "params +%": "+.1f", "FLOPs x": ".2f", "step time x": ".2f", "Δm% (↓)": "+.2f"})
    console.print(frame_table(frame, title=f"leaderboard in {result.folder}", index="candidate", fmt=fmt))
    say("short trials: a ranking of candidates, not final accuracies")
    for note in result.notes:
        say(f"note: {note}", style="dim")
    say(result.verdict)
