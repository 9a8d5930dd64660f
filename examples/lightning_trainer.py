"""Train a split model inside PyTorch Lightning with any recon method (``recon.lightning.ReconMixin``).

    python examples/lightning_trainer.py --max-steps 20 [--method cagrad:c=0.4] [--layers layer3.conv1,fc]

Builds the MultiDigits recipe (examples/multidigits.py), profiles it for a few steps and branches its top-k
layers with ``recon.split`` (or the layers given with ``--layers``), then trains the split model with a
``Trainer`` for ``--max-steps`` steps: the module is a plain LightningModule plus three recon lines
(the mixin, ``configure_recon``, ``recon_step``). Per-task losses go to Lightning's logger (CSV under
``--log-dir``, default ``runs/lightning``); the validation accuracy per task is printed at the end.

``--devices 2 --strategy ddp`` runs one process per device (on CPU, gloo): recon.backward averages the
per-task gradients across processes before the method aggregates them (see docs/training.md, "PyTorch Lightning").
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the recipe next to this file

import lightning as L  # noqa: E402
import multidigits as recipe  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

import recon  # noqa: E402
from recon.lightning import ReconMixin  # noqa: E402


class MultiDigitsModule(ReconMixin, L.LightningModule):
    """A LightningModule around any multi-task network returning ``{task: logits}``."""

    def __init__(self, net: torch.nn.Module, *, method: str = "mean", lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.configure_recon(method, tasks=recipe.TASKS)  # manual optimisation, the method bound to the tasks

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return self.recon_step({t: recipe.losses[t](out[t], y[t]) for t in self.recon_tasks})

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        for t in self.recon_tasks:
            self.log(f"val/acc_{t}", (out[t].argmax(1) == y[t]).float().mean(), sync_dist=True)
            self.log(f"val/loss_{t}", F.cross_entropy(out[t], y[t]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)  # a learnable method's weights included


def split_model(layers: list[str] | None, top_k: int, profile_steps: int) -> tuple[torch.nn.Module, list[str]]:
    """The recipe's model with ``layers`` branched, else its ``top_k`` layers by S-conflict score."""
    if layers is None:
        torch.manual_seed(0)
        prof = recon.profile(recipe.build_model(), recipe.train_data, recipe.losses, steps=profile_steps)
        layers = prof.top_layers(top_k)
    torch.manual_seed(0)
    return recon.split(recipe.build_model(), layers), layers  # from scratch: fresh copies of the branched layers


def parameter_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal across processes iff their parameters are equal."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="pcgrad", help="any name `recon methods` lists, or a spec")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--layers", default=None, help="comma-separated layers to branch (default: top-k)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--log-dir", default=os.environ.get("RECON_LIGHTNING_LOGS", "runs/lightning"))
    args = parser.parse_args(argv)

    layers = args.layers.split(",") if args.layers else None
    net, layers = split_model(layers, args.top_k, args.profile_steps)
    module = MultiDigitsModule(net, method=args.method)
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        logger=CSVLogger(args.log_dir, name="multidigits"),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        limit_val_batches=4,
    )
    trainer.fit(module, train_dataloaders=recipe.train_data())
    # before validate(): setting the DDP strategy up again broadcasts rank 0's parameters to every process
    print(f"rank {trainer.global_rank} step {trainer.global_step} parameters {parameter_digest(net)}", flush=True)
    results = trainer.validate(module, dataloaders=recipe.val_data(), verbose=False)
    if trainer.is_global_zero:
        print(f"method {args.method}, branched: {', '.join(layers)}")
        print("validation: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(results[0].items())))


if __name__ == "__main__":
    main()
