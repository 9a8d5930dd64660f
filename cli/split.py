"""``recon split``: stage 2, branch the chosen shared layers per task with torch.fx (``recon.split_run``)."""

from __future__ import annotations

from pathlib import Path

import typer

import recon
from cli._common import command, console, resolve_device, say, warn

#: A split model this many times slower per step than the original gets a warning unless a FLOP budget bounds it.
SLOW = 2.0


def split_command(
    top_k: int | None = typer.Option(None, "--top-k", "-k", min=1, help="Branch the K layers with the highest scores."),
    S: float | None = typer.Option(
        None, "--S", "-S", help="Rescore the stored profile at this threshold, -1 < S <= 0."
    ),
    layers: str | None = typer.Option(
        None, "--layers", help="Comma-separated layer names to branch (instead of --top-k)."
    ),
    scores: Path | None = typer.Option(
        None, "--scores", help="An official-format scores.json ({layer: score}) to take the top-k layers from."
    ),
    budget_params: str | None = typer.Option(
        None, "--budget-params", help="Remove the most conflict adding at most this fraction of parameters (0.1)."
    ),
    budget_flops: str | None = typer.Option(
        None, "--budget-flops", help="... within this ratio of the forward FLOPs on the first batch (1.3)."
    ),
    groups: str = typer.Option("none", "--groups", help="auto: choose each layer's task groups; none: one per task."),
    score: str = typer.Option(
        "s-conflict", "--score", help="Rank layers by s-conflict (the paper's count) or interference (-<g_i, g_j>)."
    ),
    init: str = typer.Option("reinit", "--init", help="reinit: fresh copies (reset_parameters); copy: warm start."),
    leaf: str = typer.Option("", "--leaf", help="Comma-separated module names torch.fx should treat as opaque."),
    run_dir: Path | None = typer.Option(None, "--run", help="Run folder (default: the latest in ./runs)."),
    device: str = typer.Option("cpu", "--device", help="Where to time the split model: auto, cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing split in the run folder."),
    require_complete: bool = typer.Option(
        False, "--require-complete", help="Refuse a profile that stopped early (default: warn and record it)."
    ),
) -> None:
    """Stage 2: rewrite the model with torch.fx so that the chosen layers become per-task branches."""
    leaves = [n for n in (s.strip() for s in leaf.split(",")) if n]
    run, plan = recon.split_run(
        run_dir, top_k=top_k, S=S, layers=layers, scores=scores, budget_params=budget_params,
        budget_flops=budget_flops, groups=groups, init=init, leaf_modules=leaves, device=resolve_device(device),
        force=force, score=score, require_complete=require_complete,
    )  # fmt: skip
    partial = plan.extra.get("profile_partial")
    if partial is not None:
        warn(
            f"planned from a partial profile ({partial['steps']} of {partial['of'] or '?'} steps); recorded in "
            "plan.json (pass --require-complete to refuse)"
        )
    _print_summary(plan, plan.extra["time_ratio"])
    warning = plan.extra.get("unstable")
    if warning:
        warn(warning)
    say(f"plan and code written to {run.dir / 'split'}")
    say("next: " + command("train", run.recipe, split="latest", out=run_dir))


# -------------------------------------------------------------------------------------------- printing
def _copies(parts: list[list[str]], n_tasks: int) -> str:
    """A layer's task groups: every name up to 12 tasks; above, ``13 copies: left_odd+3 | equal | ...``."""
    from recon.plots import MANY_TASKS, group_label

    if n_tasks <= MANY_TASKS:
        return " | ".join(",".join(g) for g in parts)
    return f"{len(parts)} copies: " + " | ".join(group_label(g) for g in parts)


def _print_summary(plan: recon.SplitPlan, ratio: float | None) -> None:
    """Per branched layer: its task groups, the score it removes, the parameters it adds; then the totals
    against each budget."""
    from rich.table import Table
    from rich.text import Text

    extra = plan.extra
    removed, added = extra.get("removed") or {}, extra.get("params_added") or {}
    confidence, k = extra.get("p_top_k") or {}, extra.get("confidence_k")
    interference = extra.get("score") == "interference"
    groups = plan.groups or {layer: [[t] for t in tasks] for layer, tasks in extra["branches"].items()}
    if plan.layers:
        table = Table(title=f"{len(plan.layers)} branched layer(s)", title_justify="left", header_style="bold")
        table.add_column("layer", style="cyan", no_wrap=True)
        if plan.scores:
            table.add_column("interference" if interference else "score", justify="right")
        if confidence:
            table.add_column(f"p(top-{k})", justify="right")
        if removed:
            table.add_column("score removed", justify="right")
            table.add_column("params added", justify="right")
        table.add_column("copies (task groups)")
        for layer in plan.layers:
            row = [layer]
            if plan.scores:
                row.append(_score_text(plan.scores.get(layer, "")))
            if confidence:
                row.append(f"{confidence[layer]:.2f}" if layer in confidence else "")
            if removed:
                row += [_score_text(removed.get(layer, "")), f"{added.get(layer, 0):,}"]
            row.append(_copies(groups.get(layer, []), len(plan.tasks)))
            table.add_row(*(Text(cell) for cell in row))  # names are data, never markup
        console.print(table)
    else:
        console.print("no layer branched: the split model is the original one")
    before, after = extra["params_before"], extra["params_after"]
    grown = (after - before) / before * 100 if before else 0.0
    line = f"parameters: {before:,} -> {after:,} ({grown:+.1f}%)"
    if plan.budget_params is not None:
        line += f"  ·  budget +{100 * plan.budget_params:.1f}%"
    if removed:
        line += f"  ·  {'interference' if interference else 'score'} removed {_score_text(sum(removed.values()))}"
    console.print(line)
    if "flops_after" in extra:
        f0, f1 = extra["flops_before"], extra["flops_after"]
        budget = f"  ·  budget {plan.budget_flops:.2f}x" if plan.budget_flops is not None else ""
        console.print(f"forward FLOPs on the first batch: {f0:,.0f} -> {f1:,.0f} ({f1 / max(f0, 1):.2f}x){budget}")
    if ratio is not None:
        console.print(f"forward+backward time, split / original on the first batch: {ratio:.2f}x")
        if ratio > SLOW and plan.budget_flops is None:
            warn(f"the split model takes {ratio:.2f}x the time per step; bound it with --budget-flops (e.g. 1.3)")


def _score_text(value: object) -> str:
    """An S-conflict count as is; an interference (a float) with 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
