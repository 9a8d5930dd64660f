"""Loss-weighting and representation methods: K weights for the K losses, one backward of the weighted sum.

* loss weighting (``kind="loss"``), no per-task gradient at all: uncertainty weighting, DWA;
* representation methods (``kind="representation"``), from the per-task gradients with respect to a shared
  representation (or the last shared layer): MGDA-UB, GradNorm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from recon._errors import ReconError
from recon.methods._base import LossWeighting, RepresentationMethod, check_choice, check_number
from recon.methods._solvers import simplex_qp

__all__ = ["DWA", "GradNorm", "MGDAUB", "UncertaintyWeighting"]


def _need_bound(method: nn.Module, n: int) -> None:
    tasks = getattr(method, "tasks", None)
    if tasks is None:
        raise ReconError(
            f"{type(method).__name__} has learnable weights: call method.bind(task_names) before creating the "
            "optimizer and add method.parameters() to it"
        )
    if len(tasks) != n:
        raise ReconError(f"{type(method).__name__} was bound to {len(tasks)} tasks but got {n} losses")


class UncertaintyWeighting(LossWeighting):
    r"""Uncertainty weighting: learn one homoscedastic log-variance per task.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and
    Semantics", CVPR 2018, Eq. (7): with :math:`s_k = \log \sigma_k^2` (the paper's stable
    parametrisation), minimise :math:`\sum_k \tfrac12 e^{-s_k} L_k + \tfrac12 s_k`. The weights are
    :math:`\tfrac12 e^{-s_k}`; ``init`` is the initial :math:`s_k` (0, i.e. :math:`\sigma_k = 1`).

    On a group copy (a layer split by a task partition, used by group G), the one backward of the weighted sum
    gives :math:`\sum_{k \in G} w_k g_k`: G's tasks with their global weights.

    Learnable: ``log_vars`` (one per task) is an ``nn.Parameter`` created by :meth:`bind`; add
    ``method.parameters()`` to the optimiser.
    """

    paper: ClassVar[str] = "Kendall et al., CVPR 2018"
    learnable: ClassVar[bool] = True

    def __init__(self, *, init: float = 0.0, n_tasks: int | None = None) -> None:
        super().__init__()
        check_number("init", init, method="uncertainty")
        self.init = float(init)
        self._hparams = {"init": init}
        self.log_vars: nn.Parameter | None = None
        if n_tasks is not None:
            check_number("n_tasks", n_tasks, low=1, integer=True, method="uncertainty")
            self.bind(n_tasks)

    def _setup(self, n_tasks: int) -> None:
        self.log_vars = nn.Parameter(torch.full((n_tasks,), self.init))

    def reset(self) -> None:
        if self.log_vars is not None:
            with torch.no_grad():
                self.log_vars.fill_(self.init)

    def forward(self, losses: Tensor, /) -> Tensor:
        _need_bound(self, losses.shape[0])
        s = self.log_vars.to(losses.device)
        return 0.5 * torch.exp(-s)

    def combine(self, losses: Tensor, /) -> tuple[Tensor, Tensor]:
        w = self(losses)
        s = self.log_vars.to(losses.device)
        total = (w * losses).sum() + 0.5 * s.sum()
        self.last_weights = w.detach()
        return total, w.detach()


class DWA(LossWeighting):
    r"""Dynamic Weight Average: weight each task by the rate at which its loss went down.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention" (MTAN), CVPR 2019, Eq. (7):
    :math:`w_k(t) = \frac{K \exp(r_k(t-1)/T)}{\sum_i \exp(r_i(t-1)/T)}`,
    :math:`r_k(t-1) = \bar L_k(t-1) / \bar L_k(t-2)` with :math:`\bar L_k` the mean loss over an epoch, and
    :math:`w_k = 1` for the first two epochs. ``temperature`` T = 2.

    Needs the per-epoch loss history: the trainer calls :meth:`end_epoch` at the end of every epoch, with the
    epoch's mean losses or with nothing (the method then uses the mean of the losses it saw in
    :func:`recon.backward` during the epoch). The history is in buffers, so it is saved by ``state_dict()``.
    On a group copy used by group G: :math:`\sum_{k \in G} w_k g_k` (one backward of the weighted sum).
    """

    paper: ClassVar[str] = "Liu et al., CVPR 2019 (MTAN)"

    def __init__(self, *, temperature: float = 2.0) -> None:
        super().__init__()
        check_number("temperature", temperature, low=0.0, low_open=True, method="dwa")
        self.temperature = float(temperature)
        self._hparams = {"temperature": temperature}
        self.register_buffer("history", torch.zeros(0, dtype=torch.float64))  # (2, K): epochs t-2, t-1
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_sum", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("running_count", torch.zeros((), dtype=torch.long))

    def _setup(self, n_tasks: int) -> None:
        if self.history.shape != (2, n_tasks):
            self.history = torch.zeros(2, n_tasks, dtype=torch.float64)
            self.running_sum = torch.zeros(n_tasks, dtype=torch.float64)
            self.epochs.zero_()
            self.running_count.zero_()

    def reset(self) -> None:
        self.history.zero_()
        self.running_sum.zero_()
        self.epochs.zero_()
        self.running_count.zero_()

    def forward(self, losses: Tensor, /) -> Tensor:
        K = losses.shape[0]
        if self.tasks is None:
            self.bind(K)
        if self.running_sum.shape[0] != K:
            raise ReconError(f"DWA was set up for {self.running_sum.shape[0]} tasks but got {K} losses")
        if torch.is_grad_enabled():
            self.running_sum += losses.detach().to(self.running_sum.device, torch.float64)
            self.running_count += 1
        if int(self.epochs) < 2:
            w = torch.ones(K, dtype=losses.dtype, device=losses.device)
        else:
            r = self.history[1] / self.history[0]
            w = K * torch.softmax(r / self.temperature, dim=0)
            w = w.to(dtype=losses.dtype, device=losses.device)
        self.last_weights = w
        return w

    def end_epoch(self, mean_losses: Mapping[str, float] | Sequence[float] | Tensor | None = None) -> None:
        """Record an epoch's mean losses (given, or the mean of those seen since the last call)."""
        if mean_losses is None:
            if int(self.running_count) == 0:
                return  # nothing seen this epoch: keep the history as it is
            mean = self.running_sum / int(self.running_count)
        else:
            if isinstance(mean_losses, Mapping):
                order = self.tasks if self.tasks is not None else tuple(mean_losses)
                missing = [t for t in order if t not in mean_losses]
                if missing:
                    raise ReconError(f"end_epoch got no mean loss for task(s) {missing}")
                values = [float(mean_losses[t]) for t in order]
            else:
                values = [float(v) for v in (mean_losses.tolist() if isinstance(mean_losses, Tensor) else mean_losses)]
            if self.tasks is None:
                self.bind(len(values))
            mean = torch.tensor(values, dtype=torch.float64, device=self.running_sum.device)
            if mean.shape != self.running_sum.shape:
                raise ReconError(f"end_epoch got {mean.numel()} mean losses for {self.running_sum.numel()} tasks")
        self.history[0] = self.history[1]
        self.history[1] = mean
        self.epochs += 1
        self.running_sum.zero_()
        self.running_count.zero_()


