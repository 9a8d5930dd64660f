"""RotoGrad (Javaloy & Valera, ICLR 2022): per-task rotations of the shared representation.

The ``rotograd`` package no longer imports (it needs an old geotorch); this is a re-implementation with
``torch.nn.utils.parametrizations.orthogonal``, following the paper and the package's ``RotoGrad`` class.

How to attach it: wrap the shared backbone (producing the representation ``z``) and the task heads::

    net = recon.methods.RotoGrad(backbone, {"seg": seg_head, "depth": depth_head}, latent_size=256)
    out = net(x)                                   # {"seg": ..., "depth": ...}
    losses = {t: loss_fn[t](out[t], y[t]) for t in out}
    recon.backward(losses, net, "rotograd")        # or net.backward(losses)
    optimizer.step()

``net.parameters()`` includes the rotations; the paper trains them with their own optimiser/learning rate:
``net.rotation_parameters()`` and ``net.model_parameters()`` split them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from recon._errors import ReconError
from recon.methods._base import Method, check_number

__all__ = ["RotoGrad", "RotoGradMethod"]


class _Rotation(nn.Module):
    """One rotation in SO(d), parametrised by the matrix exponential of a skew-symmetric matrix."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(size))
        orthogonal(self, "weight", orthogonal_map="matrix_exp")


def _rotate(z: Tensor, R: Tensor, dim: int) -> Tensor:
    """Apply ``R`` (``r x r``) to the first r entries of ``z`` along ``dim``: ``z_lo <- R z_lo``."""
    r = R.shape[0]
    zm = z.movedim(dim, -1)
    if zm.shape[-1] == r:
        out = zm @ R.T
    else:
        out = torch.cat((zm[..., :r] @ R.T, zm[..., r:]), dim=-1)
    return out.movedim(-1, dim)


