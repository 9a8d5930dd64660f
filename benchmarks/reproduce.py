"""A small reproduction of Recon's claims (Shi et al., ICLR 2023) on the built-in MultiDigits data.

For each recipe (2-task MultiDigits, 3-task MultiDigits-3):
  1. profile once with joint training and take the top-k layers by S-conflict score (S = 0);
  2. train single-task baselines, then every method without and with Recon (the top-k layers branched,
     re-initialised, trained from scratch), over several seeds, recording the layer-wise cosines of the
     layers that stay shared at every step;
  3. report per method: the share of shared-layer task-pair cosines below 0 during training (the paper's
     claim: Recon lowers it sharply), per-task accuracy, Δm% against the single-task baselines (lower is
     better), and the parameter increase. The figure overlays the cosine distributions (Figures 1/3).

Capacity control (``--control``, on by default): branching adds parameters, so each method is also trained
with shared layers chosen at random per seed (any but exactly the top-k set) whose parameters add up to the
top-k layers' as closely as possible: the same added capacity, no conflict guidance. Recon's claim is that the
conflict-guided choice beats it.

Default flags: 2048 training pairs, 4 epochs per model, 3 seeds (about 40 minutes on 2 quiet CPU cores for
both recipes); docs/benchmarks.md's table used ``--seeds 2 --epochs 3`` to fit 30 minutes beside other work.
``--quick`` shrinks everything to a smoke test.

    python benchmarks/reproduce.py [--quick] [--out benchmarks/results]

``--equal-cost`` runs the comparison at equal cost instead (see ``benchmarks/equal_cost.py``):

    python benchmarks/reproduce.py --equal-cost --recipes multidigits3,multidigits_attributes --methods joint,cagrad
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="multidigits,multidigits3")
    parser.add_argument("--methods", default="joint,mgda,pcgrad,graddrop,cagrad")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--profile-epochs", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--val-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument(
        "--control", action=argparse.BooleanOptionalAction, default=True,
        help="also branch k random layers of the same sizes (capacity control; default on)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny data, 1 seed, 1 epoch")
    parser.add_argument(
        "--equal-cost", action="store_true",
        help="the equal-cost comparison (joint, top-k, +budget, +budget with groups, random, width-matched)",
    )  # fmt: skip
    parser.add_argument("--budget", type=float, default=0.1, help="--equal-cost: parameter budget (fraction)")
    parser.add_argument("--baseline-seeds", type=int, default=2, help="--equal-cost: seeds of single-task baselines")
    parser.add_argument("--budget-flops", type=float, default=None, help="--equal-cost: also rows within this ratio")
    parser.add_argument("--variants", default="", help="--equal-cost: comma-separated subset of the rows")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.train_size, args.val_size = 1, 1, 256, 256
        args.baseline_seeds = 1
    os.environ["RECON_DIGITS_TRAIN"] = str(args.train_size)
    os.environ["RECON_DIGITS_VAL"] = str(args.val_size)
    if args.equal_cost:
        import torch

        torch.set_num_threads(args.threads)
        sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
        from benchmarks.equal_cost import run_equal_cost

        run_equal_cost(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "examples"))
    import recon
    from recon import _io, plots
    from recon._recipe import load_recipe
    from recon._train import delta_m, seed_everything

    methods = args.methods.split(",")
    seeds = list(range(args.seeds))
    tables, distributions = [], {}
    start = time.perf_counter()
    for name in args.recipes.split(","):
        recipe = load_recipe(ROOT / "examples" / f"{name}.py")
        tasks = recipe.tasks

        def fresh(seed: int, layers: list[str] | None, recipe=recipe):
            seed_everything(seed)
            model = recipe.build_model()
            return recon.split(model, layers, init="reinit") if layers else model

        def fit(net, method, seed, task_list, recipe=recipe, record=True):
            return recon.train(
                net, recipe.train_data, recipe.losses, method=method, epochs=args.epochs,
                val_data=recipe.val_data, metrics=recipe.metrics, seed=seed, tasks=task_list,
                record_cosines=record and len(task_list) > 1,
            )  # fmt: skip

        seed_everything(0)
        prof = recon.profile(recipe.build_model(), recipe.train_data, recipe.losses, epochs=args.profile_epochs)
        layers = prof.top_layers(args.top_k)
        print(f"[{name}] top-{args.top_k} layers by S-conflict score: {layers}", flush=True)

        baseline = {}
        for task in tasks:
            accs = [fit(fresh(s, None), "joint", s, [task]).final[task] for s in seeds]
            baseline[task] = {m: float(np.mean([a[m] for a in accs])) for m in accs[0]}
        print(f"[{name}] single-task baselines: {baseline}", flush=True)

        directions = {t: {m: d for m, (_, d) in recipe.metrics[t].items()} for t in tasks}
        base_params = sum(p.numel() for p in recipe.build_model().parameters())
        variants = {"": dict.fromkeys(seeds), "+recon": dict.fromkeys(seeds, layers)}  # seed -> branched layers
        if args.control:
            variants["+random"] = {s: matched_random_layers(layers, prof.layers, prof.layer_info, s) for s in seeds}
            print(f"[{name}] random capacity-matched layers per seed: {variants['+random']}", flush=True)
        rows = []
        for method in methods:
            for suffix, branched in variants.items():
                finals, shares, cosines = [], [], []
                for seed in seeds:
                    net = fresh(seed, branched[seed])
                    params = sum(p.numel() for p in net.parameters())
                    result = fit(net, method, seed, tasks)
                    finals.append(result.final)
                    shares.append(result.summary["conflict_share"])
                    if result.cosines is not None:
                        cosines.append(result.cosines.reshape(-1))
                label = method + suffix
                mean_final = {t: {m: float(np.mean([f[t][m] for f in finals])) for m in finals[0][t]} for t in tasks}
                row = {"recipe": name, "method": label}
                for t in tasks:
                    accs = [f[t]["acc"] for f in finals]
                    row[f"{t} acc"] = f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f}"
                row["Δm% (↓)"] = round(delta_m(mean_final, baseline, directions), 2)
                row["cos<0 share"] = f"{100 * np.mean(shares):.1f}%"
                row["params"] = f"+{100 * (params - base_params) / base_params:.1f}%"
                rows.append(row)
                if cosines:
                    distributions.setdefault(name, {})[label] = np.concatenate(cosines)
                print(f"[{name}] {label}: {row}  ({time.perf_counter() - start:.0f}s)", flush=True)
        tables.append(pd.DataFrame(rows))

    table = pd.concat(tables, ignore_index=True)
    minutes = (time.perf_counter() - start) / 60
    text = table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False)
    print(text)
    print(f"total {minutes:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = (
        f"seeds={args.seeds}, epochs={args.epochs}, profile epochs={args.profile_epochs}, top-k={args.top_k}, "
        f"train pairs={args.train_size}, val pairs={args.val_size}; {minutes:.1f} min on {os.cpu_count()} CPU cores"
    )
    _io.write_text(args.out / "reproduce.md", f"{settings}\n\n{text}\n")
    for name, runs in distributions.items():
        fig = plots.cosine_distribution(runs, S=0.0, title=f"{name}: layer-wise cosines of shared layers")
        _io.save_figure(args.out / f"cosines_{name}.png", fig, dpi=110)


def matched_random_layers(top: list[str], shared: list[str], info: dict, seed: int, tries: int = 4000) -> list[str]:
    """Shared layers drawn at random, conflict-blind, whose parameters add up as closely as possible to the top
    layers' (the capacity-matched control): the best prefix of ``tries`` random orders of all shared layers,
    the top set itself excluded. Top layers may be drawn: excluding them could not match the capacity when
    they are the largest layers."""
    rng = np.random.default_rng(seed)
    target = sum(info[layer]["params"] for layer in top)
    sizes = np.array([info[layer]["params"] for layer in shared])
    best, best_gap = [], float("inf")
    for _ in range(tries):
        order = rng.permutation(len(shared))
        gaps = np.abs(np.cumsum(sizes[order]) - target)
        n = int(gaps.argmin())
        pick = [shared[i] for i in order[: n + 1]]
        if gaps[n] < best_gap and set(pick) != set(top):
            best, best_gap = pick, float(gaps[n])
    return best


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