class MGDAUB(RepresentationMethod):
    r"""MGDA-UB: MGDA on the gradients with respect to the shared representation (the upper bound).

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, Section 3.3, Eq. (8)
    and Theorem 1: the min-norm weights :math:`\alpha` are found from
    :math:`\nabla_Z L_k` (Z the encoder's output for the batch), one backward pass of :math:`\sum_k \alpha_k
    L_k` follows. ``normalization`` as in the official code's ``gradient_normalizers``: ``"none"`` (the
    paper), ``"l2"`` (:math:`g_k/\|g_k\|`), ``"loss"`` (:math:`g_k/L_k`), ``"loss+"`` (:math:`g_k/(L_k
    \|g_k\|)`); the weights found on the normalised gradients multiply the raw losses.

    Needs ``features=`` (the shared representation tensor) in :func:`recon.backward`. On a group copy used by
    group G the backward of the weighted sum gives :math:`\sum_{k \in G} \alpha_k g_k`.
    """

    paper: ClassVar[str] = "Sener & Koltun, NeurIPS 2018"
    requires_features: ClassVar[bool] = True

    def __init__(self, *, normalization: Literal["none", "l2", "loss", "loss+"] = "none") -> None:
        super().__init__()
        check_choice("normalization", normalization, ("none", "l2", "loss", "loss+"), method="mgda_ub")
        self.normalization = normalization
        self._hparams = {"normalization": normalization}

    def forward(self, losses: Tensor, grads: Tensor, /) -> Tensor:
        with torch.no_grad():
            norms = torch.linalg.vector_norm(grads, dim=1)
            if self.normalization == "l2":
                scale = norms
            elif self.normalization == "loss":
                scale = losses.to(grads.dtype)
            elif self.normalization == "loss+":
                scale = losses.to(grads.dtype) * norms
            else:
                scale = torch.ones_like(norms)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            G = (grads @ grads.T) / torch.outer(scale, scale)
            Gn = G.to("cpu", torch.float64).numpy()
            K = Gn.shape[0]
            if np.trace(Gn) <= 0:
                alpha = np.full(K, 1.0 / K)
            else:
                alpha = simplex_qp(Gn)
            w = torch.as_tensor(alpha, dtype=losses.dtype).to(losses.device)
        self.last_weights = w
        return w


