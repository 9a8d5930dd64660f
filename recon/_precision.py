"""Mixed precision for a multi-task step: autocast around the forward, one loss scale for all K task passes.

``"32"``: nothing changes. ``"bf16"`` and ``"fp16"``: the forward and the losses run under
``torch.autocast(device_type=<the model's device type>, dtype=...)`` (Micikevicius et al., "Mixed Precision
Training", ICLR 2018). Parameters stay float32, so their gradients, the ``(K, P)`` task-gradient matrix J, the
cosines and the Gram matrices are float32 (:mod:`recon._gram` accumulates in float32 even for half gradients).

fp16 gradients underflow, so ``"fp16"`` also scales the losses, as ``torch.amp.GradScaler`` does (same
defaults: initial scale 2^16, backoff 0.5, growth x2 after 2000 clean steps), with ONE scale shared by the K
task passes: every task loss is multiplied by the same ``s`` before its backward pass, so ``J`` is ``s`` times
the true task gradients, and is divided by ``s`` (unscaled) before any cosine is taken or any method sees it.
Loss-weighting and representation methods, which run a single backward of their combined loss, scale that
combined loss instead (the method's own parameters then get the right gradient). RotoGrad, whose rotation
update is not linear in the losses, gets them unscaled (its gradients are only checked for overflow).
A step whose unscaled gradients hold an inf or NaN is skipped (no optimizer step), counted in ``skipped``,
and the scale halves; the scale doubles after ``growth_interval`` clean steps in a row. Under torchrun the
gradients are averaged across processes before they are unscaled, so an overflow on one process is seen by
all and every process skips alike. ``state_dict()`` holds the scale, the clean-step count and the skip count:
a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from recon._backward import TaskGradients
from recon._errors import ReconError, did_you_mean

__all__ = ["PRECISIONS", "Precision", "check_precision"]

PRECISIONS = ("32", "bf16", "fp16")
_DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str | int) -> str:
    """``precision`` as one of ``"32"``, ``"bf16"``, ``"fp16"``, or a :class:`ReconError` (checked before any
    folder is made)."""
    mode = str(precision)
    if mode not in PRECISIONS:
        raise ReconError(
            f"precision {mode!r} is unknown{did_you_mean(mode, PRECISIONS)}; choose one of {', '.join(PRECISIONS)}"
        )
    return mode


class Precision:
    """Autocast and (for fp16) a dynamic loss scale for one training or profiling run.

    Args:
        mode: ``"32"``, ``"bf16"`` or ``"fp16"`` (``32`` as an int is accepted).
        device_type: ``"cuda"``, ``"cpu"``, ...: where autocast applies (the model's device type).
        init_scale, growth_factor, backoff_factor, growth_interval: ``torch.amp.GradScaler``'s, same defaults.
    """

    def __init__(
        self,
        mode: str | int = "32",
        *,
        device_type: str = "cpu",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        mode = str(mode)
        if mode not in PRECISIONS:
            check_precision(mode)
        self.mode = mode
        self.device_type = device_type
        self.dtype = _DTYPES[mode]
        self.scaling = mode == "fp16"
        self.scale_value = float(init_scale) if self.scaling else 1.0
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.growth_tracker = 0  # clean steps in a row since the last change of scale
        self.skipped = 0  # steps skipped for inf/NaN gradients

    @classmethod
    def of(cls, precision: Precision | str | int | None, device: torch.device | str) -> Precision:
        """``precision`` as a :class:`Precision` on ``device`` (a given object is returned as it is)."""
        if isinstance(precision, Precision):
            return precision
        return cls("32" if precision is None else precision, device_type=torch.device(device).type)

    # --- the hooks of a step ---------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Around the forward and the losses (not around the backward passes)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scale(self, values: Sequence[Tensor]) -> list[Tensor]:
        """The K task losses, each times the one shared scale (fp16), before their backward passes."""
        if not self.scaling:
            return list(values)
        return [v.float() * self.scale_value for v in values]

    def scale_loss(self, total: Tensor) -> Tensor:
        """One combined loss times the scale (loss-weighting and representation methods)."""
        return total.float() * self.scale_value if self.scaling else total

    def unscale(self, grads: TaskGradients, *, update: bool = True) -> bool:
        """Divide J and the task-specific gradients by the scale, in place; False (step skipped, scale
        backed off) when any of them is inf or NaN. Call it on the gradients averaged across processes."""
        return self.unscale_tensors(grads.tensors(), update=update)

    def unscale_tensors(self, tensors: Iterable[Tensor | None], *, update: bool = True, unscale: bool = True) -> bool:
        """:meth:`unscale` for any gradients (e.g. every ``.grad`` after a single combined backward);
        ``update=False`` leaves the scale and the counts alone (a partial check within a step);
        ``unscale=False`` only checks (gradients of losses that were not scaled)."""
        if not self.scaling:
            return True
        inv = 1.0 / self.scale_value  # a power of two: exact
        bad = []
        for t in tensors:
            if t is None:
                continue
            if unscale:
                t.mul_(inv)
            values = t._values() if t.is_sparse else t
            bad.append(values.sum(dtype=torch.float32).isfinite().logical_not())  # inf or NaN anywhere -> not finite
        finite = not bool(torch.stack(bad).any()) if bad else True  # the one host sync of the step
        if update:
            self.update(finite)
        return finite

    def update(self, finite: bool) -> None:
        """GradScaler's rule: overflow -> scale x backoff and count the skipped step; ``growth_interval`` clean
        steps in a row -> scale x growth."""
        if not self.scaling:
            return
        if not finite:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.scale_value *= self.growth_factor
            self.growth_tracker = 0

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step of a step whose gradients were finite (the caller skips the others)."""
        optimizer.step()

    def summary(self) -> dict[str, Any]:
        """What summary.json records: the precision (unless 32) and fp16's skipped steps."""
        if self.mode == "32":
            return {}
        return {"precision": self.mode, **({"skipped_steps": self.skipped} if self.scaling else {})}

    # --- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "scale": self.scale_value,
            "growth_tracker": self.growth_tracker,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ReconError(
                f"the checkpoint was trained with precision {state['mode']}, not {self.mode}; "
                f"resume with --precision {state['mode']}"
            )
        self.scale_value = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.skipped = int(state["skipped"])

    def __repr__(self) -> str:
        extra = f", scale={self.scale_value:g}, skipped={self.skipped}" if self.scaling else ""
        return f"Precision({self.mode!r}, device_type={self.device_type!r}{extra})"
