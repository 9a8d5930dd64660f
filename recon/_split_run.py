"""Stage 2 on a run folder (what ``recon split`` does): choose the layers, branch them, record the plan.

The choice is :func:`recon._plan.choose_layers` on the run's profile; the rewrite is :func:`recon.split`; the
plan, the generated code and the network figure land in ``<run>/split/`` (docs/run-folder.md).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from recon import _io, _lock
from recon._capture import example_args, layer_usage
from recon._codegen import generated_code
from recon._errors import ReconError
from recon._outputs import call_model, move_to, task_outputs
from recon._plan import choose_layers, parse_budget
from recon._profile import PROFILE_FILE, check_score, check_threshold
from recon._recipe import Recipe, compute_losses, load_recipe
from recon._runs import Run
from recon._split import INITS, SplitPlan, split


def split_run(
    run_dir: str | Path | None = None,
    *,
    top_k: int | None = None,
    S: float | None = None,
    layers: str | None = None,
    scores: str | Path | None = None,
    budget_params: str | float | None = None,
    budget_flops: str | float | None = None,
    groups: str = "none",
    init: str = "reinit",
    leaf_modules: tuple[str, ...] | list[str] = (),
    device: torch.device | str = "cpu",
    force: bool = False,
    score: str = "s-conflict",
    require_complete: bool = False,
) -> tuple[Run, SplitPlan]:
    """Branch a run's layers and write ``split/plan.json``, ``split/model.py`` and ``split/network.png``.

    ``run_dir``: the run folder (default: the latest under ``runs/``). The layers come from ``layers``
    (comma-separated names), ``scores`` (an official scores.json) with ``top_k``, the stored profile's ``top_k``
    (rescored at ``S`` when given), or the budgets (``recon.plan_split``; ``groups="auto"`` chooses task groups);
    ``score`` ranks the profile's layers: ``"s-conflict"`` (the paper's) or ``"interference"``. The plan records
    the score and each chosen layer's ``p_top_k`` (bootstrap over the profile's steps).
    ``leaf_modules`` defaults to those the profile was traced with. The plan's ``extra`` records the parameter
    counts before and after and ``time_ratio``: the median forward+backward time of the split model over the
    original's on the first training batch, on ``device``. A profile that stopped early (interrupted, or fewer
    steps than asked) is recorded in the plan as ``"profile_partial": {"steps": done, "of": asked}`` and
    returned in ``plan.extra``; with ``require_complete`` it is a :class:`ReconError`. The split folder is
    locked while it is written. Returns the run and the plan it wrote (docs/cli.md, ``recon split``).
    """
    if init not in INITS:
        raise ReconError(f"--init {init!r} is not one of {list(INITS)}")
    if S is not None:
        check_threshold(S)
    check_score(score)
    run = Run.open(run_dir)
    folder = run.dir / "split"
    _lock.hold(folder)  # one writer: a second split of this run is refused until this one ends
    try:
        if folder.exists() and any(folder.iterdir()) and not force:
            raise ReconError(f"{folder} already holds results; pass --force to overwrite them or --run for another run")
        partial = profile_partial(run.dir / "profile", required=require_complete and layers is None)
        choice = dict(top_k=top_k, S=S, layers=layers, scores=scores, groups=groups, score=score)
        budgets = (_budget(budget_params, "--budget-params"), _budget(budget_flops, "--budget-flops"))
        return _split(run, partial, choice, budgets, init=init, leaf_modules=leaf_modules, device=device, force=force)
    finally:
        _lock.release(folder)


def profile_partial(folder: Path, *, required: bool = False) -> dict[str, int | None] | None:
    """``{"steps": done, "of": asked}`` when the profile in ``folder`` stopped early, else None; with
    ``required`` a partial profile is a :class:`ReconError` (``--require-complete``)."""
    file = folder / PROFILE_FILE
    if not file.exists():
        return None
    meta = json.loads(file.read_text())
    steps, asked = int(meta.get("total_steps", meta.get("steps", 0))), meta.get("steps_asked")  # training steps
    if not meta.get("partial") and (asked is None or steps >= int(asked)):
        return None
    partial = {"steps": steps, "of": None if asked is None else int(asked)}
    if required:
        raise ReconError(
            f"{folder} is a partial profile ({steps} of {partial['of'] or '?'} steps); profile again to the end, "
            "or drop --require-complete"
        )
    return partial


def _split(
    run: Run, partial: dict | None, choice: dict[str, Any], budgets: tuple[float | None, float | None], *,
    init: str, leaf_modules, device, force: bool,
) -> tuple[Run, SplitPlan]:  # fmt: skip
    """Choose (``choice``: the flags that say which layers), branch, time, and write the split folder."""
    recipe = load_recipe(run.recipe)
    tasks = list(recipe.tasks)
    torch.manual_seed(int(run.info.get("seed", 0)))
    model = recipe.build_model()
    if not isinstance(model, torch.nn.Module):
        raise ReconError(f"{recipe.path}: build_model() returned {type(model).__name__}; return an nn.Module")
    inputs, _ = recipe.first_batch()  # the example batch: capture with torch.export where fx cannot, and check
    how = choose_layers(
        run.dir / "profile", **choice, budget_params=budgets[0], budget_flops=budgets[1], model=model,
        example_inputs=example_args(inputs),
    )  # fmt: skip
    leaves = list(leaf_modules) or how.leaf_modules  # default: the leaves the profile was traced with
    # one capture serves the plan, the split and the figure (recon._capture keeps it for this model and batch)
    net = split(model, how.layers, tasks=tasks, init=init, leaf_modules=leaves, example_inputs=example_args(inputs))
    figure = _network_figure(model, net, tasks, inputs, leaves)  # before timing, which moves BatchNorm stats
    sizes = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in net.parameters()))
    ratio = time_ratio(model, net, recipe, torch.device(device))
    plan = _record(how, net, model, choice["top_k"], init, budgets, sizes, ratio)
    if partial is not None and choice["layers"] is None and choice["scores"] is None:
        plan.extra["profile_partial"] = partial
    folder = run.stage("split", force=force)
    run.record_command()
    plan.save(folder / "plan.json")
    _io.write_text(folder / "model.py", generated_code(net, plan, recipe.path))
    _io.save_figure(folder / "network.png", figure, dpi=110)
    return run, plan


def _budget(value: str | float | None, flag: str) -> float | None:
    return parse_budget(value, flag) if isinstance(value, str) else (None if value is None else float(value))


def _network_figure(model, net, tasks: list[str], inputs: Any, leaves: list[str]) -> Any:
    from recon import plots

    usage = layer_usage(model, tasks, example_inputs=example_args(inputs), leaf_modules=leaves)
    modules = {n: m for n, m in model.named_modules()}
    return plots.network_figure(
        usage, tasks, net.meta["recon"]["branches"], modules, groups=net.meta["recon"]["groups"]
    )


def _record(how, net, model, top_k, init, budgets, sizes: tuple[int, int], ratio: float | None) -> SplitPlan:
    """The plan.json of this split: what was branched, how it was chosen, what it cost."""
    budget = how.plan.extra if how.plan is not None else {}
    meta = net.meta["recon"]
    return SplitPlan(
        tasks=list(meta["tasks"]),
        layers=list(meta["branches"]),
        init=init,
        S=how.S,
        top_k=top_k,
        scores=how.scores,
        groups=meta["groups"] if how.plan is not None else None,
        budget_params=budgets[0],
        budget_flops=budgets[1],
        leaf_modules=list(meta["leaf_modules"]),
        concrete_args=meta["concrete_args"],
        model_class=type(model).__name__,
        capture=meta["capture"],
        extra={
            "source": how.source,
            "params_before": sizes[0],
            "params_after": sizes[1],
            "time_ratio": None if ratio is None else round(ratio, 4),
            "branches": meta["branches"],
            **{k: budget[k] for k in ("removed", "params_added", "flops_before", "flops_after") if k in budget},
            **({"score": how.score} if how.score is not None else {}),
            **how.confidence,
        },
    )


def time_ratio(model: torch.nn.Module, net: torch.nn.Module, recipe: Recipe, device: torch.device) -> float | None:
    """Median forward+backward time of the split model over the original's, on the first training batch."""
    inputs, targets = recipe.first_batch()
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
