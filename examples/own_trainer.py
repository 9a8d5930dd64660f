"""Feed a split model into your own training loop: plain PyTorch with ``recon.backward``, and torchjd.

    python examples/own_trainer.py [--epochs 2] [--top-k 4]

Profiles the MultiDigits recipe for a few steps, branches the top-k layers, then trains the split model twice:
with a plain PyTorch loop (``recon.backward`` with PCGrad) and with torchjd's Jacobian descent (UPGrad on
the parameters that stay shared). Prints the validation accuracy of each.
"""

from __future__ import annotations

import argparse

import multidigits as recipe
import torch
from torchjd.aggregation import UPGrad
from torchjd.autojac import backward, jac_to_grad

import recon


def accuracy(net: torch.nn.Module) -> dict[str, float]:
    return {t: v["acc"] for t, v in recon.evaluate(net, recipe.val_data, recipe.TASKS, recipe.metrics).items()}


def plain_loop(net: torch.nn.Module, epochs: int) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    pcgrad = recon.methods.get("pcgrad")
    for _ in range(epochs):
        for x, y in recipe.train_data():
            out = net(x)
            losses = {t: recipe.losses[t](out[t], y[t]) for t in recipe.TASKS}
            opt.zero_grad()
            recon.backward(losses, net, pcgrad)  # shared: PCGrad's update; heads and copies: their own task's gradient
            opt.step()


def torchjd_loop(net: torch.nn.Module, epochs: int) -> None:
    tasks = list(recipe.TASKS)
    shared = recon.shared_parameters(net)
    own = [p for t in tasks for p in recon.task_parameters(net, t)]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    aggregator = UPGrad()
    for _ in range(epochs):
        for x, y in recipe.train_data():
            out = net(x)
            losses = [recipe.losses[t](out[t], y[t]) for t in tasks]
            opt.zero_grad()
            torch.autograd.backward(losses, inputs=own, retain_graph=True)  # each task's own parameters
            backward(losses, inputs=shared)  # one Jacobian row per task, in .jac
            jac_to_grad(shared, aggregator)
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--profile-steps", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    prof = recon.profile(recipe.build_model(), recipe.train_data, recipe.losses, steps=args.profile_steps)
    layers = prof.top_layers(args.top_k)
    print("branched:", layers)
    for name, loop in (("plain loop + recon.backward(pcgrad)", plain_loop), ("torchjd UPGrad", torchjd_loop)):
        torch.manual_seed(0)
        net = recon.split(recipe.build_model(), layers)  # from scratch: fresh copies of the branched layers
        loop(net, args.epochs)
        print(f"{name}: val accuracy {accuracy(net)}")


if __name__ == "__main__":
    main()
