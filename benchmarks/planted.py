"""The planted-conflict recipe (examples/planted.py) in numbers: where each score ranks the planted layer, and
what branching it (or a layer of the same size, or the shared layer nearest the outputs) does to validation MSE.

    python -m benchmarks.planted [--seeds 3] [--steps 200] [--epochs 3]

Per seed: one profile (``--steps`` warm-up steps, the recipe's Adam), both scores of every shared layer; then
the unsplit model, the model with each shared layer branched per task, and the two single-task models, each
trained ``--epochs`` epochs from the same initialisation and data order; validation MSE summed over the tasks,
and the share of the unsplit-to-single-task gap each split closes. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

import recon

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "planted.py"


def load_planted():
    """The recipe module examples/planted.py."""
    spec = importlib.util.spec_from_file_location("planted_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def val_mse(P, layers: list[str], tasks: list[str] | None, seed: int, epochs: int) -> float:
    """Validation MSE summed over the tasks of the recipe's model with ``layers`` branched per task (``tasks``:
    train only those, e.g. one for a single-task model), trained ``epochs`` epochs from seed ``seed``."""
    torch.manual_seed(seed)
    model = P.build_model()
    net = recon.split(model, layers) if layers else model
    result = recon.train(
        net, P.train_data, P.losses, epochs=epochs, optimizer=P.optimizer(net.parameters()), val_data=P.val_data,
        metrics=P.metrics, seed=seed, tasks=tasks,
    )  # fmt: skip
    return sum(result.final[t]["mse"] for t in result.final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    P = load_planted()
    start = time.perf_counter()
    ranks, mses = [], []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = P.build_model()
        prof = recon.profile(
            model, P.train_data(), P.losses, steps=args.steps, seed=seed, optimizer=P.optimizer(model.parameters())
        )
        inter, sconf = prof.scores(score="interference"), prof.scores()
        p1 = float(prof.confidence(1, score="interference")[P.PLANTED])
        ranks.append((seed, inter, sconf, p1))
        row = {"unsplit": val_mse(P, [], None, seed, args.epochs)}
        for layer in prof.layers:
            row[layer] = val_mse(P, [layer], None, seed, args.epochs)
        row["single"] = val_mse(P, [], ["a"], seed, args.epochs) + val_mse(P, [], ["b"], seed, args.epochs)
        mses.append(row)
    print(f"planted layer: {P.PLANTED}; {args.steps}-step profiles; {args.epochs} epochs of training\n")
    print(
        "| seed | interference (rank of the planted layer) | S-conflict, max "
        f"{args.steps} (rank) | planted p(top-1), interference |"
    )
    print("| --- | --- | --- | --- |")
    for seed, inter, sconf, p1 in ranks:

        def cell(frame, fmt):
            return ", ".join(f"{n} {fmt(v)}" for n, v in frame["score"].items())

        ri, rs = list(inter.index).index(P.PLANTED) + 1, list(sconf.index).index(P.PLANTED) + 1
        print(f"| {seed} | {cell(inter, lambda v: f'{v:.3g}')} ({ri}) | {cell(sconf, int)} ({rs}) | {p1:.2f} |")
    print("\n| validation MSE (sum of tasks) | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " |")
    print("| --- |" + " --- |" * args.seeds)
    for key in mses[0]:
        cells = []
        for row in mses:
            gap = row["unsplit"] - row["single"]
            closed = "" if key in ("unsplit", "single") else f" ({(row['unsplit'] - row[key]) / gap:+.0%} of the gap)"
            cells.append(f"{row[key]:.4f}{closed}")
        label = {"unsplit": "unsplit", "single": "single-task models"}.get(key, f"{key} branched")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
