"""``recon train MODEL_PY``: stage 3, train from scratch (split plan applied) with a gradient method."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import typer

import recon
from cli._common import console, frame_table, resolve_device
from recon import _distributed, _io
from recon._capture import example_args
from recon._errors import ReconError
from recon._recipe import Recipe, check_recipe, first_batch, load_recipe
from recon._runs import RUNS_ROOT, Run
from recon._train import SUMMARY, delta_m, load_baselines, seed_everything


def find_run(recipe: Path, out: Path | None, tasks: list[str], seed: int) -> Run:
    """``--out``, else the latest run made from the same recipe, else a new run."""
    if out is not None:
        return Run.create(recipe=recipe, tasks=tasks, seed=seed, out=out)
    mine = []
    for file in RUNS_ROOT.glob("*/run.json") if RUNS_ROOT.is_dir() else []:
        info = json.loads(file.read_text())
        if Path(info.get("recipe", "")) == recipe.resolve():
            mine.append((info.get("created_unix", 0.0), file.parent))
    if mine:
        return Run.open(max(mine)[1])
    return Run.create(recipe=recipe, tasks=tasks, seed=seed)


def load_plan(run: Run, split: str, tasks: list[str]):
    if split == "none":
        return None
    path = run.dir / "split" / "plan.json" if split == "latest" else Path(split)
    if not path.exists():
        if split == "latest":
            return None
        raise ReconError(f"--split {split}: no such plan file; pass a plan.json, 'latest' or 'none'")
    plan = recon.SplitPlan.load(path)
    if list(plan.tasks) != list(tasks):
        raise ReconError(f"{path} was made for tasks {list(plan.tasks)}, not {tasks}; split again for this recipe")
    return plan


def train_command(
    model_py: Path = typer.Argument(..., help="The recipe file."),
    method: str = typer.Option("joint", "--method", "-m", help="Gradient method (see `recon methods`)."),
    hp: list[str] = typer.Option([], "--hp", help="Method hyperparameter name=value (repeatable)."),
    split: str = typer.Option("latest", "--split", help="Split plan: a plan.json, 'latest' (the run's) or 'none'."),
    epochs: int = typer.Option(3, "--epochs", min=1, help="Training epochs."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation and data order."),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default: the latest run of this recipe)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the variant's checkpoint.pt."),
    single_task: bool = typer.Option(False, "--single-task", help="Train one model per task (Δm% baseline)."),
    sparse: float | None = typer.Option(
        None, "--sparse", help="Sparse training: ratio of shared weights kept trainable."
    ),
    label: str | None = typer.Option(None, "--label", help="Name of the variant folder under train/."),
    record_cosines: bool = typer.Option(
        False,
        "--record-cosines",
        help="Record the shared layers' cosines every step (free with gradient methods; one more backward per "
        "task otherwise).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing variant."),
    precision: str = typer.Option("32", "--precision", help="32, bf16 or fp16 (autocast; fp16 scales the losses)."),
) -> None:
    """Stage 3: train from scratch (fresh build_model(), split plan applied) with a gradient method."""
    recipe = load_recipe(model_py)
    dev = resolve_device(device)
    _distributed.init_from_env(dev)  # under torchrun: join the group; rank 0 alone writes and prints
    dev = _distributed.local_device(dev)
    hparams = recon.methods.parse_hparams(hp)
    spec = recon.methods.get(method, **hparams).spec  # a bad name or hyperparameter fails before any work
    if sparse is not None and not 0.0 < sparse <= 1.0:
        raise ReconError(f"--sparse {sparse}: the kept ratio must be in (0, 1]")
    check_recipe(recipe, device=dev)
    main = _distributed.is_main()
    if (recipe.val_data is None or not recipe.metrics) and main:
        console.print("[yellow]the recipe has no val_data()/metrics: only training losses are recorded[/]")
    run_dir = find_run(model_py, out, recipe.tasks, seed).dir if main else None
    run = Run.open(_distributed.broadcast_object(run_dir))
    plan = None if single_task else load_plan(run, split, recipe.tasks)
    variants = [(t,) for t in recipe.tasks] if single_task else [tuple(recipe.tasks)]
    if main:
        run.record_command()
        run.info["commands"][-1]["method"] = spec  # the user's spec, as summary.json holds it
        run.save()
    for tasks in variants:
        name = label or _label(method, plan, sparse, tasks if single_task else None)
        folder = run.dir / "train" / name
        if resume:
            if not (folder / "checkpoint.pt").exists():
                raise ReconError(f"{folder}/checkpoint.pt does not exist; nothing to resume, drop --resume")
        elif main:
            folder = run.stage("train", name, force=force)
        agg = recon.methods.get(method, **hparams)  # a fresh method (and its state) per variant
        _train_variant(
            recipe, run, folder, name, agg, plan, list(tasks), epochs, seed, dev, resume, sparse, record_cosines,
            precision,
        )  # fmt: skip
    if main:
        _print_results(run, recipe)


def _label(method: str, plan, sparse: float | None, single: tuple[str, ...] | None) -> str:
    if single is not None:
        return f"single-{single[0]}"
    return method + ("+recon" if plan is not None else "") + (f"+sparse{sparse:g}" if sparse is not None else "")


def _train_variant(
    recipe: Recipe, run: Run, folder: Path, name, agg, plan, tasks, epochs, seed, dev, resume, sparse, record_cosines,
    precision="32",
):  # fmt: skip
    seed_everything(seed)
    model = recipe.build_model()
    example = example_args(first_batch(recipe)[0]) if plan is not None and plan.capture not in (None, "fx") else None
    net = recon.load_split(model, plan, example_inputs=example) if plan is not None else model
    net.to(dev)
    meta = {
        "label": name,
        "split": plan.to_dict() if plan is not None else None,
        "single_task": tasks[0] if len(tasks) == 1 and len(recipe.tasks) > 1 else None,
        "recipe": str(recipe.path.resolve()),
    }
    if _distributed.is_main():
        console.print(f"[bold]{name}[/]: {sum(p.numel() for p in net.parameters()):,} parameters -> {folder}")
    result = recon.train(
        net, recipe.train_data, recipe.losses, method=agg, epochs=epochs,
        optimizer=recipe.make_optimizer(net.parameters()), val_data=recipe.val_data, metrics=recipe.metrics,
        seed=seed, device=dev, tasks=tasks, out=folder, resume=resume, progress=True, sparse=sparse, meta=meta,
        record_cosines=record_cosines, precision=precision,
    )  # fmt: skip
    if not _distributed.is_main():
        return
    summary = dict(result.summary)
    baseline = load_baselines(run.dir / "train", recipe.tasks)
    if meta["single_task"] is None and baseline is not None and result.final:
        summary["delta_m"] = delta_m(result.final, baseline, summary["directions"])
        summary["baseline"] = "single-task"
    _io.write_json(folder / SUMMARY, summary)


def _print_results(run: Run, recipe: Recipe) -> None:
    rows = {}
    for file in sorted((run.dir / "train").glob(f"*/{SUMMARY}")):
        s = json.loads(file.read_text())
        row = {f"{t}/{m}": v for t, named in s.get("final", {}).items() for m, v in named.items()}
        row["params"] = s.get("params")
        row["Δm% (↓)"] = s.get("delta_m")
        rows[file.parent.name] = row
    if rows:
        frame = pd.DataFrame.from_dict(rows, orient="index")
        fmt = {c: ".4f" for c in frame.columns if "/" in c}
        fmt.update({"params": ",", "Δm% (↓)": "+.2f"})
        console.print(frame_table(frame, title=f"trained variants in {run.dir}", index="variant", fmt=fmt))
