"""Recon at equal cost (``python benchmarks/reproduce.py --equal-cost``): does branching pay per parameter?

Per recipe, one joint profile (seed 0) chooses the plans; then for each method (joint, CAGrad) and each
variant, every seed trains from scratch for the same number of epochs:

* ``unsplit``: the recipe's model;
* ``top-k``: Recon as the paper does it, the k layers with the highest S-conflict scores, one copy per task;
* ``budget``: :func:`recon.plan_split` within ``+budget`` parameters, one copy per task;
* ``groups``: the same budget with ``groups="auto"`` (each layer's task groups chosen from its conflicts);
* ``random``: per seed, shared layers drawn at random (per-task copies) whose added parameters come as close as
  possible to the ``budget`` plan's without exceeding the budget: the same capacity, no conflict guidance;
* ``wide``: the unsplit model with a wider trunk whose parameter count is closest to the ``budget`` plan's.

Columns: per-task metric mean ± std over seeds, Δm% ± std (each seed against the mean single-task baselines,
lower is better), parameters, forward FLOPs on the first batch (``torch.utils.flop_counter``), the median
measured training step (forward, K task gradients and the method, on the first batch), and the share of
shared-layer cosines below 0 during training.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]


def _flops(net: torch.nn.Module, x: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    net.eval()
    with FlopCounterMode(display=False) as mode, torch.no_grad():
        net(x)
    net.train()
    return float(mode.get_total_flops())


def _step_time(net: torch.nn.Module, batch: tuple, losses: dict, method: str, reps: int = 5) -> float:
    """Median seconds of one training step (forward, losses, recon.backward with the method)."""
    import recon

    x, y = batch
    m = recon.methods.get(method)
    times = []
    for i in range(reps + 1):
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = net(x)
        recon.backward({t: fn(out[t], y[t]) for t, fn in losses.items()}, net, m)
        if i:
            times.append(time.perf_counter() - start)
    net.zero_grad(set_to_none=True)
    return statistics.median(times)


def _wide_builder(recipe: Any, target: int):
    """A builder of the recipe's model with a wider trunk: the shared ``fc`` layer (and so the heads' inputs)
    widened to the size whose parameter count is closest to ``target`` (the conv trunk's width moves the count
    in steps too coarse for a +10% budget)."""
    from torch import nn

    def build(hidden: int) -> torch.nn.Module:
        model = recipe.build_model()
        model.fc = nn.Linear(model.fc.in_features, hidden)
        for head in model.heads.values():
            head[0] = nn.Linear(hidden, head[0].out_features)
        return model

    start = recipe.build_model().fc.out_features
    hidden = min(range(start, 4 * start), key=lambda h: abs(sum(p.numel() for p in build(h).parameters()) - target))
    return lambda: build(hidden), hidden


def _random_layers(prof: Any, model: torch.nn.Module, cap: float, target: int, seed: int, avoid: set) -> list[str]:
    """Shared layers in random order, per-task copies, added while they fit under ``cap``: the first draw whose
    added parameters reach 90% of ``target`` and that is not the budget plan's own set (``avoid``), else the
    closest such draw. (Taking the draw closest to the target would pin it to the budget plan's set itself.)"""
    rng = np.random.default_rng(seed)
    layers = [name for name in prof.layers if name]
    tasks = {name: len(prof.layer_info.get(name, {}).get("tasks", prof.tasks)) for name in layers}
    own = {n: sum(p.numel() for p in model.get_submodule(n).parameters(recurse=False)) for n in layers}
    cost = {n: (tasks[n] - 1) * own[n] for n in layers}
    best, gap = [], float("inf")
    for _ in range(2000):
        pick, total = [], 0
        for i in rng.permutation(len(layers)):
            if total + cost[layers[i]] <= cap:
                pick.append(layers[i])
                total += cost[layers[i]]
        if set(pick) == avoid:
            continue
        if total >= 0.9 * target:
            return pick
        if abs(total - target) < gap:
            best, gap = pick, abs(total - target)
    return best


def _variants(recipe: Any, prof: Any, args: Any, seeds: list[int]) -> dict[str, dict[int, Any]]:
    """variant -> seed -> what to build: None (unsplit), a layer spec for recon.split, or a builder."""
    import recon

    model = recipe.build_model()
    base = sum(p.numel() for p in model.parameters())
    top = prof.top_layers(args.top_k)
    budget = recon.plan_split(prof, model, budget_params=args.budget)
    groups = recon.plan_split(prof, model, budget_params=args.budget, groups="auto")
    target = budget.extra["params_after"] - base
    wide, width = _wide_builder(recipe, budget.extra["params_after"])
    print(f"  top-{args.top_k}: {top}", flush=True)
    print(f"  +{args.budget:.0%} budget: {budget.layers}", flush=True)
    print(f"  +{args.budget:.0%} groups: {groups.groups}", flush=True)
    print(f"  wide: shared fc width {width}", flush=True)
    for s in seeds:
        print(f"  random (seed {s}): {_random_layers(prof, model, args.budget * base, target, s, set(budget.layers))}")
    out = {
        "unsplit": dict.fromkeys(seeds),
        f"top-{args.top_k}": dict.fromkeys(seeds, top),
        "budget": dict.fromkeys(seeds, budget.layer_spec()),
        "groups": dict.fromkeys(seeds, groups.layer_spec()),
        "random": {s: _random_layers(prof, model, args.budget * base, target, s, set(budget.layers)) for s in seeds},
        "wide": dict.fromkeys(seeds, wide),
    }
    if args.budget_flops:  # the same parameter budget, and at most budget_flops x the forward FLOPs
        from recon._recipe import first_batch

        x = first_batch(recipe)[0]
        for name, mode in (("budget+flops", "none"), ("groups+flops", "auto")):
            plan = recon.plan_split(
                prof, model, budget_params=args.budget, budget_flops=args.budget_flops, groups=mode, example_inputs=x
            )
            print(f"  {name} ({args.budget_flops}x FLOPs): {plan.groups}", flush=True)
            out[name] = dict.fromkeys(seeds, plan.layer_spec())
    keep = args.variants.split(",") if args.variants else list(out)
    return {k: v for k, v in out.items() if k in keep or (k.startswith("top-") and "top-k" in keep)}


def _build(recipe: Any, spec: Any, seed: int) -> torch.nn.Module:
    import recon
    from recon._train import seed_everything

    seed_everything(seed)
    if callable(spec):
        return spec()
    model = recipe.build_model()
    return recon.split(model, spec, init="reinit") if spec else model


def _fit(recipe: Any, net: torch.nn.Module, method: str, seed: int, tasks: list[str], epochs: int, record: bool):
    import recon

    return recon.train(
        net, recipe.train_data, recipe.losses, method=method, epochs=epochs, val_data=recipe.val_data,
        metrics=recipe.metrics, seed=seed, tasks=tasks, record_cosines=record and len(tasks) > 1,
    )  # fmt: skip


def _baselines(recipe: Any, args: Any) -> dict[str, dict[str, float]]:
    out = {}
    for task in recipe.tasks:
        finals = [
            _fit(recipe, _build(recipe, None, s), "joint", s, [task], args.epochs, False).final[task]
            for s in range(args.baseline_seeds)
        ]
        out[task] = {m: float(np.mean([f[m] for f in finals])) for m in finals[0]}
    return out


def _row(name: str, method: str, variant: str, runs: list[dict], recipe: Any, baseline: dict) -> dict[str, Any]:
    from recon._train import delta_m

    directions = {t: {m: d for m, (_, d) in recipe.metrics[t].items()} for t in recipe.tasks}
    row: dict[str, Any] = {"recipe": name, "method": method, "variant": variant}
    for t in recipe.tasks:
        metric = next(iter(recipe.metrics[t]))
        values = [100 * r["final"][t][metric] for r in runs]
        row[f"{t} {metric}"] = f"{np.mean(values):.1f} ± {np.std(values):.1f}"
    dms = [delta_m(r["final"], baseline, directions) for r in runs]
    row["Δm% (↓)"] = f"{np.mean(dms):+.2f} ± {np.std(dms):.2f}"
    row["params"] = f"{runs[0]['params']:,} ({runs[0]['params'] / runs[0]['base_params'] - 1:+.1%})"
    row["FLOPs"] = f"{runs[0]['flops'] / 1e6:.1f}M ({runs[0]['flops'] / runs[0]['base_flops']:.2f}x)"
    row["step ms"] = f"{1000 * runs[0]['step']:.1f}"
    row["cos<0"] = f"{100 * np.nanmean([r['share'] for r in runs]):.1f}%"
    row["_dm"] = dms
    return row


def run_recipe(name: str, args: Any, methods: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    import recon
    from recon._recipe import first_batch, load_recipe
    from recon._train import seed_everything

    recipe = load_recipe(ROOT / "examples" / f"{name}.py")
    start = time.perf_counter()
    seed_everything(0)
    prof = recon.profile(recipe.build_model(), recipe.train_data, recipe.losses, epochs=args.profile_epochs)
    print(f"[{name}] profiled ({time.perf_counter() - start:.0f}s)", flush=True)
    variants = _variants(recipe, prof, args, seeds)
    baseline = _baselines(recipe, args)
    print(f"[{name}] single-task baselines ({time.perf_counter() - start:.0f}s)", flush=True)
    batch = first_batch(recipe)
    base_model = recipe.build_model()
    base_params, base_flops = sum(p.numel() for p in base_model.parameters()), _flops(base_model, batch[0])
    rows = []
    for method in methods:
        for variant, specs in variants.items():
            runs = []
            for seed in seeds:
                net = _build(recipe, specs[seed], seed)
                cost = {"params": sum(p.numel() for p in net.parameters()), "flops": _flops(net, batch[0])}
                cost["step"] = _step_time(net, batch, recipe.losses, method) if seed == seeds[0] else 0.0
                result = _fit(recipe, net, method, seed, list(recipe.tasks), args.epochs, True)
                share = result.summary.get("conflict_share", float("nan"))
                runs.append({"final": result.final, "share": share, **cost})
            runs[0].update(base_params=base_params, base_flops=base_flops)
            rows.append(_row(name, method, variant, runs, recipe, baseline))
            shown = {k: v for k, v in rows[-1].items() if k in ("variant", "Δm% (↓)", "params", "FLOPs", "cos<0")}
            print(f"[{name}] {method} {shown} ({time.perf_counter() - start:.0f}s)", flush=True)
    return rows


def run_equal_cost(args: Any) -> None:
    """Run every recipe; the tables are (re)written after each recipe, so a cut run keeps what it finished."""
    methods = args.methods.split(",") if args.methods != "joint,mgda,pcgrad,graddrop,cagrad" else ["joint", "cagrad"]
    recipes = args.recipes if args.recipes != "multidigits,multidigits3" else "multidigits3,multidigits_attributes"
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in recipes.split(","):
        rows += run_recipe(name, args, methods, seeds)
        _write(rows, args, (time.perf_counter() - start) / 60)


def _markdown(frame: pd.DataFrame) -> str:
    try:
        return frame.to_markdown(index=False)
    except ImportError:  # tabulate missing: a plain pipe table
        lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
        return "\n".join(lines)


def _write(rows: list[dict[str, Any]], args: Any, minutes: float) -> None:
    from recon import _io

    settings = (
        f"seeds={args.seeds}, epochs={args.epochs} for every row, profile epochs={args.profile_epochs}, "
        f"top-k={args.top_k}, budget=+{args.budget:.0%} parameters, single-task baseline seeds="
        f"{args.baseline_seeds}, train pairs={args.train_size}, val pairs={args.val_size}, "
        f"{args.threads} torch thread(s); {minutes:.1f} min"
    )
    parts = [settings, ""]
    for name in dict.fromkeys(r["recipe"] for r in rows):
        table = pd.DataFrame([{k: v for k, v in r.items() if k != "_dm"} for r in rows if r["recipe"] == name])
        parts += [f"## {name}", "", _markdown(table), ""]
    text = "\n".join(parts)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    _io.write_text(args.out / "equal_cost.md", text + "\n")
    _io.write_json(
        args.out / "equal_cost_dm.json", {f"{r['recipe']}/{r['method']}/{r['variant']}": r["_dm"] for r in rows}
    )