class RotoGrad(nn.Module):
    r"""RotoGrad: rotate the shared representation per task and homogenise the task gradients.

    Javaloy & Valera, "RotoGrad: Gradient Homogenization in Multitask Learning", ICLR 2022.

    * Direction (Section 4.2, Eq. 9): each task k sees :math:`r_k = R_k z` with :math:`R_k \in SO(d)`
      (``torch.nn.utils.parametrizations.orthogonal``, matrix-exponential map, identity at start). The
      rotations are trained only by the rotation loss :math:`\mathbb E \|R_k v - \nabla_{r_k} L_k\|^2`, with
      the target :math:`v` the mean of the per-task gradients w.r.t. ``z`` rescaled to a common norm.
    * Magnitude (Section 4.1, Eq. 6-7): the gradient sent into the backbone is
      :math:`\sum_k C\, u_k / \|u_k\|` with :math:`u_k = \nabla_z L_k`, :math:`C = \sum_k \alpha_k \|u_k\|` and
      :math:`\alpha_k \propto \|u_k\| / \|u_k^0\|` (relative convergence; :math:`u_k^0` the norms at the first
      step, taken again after ``burn_in_period`` steps).

    ``latent_size``: how many entries of ``z`` along ``dim`` are rotated (the first ones; default all of
    them: pass ``z.shape[dim]``). ``dim=1`` is the feature dimension of a ``(B, d)`` vector and the channel
    dimension of a ``(B, C, H, W)`` map. ``normalize_losses``: back-propagate ``L_k / L_k(0)`` instead of
    ``L_k`` into the heads and rotations. The heads always get their own task's gradient.

    ``forward`` returns ``{task: head_k(R_k z)}``; :meth:`backward` (or ``recon.backward(losses, net,
    "rotograd")``) fills every ``.grad``. Not meant to go through ``recon.split``: branch the backbone's layers
    before wrapping it, or use another method with split models.
    """

    def __init__(
        self,
        backbone: nn.Module,
        heads: Mapping[str, nn.Module],
        *,
        latent_size: int,
        dim: int = 1,
        burn_in_period: int = 20,
        normalize_losses: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(heads, Mapping) or not heads:
            raise ReconError("RotoGrad needs heads as a non-empty dict {task: module}")
        check_number("latent_size", latent_size, low=1, integer=True, method="rotograd")
        check_number("burn_in_period", burn_in_period, low=0, integer=True, method="rotograd")
        check_number("dim", dim, integer=True, method="rotograd")
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.rotations = nn.ModuleDict({t: _Rotation(latent_size) for t in heads})
        self.latent_size = int(latent_size)
        self.dim = int(dim)
        self.burn_in_period = int(burn_in_period)
        self.normalize_losses = bool(normalize_losses)
        self.register_buffer("initial_grad_norms", torch.zeros(0))
        self.register_buffer("initial_losses", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._rep: Tensor | None = None
        self._rotated: dict[str, Tensor] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def rotation_parameters(self) -> Iterator[nn.Parameter]:
        """The rotations' parameters (the paper gives them their own learning rate)."""
        return self.rotations.parameters()

    def model_parameters(self) -> Iterator[nn.Parameter]:
        """Backbone and heads parameters."""
        yield from self.backbone.parameters()
        yield from self.heads.parameters()

    def rotation(self, task: str) -> Tensor:
        """The current rotation matrix of ``task``."""
        return self.rotations[task].weight

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        z = self.backbone(*args, **kwargs)
        if not isinstance(z, Tensor):
            raise ReconError(f"RotoGrad's backbone must return one tensor (the representation), got {type(z).__name__}")
        if z.dim() <= self.dim or z.shape[self.dim] < self.latent_size:
            raise ReconError(
                f"RotoGrad: the representation has shape {tuple(z.shape)}; latent_size={self.latent_size} entries "
                f"along dim={self.dim} do not fit"
            )
        record = self.training and torch.is_grad_enabled()
        if record:
            self._rep = z
            self._rotated = {}
        out = {}
        for t, head in self.heads.items():
            R = self.rotations[t].weight
            r = _rotate(z, R.detach() if record else R, self.dim)
            if record:
                self._rotated[t] = r
            out[t] = head(r)
        return out

    def backward(self, losses: Mapping[str, Tensor], *, retain_graph: bool = False) -> Tensor:
        """Fill ``.grad`` of the backbone, heads and rotations from the task losses of the last forward.

        Returns the per-task scale applied to each task's gradient into the backbone, ``C / ||u_k||``.
        """
        if self._rep is None:
            raise ReconError("RotoGrad.backward needs a forward pass in training mode (net.train()) first")
        if set(losses) != set(self.heads):
            raise ReconError(f"RotoGrad has heads {list(self.heads)} but got losses for {list(losses)}")
        tasks = list(self.heads)
        K = len(tasks)
        z = self._rep
        L = torch.stack([losses[t].detach().reshape(()).float() for t in tasks])
        if self.initial_losses.numel() != K or int(self.steps) == self.burn_in_period:
            self.initial_losses = L.to(self.initial_losses.device).clone()
        u: list[Tensor] = []
        g_rot: list[Tensor] = []
        for t in tasks:
            loss = losses[t].reshape(())
            if self.normalize_losses:
                loss = loss / self.initial_losses[tasks.index(t)].to(loss.device)
            r = self._rotated[t]
            hp = [p for p in self.heads[t].parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, [r, *hp], retain_graph=True, allow_unused=True)
            gr = grads[0] if grads[0] is not None else torch.zeros_like(r)
            with torch.no_grad():
                for p, g in zip(hp, grads[1:], strict=True):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
                g_rot.append(gr)
                u.append(_rotate(gr, self.rotations[t].weight.detach().T, self.dim))  # R^T grad: w.r.t. z
        with torch.no_grad():
            norms = torch.stack([torch.linalg.vector_norm(g) for g in u]).clamp_min(1e-15)
            mean = torch.stack(u).mean(dim=0)
            mean_norm = torch.linalg.vector_norm(mean)
            target = torch.stack([g * (mean_norm / n) for g, n in zip(u, norms, strict=True)]).mean(dim=0)
        # rotation loss (Eq. 9): E || R_k v - grad_{r_k} L_k ||^2, v the common target
        for t, gr in zip(tasks, g_rot, strict=True):
            rot = self.rotations[t]
            params = [p for p in rot.parameters() if p.requires_grad]
            if not params:
                continue
            diff = _rotate(target, rot.weight, self.dim) - gr
            loss_rot = diff.pow(2).flatten(1).sum(1).mean() if diff.dim() > 1 else diff.pow(2).sum()
            grads = torch.autograd.grad(loss_rot, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
        # magnitude homogenisation (Eq. 6-7)
        with torch.no_grad():
            if self.initial_grad_norms.numel() != K or int(self.steps) == self.burn_in_period:
                self.initial_grad_norms = norms.detach().to(self.initial_grad_norms.device).clone()
            conv = norms / self.initial_grad_norms.to(norms.device)
            alphas = conv / conv.sum().clamp_min(1e-15)
            C = (alphas * norms).sum()
            scales = C / norms
            gz = sum(g * s for g, s in zip(u, scales, strict=True))
            self.steps += 1
        z.backward(gz, retain_graph=retain_graph)
        if not retain_graph:
            self._rep = None
            self._rotated = {}
        return scales


class RotoGradMethod(Method):
    """The ``rotograd`` entry of the registry: hands :func:`recon.backward` to the model's RotoGrad module.

    The model passed to :func:`recon.backward` must be (or contain exactly one) :class:`RotoGrad` module;
    its hyperparameters (``latent_size``, ``dim``, ``burn_in_period``, ``normalize_losses``) are set there.
    The RotoGrad module does the whole step itself (the usage classes of group copies, :mod:`recon._usage`, do
    not apply): every parameter of its backbone gets the gradient of the one rotated, rescaled representation.
    """

    kind: ClassVar[str] = "model"
    paper: ClassVar[str] = "Javaloy & Valera, ICLR 2022"

    def custom_backward(self, losses: Mapping[str, Tensor], net: Any, **kwargs: Any) -> Tensor:
        found = [m for m in net.modules() if isinstance(m, RotoGrad)] if isinstance(net, nn.Module) else []
        if len(found) != 1:
            raise ReconError(
                "method 'rotograd' needs the model to contain one recon.methods.RotoGrad module (found "
                f"{len(found)}); wrap your backbone and heads: RotoGrad(backbone, heads, latent_size=...)"
            )
        scales = found[0].backward(losses, retain_graph=bool(kwargs.get("retain_graph", False)))
        self.last_weights = scales
        return scales
