"""``recon profile MODEL_PY``: stage 1, the warm-up run that records layer-wise cosines."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

import recon
from cli._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    command,
    console,
    fail,
    frame_table,
    resolve_device,
    say,
    warn,
)
from recon import NonFiniteLossError, Run, load_recipe


def profile_command(
    model_py: Path = typer.Argument(..., help="The recipe file (build_model, losses, train_data, ...)."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Profile this many steps (default: full epochs)."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Warm-up epochs when --steps is not given."),
    S: float = typer.Option(0.0, "--S", "-S", help="Conflict threshold S, -1 < S <= 0 (cos < S counts)."),
    method: str = typer.Option("joint", "--method", help="Warm-up update of the shared layers (see `recon methods`)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the model's initialisation and the data order."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: runs/<recipe>-<time>)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    leaf: str = typer.Option("", "--leaf", help="Comma-separated module names torch.fx should treat as opaque."),
    show: int = typer.Option(10, "--show", min=0, help="How many top layers to print."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing profile in the run folder."),
    precision: str = typer.Option("32", "--precision", help="32, bf16 or fp16 (autocast; fp16 scales the losses)."),
    every: str = typer.Option(
        "1", "--every", help="Record task gradients on every N-th step (N or auto: about 2x a plain epoch)."
    ),
) -> None:
    """Stage 1: warm-up training that records every shared layer's layer-wise cosines, then ranks layers."""
    recipe = load_recipe(model_py)
    period = recon.sampling_period(every, len(recipe.tasks))  # bad arguments fail before any folder is made
    spec = recon.methods.get(method).spec
    recon.check_precision(precision)
    dev = recon.init_distributed(resolve_device(device))  # under torchrun: join the group; rank 0 alone writes
    torch.manual_seed(seed)
    model = recipe.check(device=dev)
    folder = None
    if recon.is_main_process():
        run = Run.create(recipe=model_py, tasks=recipe.tasks, seed=seed, out=out)
        folder = run.stage("profile", force=force)  # locked for this command's life
        run.record_command(method=spec)  # the warm-up method's spec, as profile.json holds it
    folder = recon.broadcast_object(folder)
    if period > 1 and recon.is_main_process():
        why = f" (--every auto at {len(recipe.tasks)} tasks)" if every == "auto" else ""
        console.print(f"recording task gradients on 1 step in {period}{why}; the others train with one backward")
    leaf_modules = tuple(n for n in leaf.split(",") if n)
    try:
        prof = recon.profile(
            model, recipe.train_data, recipe.losses,
            steps=steps, epochs=epochs, S=S, method=method, seed=seed, device=dev, leaf_modules=leaf_modules,
            optimizer=recipe.make_optimizer(model.parameters()), out=folder, progress=True, precision=precision,
            every=period,
        )  # fmt: skip
    except (KeyboardInterrupt, NonFiniteLossError) as e:
        prof = getattr(e, "profile", None)
        if prof is not None and recon.is_main_process():
            _finish(prof, folder, show)
            warn(f"kept {prof.steps_text()}, marked partial, in {folder}")
        if isinstance(e, KeyboardInterrupt):
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise fail(str(e), EXIT_FAILURE) from None
    if recon.is_main_process():
        _finish(prof, folder, show)
        if prof.partial:
            warn(f"the profile stopped after {prof.steps} of {prof.meta.get('steps_asked')} steps; marked partial")
        say(f"profile written to {folder}")
        say(f"next: {_next_split(prof, model_py, out)}")


def _next_split(prof: recon.ConflictProfile, model_py: Path, out: Path | None) -> str:
    """The split command to paste: top-k of the layers that conflict at all (at most 4), on this run."""
    conflicting = int((prof.scores()["score"] > 0).sum()) if prof.layers and prof.steps else 0
    if conflicting == 0:
        train = command("train", model_py, out=out, split="none")
        return f"no shared layer conflicts at S = {prof.S:g}, so train unsplit: {train}"
    return command("split", top_k=min(4, conflicting), run=out)


def _finish(prof: recon.ConflictProfile, folder: Path, show: int) -> None:
    """Heatmap and the table of the top layers (the data files are already written by the profiler)."""
    from recon.plots import conflict_heatmap, save_figure

    if prof.layers and prof.steps:
        save_figure(conflict_heatmap(prof), folder / "heatmap.png", dpi=120)
    if not prof.layers:
        warn("no shared layers: every layer with parameters is used by one task only")
        return
    top = prof.scores().head(show)
    pairs = len(prof.pairs) * prof.steps
    title = (
        f"top {len(top)} of {len(prof.layers)} shared layers by S-conflict score "
        f"(S = {prof.S:g}, {prof.steps_text()} x {len(prof.pairs)} pairs = max {pairs}"
        f"{', partial' if prof.partial else ''}, discovery: {prof.discovery})"
    )
    k = top.attrs["k"]
    shown = ["score", "conflict_rate", "mean_cos", *(["interference"] if "interference" in top else []), "p_top_k"]
    view = top[[*shown, "params", "type"]].rename(
        columns={"conflict_rate": "in conflict", "mean_cos": "mean cos", "p_top_k": f"p(top-{k})"}
    )
    fmt = {"in conflict": lambda v: f"{v:.1%}", "mean cos": "+.3f", "interference": ".3g", f"p(top-{k})": ".2f"}
    console.print(frame_table(view, title=title, index="layer", fmt={**fmt, "params": ","}))