class GradNorm(RepresentationMethod):
    r"""GradNorm: learn loss weights that equalise the tasks' gradient norms, scaled by their training rates.

    Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks",
    ICML 2018, Eq. (1)-(2) and Algorithm 1: with :math:`G_W^{(i)} = \|\nabla_W w_i L_i\|`,
    :math:`\bar G_W` their mean, :math:`\tilde L_i = L_i(t)/L_i(0)` and :math:`r_i = \tilde L_i / \mathrm{mean}
    \tilde L`, the weights minimise :math:`L_{grad} = \sum_i |G_W^{(i)} - \bar G_W r_i^\alpha|` with the target
    held constant; the weights are renormalised to sum to K before each use. ``alpha`` = 1.5 (the paper's
    NYUv2 setting).

    W is what the caller passes as ``features=`` to :func:`recon.backward`: the shared representation tensor,
    or the parameters of the last shared layer (e.g. ``list(net.encoder[-1].parameters())``); without it the
    norms are taken over all shared parameters (exact, but one backward per task through the whole trunk).

    On a group copy used by group G: :math:`\sum_{k \in G} w_k g_k` (with ``features=``, the one weighted
    backward; without, the weights found from all shared columns of J weight the rows of G's tasks).

    Learnable: ``weights`` is an ``nn.Parameter`` created by :meth:`bind`; add ``method.parameters()`` to the
    optimiser. :func:`recon.backward` fills its ``.grad`` with :math:`\partial L_{grad}/\partial w`.
    """

    paper: ClassVar[str] = "Chen et al., ICML 2018"
    learnable: ClassVar[bool] = True

    def __init__(self, *, alpha: float = 1.5, n_tasks: int | None = None) -> None:
        super().__init__()
        check_number("alpha", alpha, low=0.0, method="gradnorm")
        self.alpha = float(alpha)
        self._hparams = {"alpha": alpha}
        self.weights: nn.Parameter | None = None
        self.register_buffer("initial_losses", torch.zeros(0, dtype=torch.float64))
        if n_tasks is not None:
            check_number("n_tasks", n_tasks, low=1, integer=True, method="gradnorm")
            self.bind(n_tasks)

    def _setup(self, n_tasks: int) -> None:
        self.weights = nn.Parameter(torch.ones(n_tasks))

    def reset(self) -> None:
        self.initial_losses = torch.zeros(0, dtype=torch.float64)
        if self.weights is not None:
            with torch.no_grad():
                self.weights.fill_(1.0)

    def forward(self, losses: Tensor, grads: Tensor, /) -> Tensor:
        K = losses.shape[0]
        _need_bound(self, K)
        w = self.weights
        with torch.no_grad():
            # renormalise to sum to K (the paper does it right after each optimiser step)
            w.mul_(K / w.sum())
            if self.initial_losses.numel() != K:
                self.initial_losses = losses.detach().to("cpu", torch.float64).clone()
            norms = torch.linalg.vector_norm(grads, dim=1).to(w.device, w.dtype)
            L = losses.detach().to(w.device, w.dtype)
            ratio = L / self.initial_losses.to(w.device, w.dtype)
            rel = ratio / ratio.mean()
            Gw = w * norms
            target = Gw.mean() * rel**self.alpha
            # d L_grad / d w_i = sign(G_i - target_i) * ||grad_W L_i||   (the target is a constant)
            g = torch.sign(Gw - target) * norms
            if w.grad is None:
                w.grad = g
            else:
                w.grad.add_(g)
            weights = w.detach().clone().to(losses.device, losses.dtype)
        self.last_weights = weights
        return weights
