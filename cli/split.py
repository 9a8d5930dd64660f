"""``recon split``: stage 2, branch the chosen shared layers per task with torch.fx (recon._split)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import typer

from cli._common import console, resolve_device
from recon import _io, plots
from recon._capture import example_args, layer_usage
from recon._codegen import generated_code
from recon._errors import ReconError
from recon._outputs import call_model, move_to, task_outputs
from recon._plan import choose_layers, parse_budget
from recon._profile import check_threshold
from recon._recipe import compute_losses, first_batch, load_recipe
from recon._runs import Run
from recon._split import INITS, SplitPlan, split


def split_command(
    top_k: int | None = typer.Option(None, "--top-k", "-k", min=0, help="Branch the K layers with the highest scores."),
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
    init: str = typer.Option("reinit", "--init", help="reinit: fresh copies (reset_parameters); copy: warm start."),
    leaf: str = typer.Option("", "--leaf", help="Comma-separated module names torch.fx should treat as opaque."),
    run_dir: Path | None = typer.Option(None, "--run", help="Run folder (default: the latest in ./runs)."),
    device: str = typer.Option("cpu", "--device", help="Where to time the split model: auto, cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing split in the run folder."),
) -> None:
    """Stage 2: rewrite the model with torch.fx so that the chosen layers become per-task branches."""
    if init not in INITS:
        raise ReconError(f"--init {init!r} is not one of {list(INITS)}")
    if S is not None:
        check_threshold(S)
    run = Run.open(run_dir)
    folder = run.dir / "split"
    if folder.exists() and any(folder.iterdir()) and not force:
        raise ReconError(f"{folder} already holds results; pass --force to overwrite them or --run for another run")
    recipe = load_recipe(run.recipe)
    tasks = list(recipe.tasks)
    leaves = [n for n in (s.strip() for s in leaf.split(",")) if n]
    torch.manual_seed(int(run.info.get("seed", 0)))
    model = recipe.build_model()
    if not isinstance(model, torch.nn.Module):
        raise ReconError(f"{recipe.path}: build_model() returned {type(model).__name__}; return an nn.Module")
    inputs, _ = first_batch(recipe)  # the example batch: capture with torch.export where fx cannot, and check
    params, flops = parse_budget(budget_params, "--budget-params"), parse_budget(budget_flops, "--budget-flops")
    how = choose_layers(
        run.dir / "profile", top_k=top_k, S=S, layers=layers, scores=scores, budget_params=params,
        budget_flops=flops, groups=groups, model=model, example_inputs=inputs if flops is not None else None,
    )  # fmt: skip
    leaves = leaves or how.leaf_modules  # default: the leaves the profile was traced with
    net = split(model, how.layers, tasks=tasks, init=init, leaf_modules=leaves, example_inputs=example_args(inputs))
    branches: dict[str, list[str]] = net.meta["recon"]["branches"]

    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in net.parameters())
    ratio = _time_ratio(model, net, recipe, resolve_device(device))
    plan = _record(how, net, model, top_k, init, (params, flops), before, after, ratio)
    folder = run.stage("split", force=force)
    run.record_command()
    plan.save(folder / "plan.json")
    _io.write_text(folder / "model.py", generated_code(net, plan, recipe.path))
    usage = layer_usage(model, tasks, example_inputs=example_args(inputs), leaf_modules=leaves)
    fig = plots.network_figure(
        usage, tasks, branches, {n: m for n, m in model.named_modules()}, groups=net.meta["recon"]["groups"]
    )
    _io.save_figure(folder / "network.png", fig, dpi=110)

    _print_summary(plan, ratio)
    console.print(
        f"plan and code written to [bold]{folder}[/]  ·  next: [bold]recon train {recipe.path.name} --split latest[/]"
    )


def _record(how, net, model, top_k, init, budgets, before: int, after: int, ratio: float | None) -> SplitPlan:
    """The plan.json of this split: what was branched, how it was chosen, what it cost."""
    budget = how.plan.extra if how.plan is not None else {}
    return SplitPlan(
        tasks=list(net.meta["recon"]["tasks"]),
        layers=list(net.meta["recon"]["branches"]),
        init=init,
        S=how.S,
        top_k=top_k,
        scores=how.scores,
        groups=net.meta["recon"]["groups"] if how.plan is not None else None,
        budget_params=budgets[0],
        budget_flops=budgets[1],
        leaf_modules=list(net.meta["recon"]["leaf_modules"]),
        model_class=type(model).__name__,
        capture=net.meta["recon"]["capture"],
        extra={
            "source": how.source,
            "params_before": before,
            "params_after": after,
            "time_ratio": None if ratio is None else round(ratio, 4),
            "branches": net.meta["recon"]["branches"],
            **{k: budget[k] for k in ("removed", "params_added", "flops_before", "flops_after") if k in budget},
        },
    )


# ------------------------------------------------------------------------------------------- measuring
def _time_ratio(model: torch.nn.Module, net: torch.nn.Module, recipe, device: torch.device) -> float | None:
    """Median forward+backward time of the split model over the original's, on the first training batch."""
    inputs, targets = first_batch(recipe)
    inputs, targets = move_to(inputs, device), move_to(targets, device)
    tasks = list(recipe.tasks)
    model, net = model.to(device), net.to(device)

    def step(m: torch.nn.Module) -> float:
        m.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        outputs = task_outputs(call_model(m, inputs), tasks)
        loss = sum(compute_losses(recipe.losses, outputs, targets).values())
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    model.train()  # no weights are written by this stage, so moving BatchNorm statistics is harmless
    net.train()
    for m in (model, net):
        step(m)
    original, branched = [], []
    for _ in range(5):
        original.append(step(model))
        branched.append(step(net))
    base = statistics.median(original)
    return statistics.median(branched) / base if base > 0 else None


