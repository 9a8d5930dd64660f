"""Train a (split) model inside PyTorch Lightning with any recon method: :class:`ReconMixin`.

Lightning's automatic optimisation runs one ``backward()`` of one loss; a multi-task gradient method needs each
task's gradient separately. The mixin switches the module to manual optimisation and does the step with
:func:`recon.backward` (per-task gradients, the method's update on the shared parameters, each task's own gradient
on its heads and branches) followed by ``optimizer.step()``; the per-task losses go to Lightning's logger::

    import lightning as L
    from recon.lightning import ReconMixin

    class Digits(ReconMixin, L.LightningModule):          # the mixin first
        def __init__(self, net, tasks):
            super().__init__()
            self.net = net                                 # e.g. recon.split(model, layers)
            self.configure_recon("cagrad:c=0.4", tasks=tasks)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.net(x)
            return self.recon_step({t: F.cross_entropy(out[t], y[t]) for t in self.recon_tasks})

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)  # includes a learnable method's weights

This module imports neither ``lightning`` nor ``pytorch_lightning``: the mixin works with either, and
``import recon`` never needs them. See docs/training.md ("PyTorch Lightning") for what Lightning's DDP strategy
does with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from recon._backward import BackwardResult, backward
from recon._errors import ReconError

__all__ = ["ReconMixin"]


class ReconMixin:
    """Mix into a ``LightningModule`` (listed before it) to train with a recon method in manual optimisation.

    In ``__init__`` call :meth:`configure_recon`; in ``training_step`` compute the per-task losses and return
    :meth:`recon_step`'s result. ``configure_optimizers`` returns one optimiser (and optionally schedulers,
    stepped after each step or at each epoch's end as their ``interval`` says). Gradient clipping: pass
    ``clip=`` here, not the Trainer's ``gradient_clip_val`` (Lightning refuses it in manual optimisation);
    ``accumulate_grad_batches`` is likewise unsupported. Precision ``32``, ``bf16-mixed`` and ``bf16-true``
    work; fp16 ``16-mixed`` on CUDA needs a loss scaler that per-task gradients bypass, and is refused.

    Under Lightning's DDP strategy, :func:`recon.backward` all-reduces the per-task gradients itself (DDP's
    reducer is armed only by ``manual_backward``, which the mixin does not call): see docs/training.md.
    """

    recon_method: Any
    recon_tasks: tuple[str, ...]

    def configure_recon(
        self,
        method: Any = "mean",
        *,
        tasks: Sequence[str],
        net: nn.Module | None = None,
        clip: float | None = None,
        log_prefix: str = "train/",
    ) -> None:
        """Choose the gradient method and switch to manual optimisation; call it in ``__init__``.

        Args:
            method: anything :func:`recon.methods.resolve` accepts: a name or spec (``"pcgrad"``,
                ``"cagrad:c=0.4"``), a method instance, a torchjd ``Aggregator``, a callable ``(K, P) -> (P,)``.
            tasks: the task names, in the order of the losses; the method is bound to them now, so a method
                with learnable weights (``uncertainty``, ``gradnorm``) has them before ``configure_optimizers``.
            net: the module whose parameters :func:`recon.backward` fills (default: this LightningModule).
            clip: clip the gradients' total 2-norm to this value before each optimiser step.
            log_prefix: prefix of the logged names (``train/loss_<task>``).
        """
        from recon.methods import resolve

        tasks = tuple(tasks)
        if not tasks:
            raise ReconError("configure_recon needs the task names: pass tasks=[...] in the order of the losses")
        if clip is not None and not clip > 0:
            raise ReconError(f"clip = {clip} must be a positive number (the gradients' largest total 2-norm)")
        self.automatic_optimization = False
        self.recon_method = resolve(method).bind(tasks)  # an nn.Module: Lightning moves and checkpoints it
        self.recon_tasks = tasks
        self.__dict__["_recon_net"] = net  # not a submodule: the user already holds it
        self.__dict__["_recon_clip"] = clip
        self.__dict__["_recon_prefix"] = log_prefix
        self.__dict__["_recon_checked"] = False

    def recon_step(self, losses: Mapping[str, Tensor], *, features: Tensor | None = None) -> Tensor:
        """One optimisation step: ``zero_grad``, :func:`recon.backward` with the method, ``step``; logs the losses.

        ``features`` (the shared representation) is passed on for the methods that need it (``mgda_ub``,
        ``gradnorm``). Returns the sum of the losses, detached (what Lightning shows as the step's loss).
        """
        if not getattr(self, "_recon_checked", True):
            self._recon_check()
        if tuple(losses) != self.recon_tasks:
            raise ReconError(
                f"recon_step got losses for {list(losses)}, configured for {list(self.recon_tasks)}; "
                "return one loss per task, in the order given to configure_recon"
            )
        opt = self.optimizers()
        if isinstance(opt, list):
            raise ReconError("ReconMixin steps one optimiser: return a single optimiser from configure_optimizers")
        opt.zero_grad()
        net = self.__dict__.get("_recon_net")
        net = self if net is None else net
        result = backward(losses, net, self.recon_method, features=features, step=int(self.global_step))
        clip = self.__dict__.get("_recon_clip")
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], clip)
        opt.step()
        self._recon_schedule("step")
        self._recon_log(result)
        return result.losses.sum()

    def _recon_log(self, result: BackwardResult) -> None:
        prefix = self.__dict__.get("_recon_prefix", "train/")
        values = {f"{prefix}loss_{t}": v for t, v in zip(self.recon_tasks, result.losses, strict=True)}
        if result.weights is not None and result.weights.numel() == len(self.recon_tasks):
            values |= {f"{prefix}weight_{t}": w for t, w in zip(self.recon_tasks, result.weights, strict=True)}
        self.log_dict(values, prog_bar=False, on_step=True, on_epoch=True)
        self.log(f"{prefix}loss", result.losses.sum(), prog_bar=True, on_step=True, on_epoch=True)

    def _recon_check(self) -> None:
        if getattr(self, "automatic_optimization", False):
            raise ReconError("call self.configure_recon(...) in __init__ before training with ReconMixin")
        plugin = getattr(self.trainer, "precision_plugin", None)
        if getattr(plugin, "scaler", None) is not None:
            raise ReconError(
                f"precision {self.trainer.precision!r} scales the loss with a GradScaler, which per-task gradients "
                "bypass; use precision='bf16-mixed' or '32'"
            )
        self.__dict__["_recon_checked"] = True

    def _recon_schedule(self, interval: str) -> None:
        """Step the schedulers ``configure_optimizers`` returned whose interval is ``interval`` (manual
        optimisation leaves this to the module)."""
        trainer = getattr(self, "trainer", None)
        for config in getattr(trainer, "lr_scheduler_configs", None) or ():
            if config.interval == interval and config.scheduler is not None:
                config.scheduler.step()

    def on_train_epoch_end(self) -> None:
        """End of an epoch: the method's epoch hook (DWA's loss history) and an epoch-interval scheduler's step.

        Override it? Call ``super().on_train_epoch_end()``.
        """
        self.recon_method.end_epoch()
        self._recon_schedule("epoch")
        parent = getattr(super(), "on_train_epoch_end", None)
        if parent is not None:
            parent()
