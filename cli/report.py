"""``recon report [RUN_DIR]``: the figures and tables of whatever a run holds, as PNGs and a Markdown summary.

The work is :func:`recon.report` (it reads the run, computes the tables, writes ``RUN_DIR/report/report.md`` and
the figures); this command prints its tables.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

import recon
from cli._common import command, console, frame_table, say, warn


def report_command(
    run: Path | None = typer.Argument(None, help="The run folder (default: the most recent run under ./runs)."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for report.md and the figures (default: RUN_DIR/report)."
    ),
    S: float | None = typer.Option(
        None,
        "--S",
        "-S",
        help="Score layers at this threshold, -1 < S <= 0 (default: the split plan's, else the profile's).",
    ),
    show: int = typer.Option(20, "--show", min=0, help="Rows of the score table to print (report.md lists up to 60)."),
    dpi: int = typer.Option(120, "--dpi", min=30, max=600, help="Resolution of the PNG figures."),
) -> None:
    """Figures and tables of what a run holds: conflict profile, branched layers, trained variants, Δm%."""
    rep = recon.report(run, out=out, S=S, dpi=dpi)
    console.rule(Text(f"recon report  {rep.run_dir}", style="bold"))
    _print_profile(rep, show)
    _print_plan(rep)
    _print_variants(rep)
    for p in rep.problems:
        warn(p)
    say(f"report written to {rep.folder / 'report.md'} ({len(rep.figures)} figures)")


def _print_profile(rep: recon.Report, show: int) -> None:
    prof = rep.profile
    if prof is None:
        console.print("[dim]no profile yet (recon profile MODEL_PY)[/]")
    elif rep.scores is None:
        warn("the profile holds no shared layer or no step")
    else:
        n = len(rep.scores)
        what = "S-conflict scores" if rep.score == "s-conflict" else "interference scores (the plan's)"
        title = f"{what} (S = {rep.S:g}, {prof.steps_text()}; top {min(show, n)} of {n})"
        console.print(frame_table(rep.scores.head(show), title=title, index="layer", fmt=rep.formats["scores"]))


def _print_plan(rep: recon.Report) -> None:
    if rep.plan is None:
        console.print("[dim]no split plan yet (recon split --top-k K)[/]")
    elif rep.branched is not None and not rep.branched.empty:
        title = f"branched layers ({rep.plan_summary})"
        console.print(frame_table(rep.branched, title=title, index="layer", fmt=rep.formats["branched"]))


def _print_variants(rep: recon.Report) -> None:
    if rep.variants is None:
        console.print("[dim]no trained variant yet (recon train MODEL_PY)[/]")
        return
    title = "trained variants (final validation metrics)"
    console.print(frame_table(rep.variants, title=title, index="label", fmt=rep.formats["variants"]))
    if rep.variants["Δm% ↓"].isna().all():
        baseline = command("train", recon.Run.open(rep.run_dir).recipe, single_task=True, split="none", out=rep.run_dir)
        say(f"Δm% is empty: it needs the single-task baselines: {baseline}")
    if "partial" in rep.variants.columns:
        say("partial: interrupted runs, shown but left out of the mean ± std over seeds")
    seeds = rep.seeds_text()
    if seeds is not None:
        console.print(frame_table(seeds, title="mean ± std over seeds", index="variant"))
