"""``recon train MODEL_PY``: stage 3, train from scratch (split plan applied) with a gradient method."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import typer

import recon
from cli._common import command, console, frame_table, resolve_device, say, warn
from recon import Recipe, ReconError, Run, load_recipe


def load_plan(run_dir: Path | None, split: str, tasks: list[str], model_py: Path) -> recon.SplitPlan | None:
    """The plan ``--split`` names: None for ``none``; ``latest`` is the run's split/plan.json and an error when
    it has none (training unsplit is asked for with ``--split none``, never fallen back to)."""
    if split == "none":
        return None
    if split == "latest":
        if run_dir is None:
            raise ReconError(
                f"--split latest: there is no run of {model_py} yet to take a plan from; run "
                f"`{command('profile', model_py)}` and `recon split` first, or pass --split none to train unsplit"
            )
        path = run_dir / "split" / "plan.json"
        if not path.exists():
            raise ReconError(
                f"--split latest: {run_dir} has no split/plan.json; run `{command('split', top_k=4, run=run_dir)}` "
                "first, or pass --split none to train without a split"
            )
    else:
        path = Path(split)
        if not path.exists():
            raise ReconError(f"--split {split}: no such plan file; pass a plan.json, 'latest' or 'none'")
    plan = recon.SplitPlan.load(path)
    if list(plan.tasks) != list(tasks):
        raise ReconError(f"{path} was made for tasks {list(plan.tasks)}, not {tasks}; split again for this recipe")
    return plan


def provenance(model_py: Path, plan: recon.SplitPlan | None) -> dict[str, str | None]:
    """Digests of the recipe file and of the split plan: a checkpoint records them and --resume compares."""
    text = json.dumps(plan.to_dict(), sort_keys=True, default=str) if plan is not None else ""
    return {
        "recipe_digest": hashlib.sha256(model_py.read_bytes()).hexdigest()[:12],
        "plan_digest": hashlib.sha256(text.encode()).hexdigest()[:12] if plan is not None else "none",
    }


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
    hparams = recon.methods.parse_hparams(hp)
    spec = recon.methods.get(method, **hparams).spec  # bad arguments fail before any folder is made
    recon.check_precision(precision)
    if sparse is not None and not 0.0 < sparse <= 1.0:
        raise ReconError(f"--sparse {sparse}: the kept ratio must be in (0, 1]")
    dev = recon.init_distributed(resolve_device(device))  # under torchrun: join the group; rank 0 alone writes
    recipe.check(device=dev)
    main = recon.is_main_process()
    found = recon.broadcast_object(Run.find(model_py, out=out) if main else None)
    plan = None if single_task else load_plan(found, split, recipe.tasks, model_py)
    if (recipe.val_data is None or not recipe.metrics) and main:
        warn("the recipe has no val_data()/metrics: only training losses are recorded")
    run_dir = Run.for_recipe(model_py, tasks=recipe.tasks, seed=seed, out=out).dir if main else None
    run = Run.open(recon.broadcast_object(run_dir))
    variants = [(t,) for t in recipe.tasks] if single_task else [tuple(recipe.tasks)]
    folders = []
    for tasks in variants:  # every variant's folder is locked (and checked) before any training starts
        name = label or _label(method, plan, sparse, tasks if single_task else None)
        folders.append((tasks, name, _variant_folder(run, name, resume=resume, force=force, main=main)))
    if main:
        run.record_command(method=spec)  # the user's spec, as summary.json holds it
    origin = provenance(model_py, plan)
    for tasks, name, folder in folders:
        agg = recon.methods.get(method, **hparams)  # a fresh method (and its state) per variant
        _train_variant(
            recipe, run, folder, name, agg, plan, list(tasks), epochs, seed, dev, resume, sparse, record_cosines,
            precision, origin,
        )  # fmt: skip
    if main:
        _print_results(run, recipe)
        _print_next(run, model_py, out, single_task)


def _variant_folder(run: Run, name: str, *, resume: bool, force: bool, main: bool) -> Path:
    """``train/<name>``, locked by rank 0: emptied for a new run (``--force``), kept for ``--resume``."""
    folder = run.dir / "train" / name
    if resume:
        if not (folder / "checkpoint.pt").exists():
            raise ReconError(f"{folder}/checkpoint.pt does not exist; nothing to resume, drop --resume")
        if main:
            run.hold(folder)
        return folder
    return run.stage("train", name, force=force) if main else folder


def _label(method: str, plan, sparse: float | None, single: tuple[str, ...] | None) -> str:
    if single is not None:
        return f"single-{single[0]}"
    return method + ("+recon" if plan is not None else "") + (f"+sparse{sparse:g}" if sparse is not None else "")


def _train_variant(
    recipe: Recipe, run: Run, folder: Path, name, agg, plan, tasks, epochs, seed, dev, resume, sparse, record_cosines,
    precision="32", origin=None,
):  # fmt: skip
    recon.seed_everything(seed)
    model = recipe.build_model()
    example = recipe.example_args() if plan is not None and plan.capture not in (None, "fx") else None
    net = recon.load_split(model, plan, example_inputs=example) if plan is not None else model
    net.to(dev)
    meta = {
        "label": name,
        "split": plan.to_dict() if plan is not None else None,
        "single_task": tasks[0] if len(tasks) == 1 and len(recipe.tasks) > 1 else None,
        "recipe": str(recipe.path.resolve()),
        **(origin or {}),
    }
    if recon.is_main_process():
        say(f"{name}: {sum(p.numel() for p in net.parameters()):,} parameters -> {folder}")
    result = recon.train(
        net, recipe.train_data, recipe.losses, method=agg, epochs=epochs,
        optimizer=recipe.make_optimizer(net.parameters()), val_data=recipe.val_data, metrics=recipe.metrics,
        seed=seed, device=dev, tasks=tasks, out=folder, resume=resume, progress=True, sparse=sparse, meta=meta,
        record_cosines=record_cosines, precision=precision,
    )  # fmt: skip
    if recon.is_main_process():
        run.save_summary(folder, result, tasks=recipe.tasks, delta_m=meta["single_task"] is None)


def _print_results(run: Run, recipe: Recipe) -> None:
    rows = {}
    for label, s in run.summaries().items():
        row = {f"{t}/{m}": v for t, named in s.get("final", {}).items() for m, v in named.items()}
        row["params"] = s.get("params")
        row["Δm% (↓)"] = s.get("delta_m")
        rows[label] = row
    if rows:
        frame = pd.DataFrame.from_dict(rows, orient="index")
        fmt = {c: ".4f" for c in frame.columns if "/" in c}
        fmt.update({"params": ",", "Δm% (↓)": "+.2f"})
        console.print(frame_table(frame, title=f"trained variants in {run.dir}", index="variant", fmt=fmt))


def _print_next(run: Run, model_py: Path, out: Path | None, single_task: bool) -> None:
    """Where Δm% comes from when it is missing, then the report command."""
    summaries = run.summaries()
    if not single_task and not any(s.get("delta_m") is not None for s in summaries.values()):
        baseline = command("train", model_py, single_task=True, split="none", out=out)
        say(f"Δm% needs the single-task baselines: {baseline}")
    say("next: " + command("report", *([run.dir] if out is not None else [])))
