"""Sparse training: a composable option that keeps only part of the shared encoder trainable.

After Zhang et al., "Proactive Gradient Conflict Mitigation in Multi-Task Learning: A Sparse Training
Perspective", arXiv 2411.18615 (2024): only a fixed subset of the shared parameters, chosen before training,
is updated; the rest keeps its initial value. The paper shows this lowers the incidence of gradient conflict
and combines with any gradient method.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from recon._errors import ReconError
from recon.methods._base import check_number

__all__ = ["SparseTraining"]

_ROWWISE = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _neuron_topk_mask(weight: Tensor, ratio: float, neuron_dim: int) -> Tensor:
    """Boolean mask keeping, for each neuron, the ``k = max(1, floor(ratio * fan_in + 1/2))`` largest |w|."""
    w = weight.detach().movedim(neuron_dim, 0)
    rows = w.reshape(w.shape[0], -1)
    fan_in = rows.shape[1]
    k = min(fan_in, max(1, math.floor(ratio * fan_in + 0.5)))
    idx = rows.abs().topk(k, dim=1).indices
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.reshape(w.shape).movedim(0, neuron_dim).contiguous()


class SparseTraining:
    r"""Keep only the top-magnitude incoming weights of each neuron trainable, at a fixed ``ratio``.

    Zhang et al., "Proactive Gradient Conflict Mitigation in Multi-Task Learning: A Sparse Training
    Perspective", arXiv 2411.18615, 2024. The mask is chosen once, when :meth:`attach` is called (before
    training): for every neuron (a row of a ``Linear`` weight, an output channel of a ``Conv`` weight), the
    :math:`k = \max(1, \mathrm{round}(\text{ratio} \cdot \text{fan\_in}))` incoming weights of largest
    magnitude stay trainable; the others are frozen at their current value. Biases and normalisation
    parameters (1-D) stay fully trainable. ``ratio`` is the trainable fraction, in (0, 1]; it has no default
    (we could not check the paper's recommended value).

    It composes with any method: :meth:`attach` registers a gradient hook on each masked parameter, so every
    gradient computed for it (``loss.backward()``, the per-task gradients of :func:`recon.backward`) is
    masked before any method sees it; the task-gradient matrix has zero columns for frozen weights and every
    method's update leaves them at zero. Pass the ``optimizer`` too and the frozen values are also restored
    after every ``optimizer.step()``, which keeps them fixed under weight decay (which would otherwise move
    them: a zero gradient is not a zero update for SGD/Adam with ``weight_decay`` or AdamW).

    Example::

        sparse = recon.methods.SparseTraining(ratio=0.3).attach(net.encoder, optimizer)
        ...  # train as usual, with any method
        sparse.remove()

    Group copies (a layer split by a task partition) are masked like any parameter it is attached to
    (``recon.train`` attaches it to every parameter 2+ tasks use, group copies included) before the method solves
    on each group's gradients.

    ``apply()`` without arguments re-imposes the frozen values (what the optimizer hook does after each step);
    ``apply(target, optimizer)`` is :meth:`attach`. ``state_dict()``/``load_state_dict()`` keep the masks chosen at
    the start across a resume.
    """

    name: ClassVar[str] = "sparse"
    paper: ClassVar[str] = "Zhang et al., arXiv 2411.18615 (2024)"

    def __init__(self, *, ratio: float) -> None:
        check_number("ratio", ratio, low=0.0, low_open=True, high=1.0, method="sparse training")
        self.ratio = float(ratio)
        self.masks: dict[nn.Parameter, Tensor] = {}
        self._frozen: dict[nn.Parameter, Tensor] = {}
        self._hooks: dict[nn.Parameter, _MaskHook] = {}
        self._handles: list[Any] = []

    def __repr__(self) -> str:
        return f"SparseTraining(ratio={self.ratio}, masked={len(self.masks)} tensors)"

    @staticmethod
    def _targets(target: Any) -> list[tuple[nn.Parameter, int]]:
        """(parameter, neuron dimension) pairs to mask."""
        if isinstance(target, nn.Module):
            out: list[tuple[nn.Parameter, int]] = []
            for module in target.modules():
                w = getattr(module, "weight", None)
                if not isinstance(w, nn.Parameter) or w.dim() < 2:
                    continue
                if isinstance(module, _TRANSPOSED):
                    out.append((w, 1))
                elif isinstance(module, _ROWWISE) or w.dim() >= 2:
                    out.append((w, 0))
            return out
        if isinstance(target, Tensor):
            target = [target]
        if isinstance(target, Iterable):
            params = [p[1] if isinstance(p, tuple) else p for p in target]
            bad = [type(p).__name__ for p in params if not isinstance(p, Tensor)]
            if bad:
                raise ReconError(f"SparseTraining.attach takes a module or parameters, got {bad[0]}")
            return [(p, 0) for p in params if p.dim() >= 2]
        raise ReconError(f"SparseTraining.attach takes a module or parameters, got {type(target).__name__}")

    def attach(
        self, target: nn.Module | Iterable[nn.Parameter], optimizer: torch.optim.Optimizer | None = None
    ) -> SparseTraining:
        """Choose the masks now from the current weights of ``target`` and start masking. Returns ``self``.

        ``target``: the shared encoder (a module: its ``Linear``/``Conv`` weights and any other weight of 2+
        dimensions), or an iterable of parameters (e.g. ``recon.shared_parameters(net)``; each of 2+
        dimensions is treated as ``(out_features, ...)``). ``optimizer``: restore frozen values after each step.
        """
        seen = set(map(id, self.masks))
        for p, dim in self._targets(target):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            mask = _neuron_topk_mask(p, self.ratio, dim)
            self.masks[p] = mask
            self._frozen[p] = p.detach()[~mask].clone()
            hook = _MaskHook(mask)
            self._hooks[p] = hook
            self._handles.append(p.register_hook(hook))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore()))
        return self

    def apply(
        self,
        target: nn.Module | Iterable[nn.Parameter] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> SparseTraining:
        """With a ``target``: :meth:`attach` it. Without: enforce the mask on the weights (:meth:`restore`)."""
        if target is None:
            self.restore()
            return self
        return self.attach(target, optimizer)

    def restore(self) -> None:
        """Write the frozen entries back to their values at :meth:`attach` time."""
        with torch.no_grad():
            for p, mask in self.masks.items():
                m = mask.to(p.device)
                p.masked_scatter_(~m, self._frozen[p].to(p.device, p.dtype))

    def remove(self) -> None:
        """Stop masking (the parameters keep their current values)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.masks.clear()
        self._frozen.clear()
        self._hooks.clear()

    def state_dict(self) -> dict[str, Any]:
        """The masks and frozen values, in the order the parameters were attached (for an exact resume)."""
        return {
            "ratio": self.ratio,
            "masks": [m.cpu() for m in self.masks.values()],
            "frozen": [v.cpu() for v in self._frozen.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks chosen earlier onto the parameters attached now (same parameters, same order)."""
        masks, frozen = list(state["masks"]), list(state["frozen"])
        params = list(self.masks)
        if len(masks) != len(params) or any(m.shape != p.shape for m, p in zip(masks, params, strict=False)):
            raise ReconError(
                f"SparseTraining state has {len(masks)} masks but {len(params)} parameters are attached; "
                "attach the same shared parameters before loading"
            )
        self.ratio = float(state["ratio"])
        for p, m, v in zip(params, masks, frozen, strict=True):
            m = m.to(device=p.device, dtype=torch.bool)
            self.masks[p] = m
            self._frozen[p] = v.to(p.device, p.dtype)
            self._hooks[p].mask = m


class _MaskHook:
    def __init__(self, mask: Tensor) -> None:
        self.mask = mask

    def __call__(self, grad: Tensor) -> Tensor:
        if self.mask.device != grad.device:
            self.mask = self.mask.to(grad.device)
        return grad * self.mask