# -------------------------------------------------------------------------------------------- printing
def _print_summary(plan: SplitPlan, ratio: float | None) -> None:
    """Per branched layer: its task groups, the score it removes, the parameters it adds; then the totals
    against each budget."""
    from rich.table import Table

    extra = plan.extra
    removed, added = extra.get("removed") or {}, extra.get("params_added") or {}
    groups = plan.groups or {layer: [[t] for t in tasks] for layer, tasks in extra["branches"].items()}
    if plan.layers:
        table = Table(title=f"{len(plan.layers)} branched layer(s)", title_justify="left", header_style="bold")
        table.add_column("layer", style="cyan", no_wrap=True)
        if plan.scores:
            table.add_column("score", justify="right")
        if removed:
            table.add_column("score removed", justify="right")
            table.add_column("params added", justify="right")
        table.add_column("copies (task groups)")
        for layer in plan.layers:
            row = [layer]
            if plan.scores:
                row.append(str(plan.scores.get(layer, "")))
            if removed:
                row += [str(removed.get(layer, "")), f"{added.get(layer, 0):,}"]
            row.append(" | ".join(",".join(g) for g in groups.get(layer, [])))
            table.add_row(*row)
        console.print(table)
    else:
        console.print("no layer branched: the split model is the original one")
    before, after = extra["params_before"], extra["params_after"]
    grown = (after - before) / before * 100 if before else 0.0
    line = f"parameters: {before:,} -> {after:,} ({grown:+.1f}%)"
    if plan.budget_params is not None:
        line += f"  ·  budget +{100 * plan.budget_params:.1f}%"
    if removed:
        line += f"  ·  score removed {sum(removed.values())}"
    console.print(line)
    if "flops_after" in extra:
        f0, f1 = extra["flops_before"], extra["flops_after"]
        budget = f"  ·  budget {plan.budget_flops:.2f}x" if plan.budget_flops is not None else ""
        console.print(f"forward FLOPs on the first batch: {f0:,.0f} -> {f1:,.0f} ({f1 / max(f0, 1):.2f}x){budget}")
    if ratio is not None:
        console.print(f"forward+backward time, split / original on the first batch: {ratio:.2f}x")
