"""``recon split``: stage 2, branch the chosen shared layers per task with torch.fx (recon._split)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import typer

from cli._common import console, resolve_device
from recon import _io, plots
from recon._capture import example_args, layer_usage
from recon._codegen import generated_code
from recon._errors import ReconError
from recon._outputs import call_model, move_to, task_outputs
from recon._profile import ConflictProfile, check_threshold, read_scores_json
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
    chosen, how = _choose_layers(run, top_k, S, layers, scores)
    leaves = leaves or list(how.get("leaf_modules") or [])  # default: the leaves the profile was traced with

    torch.manual_seed(int(run.info.get("seed", 0)))
    model = recipe.build_model()
    if not isinstance(model, torch.nn.Module):
        raise ReconError(f"{recipe.path}: build_model() returned {type(model).__name__}; return an nn.Module")
    inputs, _ = first_batch(recipe)  # the example batch: capture with torch.export where fx cannot, and check
    net = split(model, chosen, tasks=tasks, init=init, leaf_modules=leaves, example_inputs=example_args(inputs))
    branches: dict[str, list[str]] = net.meta["recon"]["branches"]

    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in net.parameters())
    ratio = _time_ratio(model, net, recipe, resolve_device(device))

    plan = SplitPlan(
        tasks=tasks,
        layers=chosen,
        init=init,
        S=how.get("S"),
        top_k=top_k,
        scores=how.get("scores"),
        leaf_modules=list(net.meta["recon"]["leaf_modules"]),
        model_class=type(model).__name__,
        capture=net.meta["recon"]["capture"],
        extra={
            "source": how["source"],
            "params_before": before,
            "params_after": after,
            "time_ratio": None if ratio is None else round(ratio, 4),
            "branches": branches,
        },
    )
    folder = run.stage("split", force=force)
    run.record_command()
    plan.save(folder / "plan.json")
    _io.write_text(folder / "model.py", generated_code(net, plan, recipe.path))
    usage = layer_usage(model, tasks, example_inputs=example_args(inputs), leaf_modules=leaves)
    fig = plots.network_figure(usage, tasks, branches, {n: m for n, m in model.named_modules()})
    _io.save_figure(folder / "network.png", fig, dpi=110)

    _print_summary(chosen, branches, how.get("scores"), before, after, ratio)
    console.print(
        f"plan and code written to [bold]{folder}[/]  ·  next: [bold]recon train {recipe.path.name} --split latest[/]"
    )


# ------------------------------------------------------------------------------------------- choosing
def _names(text: str) -> list[str]:
    return [n for n in (s.strip() for s in text.split(",")) if n]


def _choose_layers(
    run: Run, top_k: int | None, S: float | None, layers: str | None, scores: Path | None
) -> tuple[list[str], dict[str, Any]]:
    """The layers to branch, and how they were chosen (source, S, scores, leaf modules of the profile)."""
    if layers is not None:
        if top_k is not None or scores is not None:
            raise ReconError("pass either --layers or --top-k/--scores, not both")
        if S is not None:
            raise ReconError("--S rescores the stored profile for --top-k; it has no effect with --layers")
        names = _names(layers)
        if not names:
            raise ReconError("--layers is empty; give comma-separated layer names, e.g. --layers layer4.1.conv2")
        return names, {"source": "layers"}
    if top_k is None:
        raise ReconError(
            "say which layers to branch: --top-k K (the K layers with the highest S-conflict scores of the "
            "stored profile), --scores scores.json --top-k K, or --layers a,b"
        )
    if scores is not None:
        if S is not None:
            raise ReconError("--S rescores the stored profile; a scores.json file holds fixed scores, drop --S")
        ranked = read_scores_json(scores)
        return _top(list(ranked), top_k, f"{scores}"), {
            "source": str(scores),
            "scores": dict(ranked),
        }
    profile_dir = run.dir / "profile"
    prof = ConflictProfile.load(profile_dir)
    frame = prof.scores(S)
    ranked = {str(layer): int(score) for layer, score in frame["score"].items()}
    how: dict[str, Any] = {
        "source": str(profile_dir),
        "S": prof.S if S is None else S,
        "scores": ranked,
        "leaf_modules": prof.meta.get("leaf_modules", []),
    }
    return _top(list(ranked), top_k, f"the profile in {profile_dir}"), how


def _top(ranked: list[str], k: int, where: str) -> list[str]:
    # the root module's own parameters ("") cannot be branched: they have no path of their own
    candidates = [name for name in ranked if name]
    if k > len(candidates):
        raise ReconError(
            f"--top-k {k} exceeds the {len(candidates)} shared layers in {where}; choose K <= {len(candidates)} "
            f"(shared layers: {', '.join(candidates)})"
        )
    return candidates[:k]


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
def _print_summary(
    chosen: list[str],
    branches: dict[str, list[str]],
    scores: dict[str, int] | None,
    before: int,
    after: int,
    ratio: float | None,
) -> None:
    from rich.table import Table

    if chosen:
        table = Table(title=f"{len(chosen)} branched layer(s)", title_justify="left", header_style="bold")
        table.add_column("layer", style="cyan", no_wrap=True)
        if scores:
            table.add_column("score", justify="right")
        table.add_column("copies for tasks")
        for layer in chosen:
            row = [layer]
            if scores:
                row.append(str(scores.get(layer, "")))
            row.append(", ".join(branches.get(layer, [])))
            table.add_row(*row)
        console.print(table)
    else:
        console.print("no layer branched: the split model is the original one")
    grown = (after - before) / before * 100 if before else 0.0
    console.print(f"parameters: {before:,} -> {after:,} ({grown:+.1f}%)")
    if ratio is not None:
        console.print(f"forward+backward time, split / original on the first batch: {ratio:.2f}x")
