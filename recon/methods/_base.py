"""The uniform interface every recon method follows.

Four kinds of method, told apart by the class attribute ``kind``:

* ``"gradient"`` (:class:`GradientMethod`): maps the ``(K, P)`` matrix of task gradients of the shared
  parameters to one ``(P,)`` update. Most of them only need the ``K x K`` Gram matrix ``J J^T`` to find
  weights ``w`` and return ``w @ J`` (:class:`GramMethod`); they then expose :meth:`GramMethod.weights`.
* ``"loss"`` (:class:`LossWeighting`): maps the K losses to K weights and needs no per-task gradient;
  :func:`recon.backward` runs a single backward pass of ``sum_k w_k L_k``. May own learnable parameters.
* ``"representation"`` (:class:`RepresentationMethod`): finds the K weights from the gradients of the
  losses with respect to a shared representation ``features`` (or the last shared layer's parameters)
  that the caller passes to :func:`recon.backward`.
* ``"model"``: the method lives in a module of the model itself (RotoGrad); :func:`recon.backward` hands
  the whole step to it.

Every method is a small :class:`torch.nn.Module`, so ``state_dict()`` carries its state (EMA targets, loss
history, learnable weights) into a checkpoint, and ``parameters()`` lists what the optimiser must train.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from recon._errors import ReconError

__all__ = [
    "GradientMethod",
    "GramMethod",
    "LossWeighting",
    "Method",
    "RepresentationMethod",
]


class Method(nn.Module):
    """Base class of every recon method.

    Class attributes, read by the registry and by ``recon methods``:

    * ``kind``: ``"gradient"``, ``"loss"``, ``"representation"`` or ``"model"``.
    * ``paper``: the paper the method comes from.

    Instances keep their state in buffers and parameters, so ``state_dict()``/``load_state_dict()`` save and
    restore it; :meth:`reset` clears it.
    """

    kind: ClassVar[str] = "gradient"
    paper: ClassVar[str] = ""
    #: True for methods that must see ``features`` (a shared representation) in :func:`recon.backward`.
    requires_features: ClassVar[bool] = False
    #: True for methods with learnable parameters: call :meth:`bind` before building the optimiser.
    learnable: ClassVar[bool] = False
    #: The spec the method was made from (``"joint"``, ``"cagrad:c=0.4"``), set by :func:`recon.methods.get`;
    #: ``None`` for an instance built directly (:func:`recon.methods.spec_of` then gives its registry name).
    spec: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] | None = None
        #: The weights of the last step, ``(K,)`` in the order of the losses, when the method has any.
        self.last_weights: Tensor | None = None

    def _set_last_weights(self, weights: Tensor | None) -> None:
        # A plain attribute: nn.Module.__setattr__ would only end in object.__setattr__ after checking whether
        # it is a parameter, module or buffer, which costs several µs on every step.
        self.__dict__["last_weights"] = weights

    # --- lifecycle hooks a trainer calls -------------------------------------------------------------------
    def bind(self, tasks: Sequence[str] | int) -> Method:
        """Tell the method the tasks (names, or their number) before training.

        Methods with learnable parameters create them here: call ``bind`` before building the optimiser and
        add ``method.parameters()`` to it. Binding again with the same number of tasks keeps the state; with
        another number it starts afresh (state cleared, new parameters): build the optimiser after that.
        Returns ``self``.
        """
        names = tuple(f"task{i}" for i in range(tasks)) if isinstance(tasks, int) else tuple(tasks)
        if not names:
            raise ReconError("a method needs at least one task; pass the task names to bind()")
        if self.tasks is not None and len(self.tasks) == len(names):
            self.tasks = names
            return self
        if self.tasks is not None:
            self.reset()
            self._modules.pop("group_methods", None)
        self.tasks = names
        self._setup(len(names))
        return self

    def _setup(self, n_tasks: int) -> None:
        """Create the task-sized state (buffers, parameters). Called once, by :meth:`bind`."""

    def end_epoch(self, mean_losses: Mapping[str, float] | Sequence[float] | Tensor | None = None) -> None:
        """Hook the trainer calls at the end of every epoch (DWA uses it; a no-op for the others)."""

    def reset(self) -> None:
        """Forget the state gathered during training (EMA targets, loss history, ...)."""

    # --- group copies ----------------------------------------------------------------------------------------
    def for_group(self, tasks: Sequence[str]) -> Method:
        """The instance that solves the group copies used by ``tasks`` (2+ of the bound tasks), made on first use.

        A layer split by a task partition has one copy per group; :func:`recon.backward` trains the copies used
        by a group G with the method applied to G's tasks alone (:mod:`recon._usage`). Each group gets its own
        instance, a fresh copy of this one (same hyperparameters, state of its own, bound to G's tasks): the
        state of a stateful method (GradVac's EMA targets of G's pairs, Nash-MTL's weights and step counter)
        then follows G's gradients only. The instances live in the submodule ``group_methods`` (keyed
        ``"seg+depth"``), so ``state_dict()`` carries them and a resumed run continues exactly.
        """
        key = "+".join(tasks)
        groups = self._modules.get("group_methods")
        if groups is None:
            groups = nn.ModuleDict()
            self.add_module("group_methods", groups)
        elif key in groups:
            return groups[key]  # type: ignore[return-value]
        groups[key] = self._fresh().bind(list(tasks))
        return groups[key]  # type: ignore[return-value]

    def _fresh(self) -> Method:
        """A copy of this method with its hyperparameters and none of its state (nor its group instances)."""
        groups = self._modules.pop("group_methods", None)
        try:
            fresh = copy.deepcopy(self)
        finally:
            if groups is not None:
                self._modules["group_methods"] = groups
        fresh.reset()
        fresh.tasks = None
        fresh._set_last_weights(None)
        return fresh

    # --- state_dict with task-sized state ------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint of a group split holds the group instances: make them before torch loads into them.
        head = prefix + "group_methods."
        for key in [k for k in state_dict if k.startswith(head)]:
            self.for_group(key[len(head) :].split(".", 1)[0].split("+"))
        # Buffers created empty before bind() take the saved shape, so an unbound method can load a checkpoint.
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and buf.shape != state_dict[key].shape and buf.numel() == 0:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters this instance was built with."""
        return dict(getattr(self, "_hparams", {}))


class GradientMethod(Method):
    """A method mapping the ``(K, P)`` task gradients of the shared parameters to a ``(P,)`` update."""

    kind: ClassVar[str] = "gradient"

    def forward(self, matrix: Tensor, /) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, matrix: Tensor, /) -> Tensor:
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ReconError(f"{type(self).__name__} expects a (K, P) matrix of task gradients, got {shape}")
        if not matrix.requires_grad:
            return super().__call__(matrix)
        with torch.no_grad():
            return super().__call__(matrix)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def host_gram(gramian: Tensor) -> np.ndarray:
    """The K x K Gram matrix as float64 NumPy on the host (the one host transfer, and sync, of a step)."""
    G = gramian.detach()
    if G.device.type != "cpu":
        G = G.cpu()
    if G.dtype not in _NUMPY_DTYPES:
        G = G.float()
    return G.numpy().astype(np.float64)


def weights_like(w: np.ndarray | Sequence[float], like: Tensor) -> Tensor:
    """Host weights as a new ``(K,)`` tensor with the dtype and device of ``like``.

    On the CPU one NumPy cast and ``torch.from_numpy``: at small K this round trip is a visible share of a step.
    """
    np_dtype = _NUMPY_DTYPES.get(like.dtype)
    if like.device.type == "cpu" and np_dtype is not None:
        return torch.from_numpy(np.array(w, dtype=np_dtype))
    return torch.from_numpy(np.array(w, dtype=np.float64)).to(like.device, like.dtype)


class GramMethod(GradientMethod):
    """A gradient method whose update is ``w @ J`` with weights ``w`` found from the Gram matrix ``J J^T``.

    Only the ``K x K`` Gram matrix crosses to the host for the solver; ``J`` itself is read twice on its
    device: once for ``J @ J.T`` and once for ``w @ J``. Subclasses implement :meth:`_weights` (float64 NumPy)
    and may add a closed form for two tasks in plain floats, :meth:`_two_tasks`.
    """

    def weights(self, gramian: Tensor | np.ndarray, /) -> Tensor | np.ndarray:
        """Weights ``(K,)`` from the Gram matrix ``J J^T``; same type (tensor or array) as the input.

        Usable on its own, e.g. with a Gram matrix computed by torchjd's autogram engine.
        """
        if isinstance(gramian, Tensor):
            eps = torch.finfo(gramian.dtype).eps if gramian.is_floating_point() else 1e-7
            w = self._host_weights(host_gram(gramian), eps)
            return torch.as_tensor(w, dtype=gramian.dtype, device=gramian.device)
        return self._host_weights(np.asarray(gramian, dtype=np.float64), float(np.finfo(np.float32).eps))

    def _host_weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        if G.shape[0] == 2 and (w := self._two_tasks(float(G[0, 0]), float(G[0, 1]), float(G[1, 1]), eps)):
            return np.array(w)
        return self._weights(G, eps)

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:  # pragma: no cover - abstract
        """Weights from the float64 Gram matrix ``G``; ``eps`` is the machine epsilon of the gradients."""
        raise NotImplementedError

    def _two_tasks(self, g11: float, g12: float, g22: float, eps: float) -> tuple[float, float] | None:
        """Weights for two tasks from ``G = [[g11, g12], [g12, g22]]`` in plain floats, or None to use
        :meth:`_weights`. At K = 2 NumPy's per-call cost is most of the host time of a step."""
        return None

    def forward(self, matrix: Tensor, /) -> Tensor:
        eps = torch.finfo(matrix.dtype).eps
        G = matrix @ matrix.T
        if matrix.shape[0] == 2:
            rows = G.tolist()  # (on an accelerator, the one host transfer and sync of the step)
            w = self._two_tasks(rows[0][0], rows[0][1], rows[1][1], eps) or self._weights(np.array(rows), eps)
        else:
            w = self._weights(host_gram(G), eps)
        weights = weights_like(w, matrix)
        self._set_last_weights(weights)
        return weights @ matrix


class LossWeighting(Method):
    """A method mapping the K task losses to K weights, with no per-task gradient.

    :func:`recon.backward` runs one backward pass of :meth:`combine` (``sum_k w_k L_k`` plus any
    regulariser the method adds).
    """

    kind: ClassVar[str] = "loss"

    def forward(self, losses: Tensor, /) -> Tensor:  # pragma: no cover - abstract
        """Weights ``(K,)`` for the losses ``(K,)``; may carry autograd history to learnable parameters."""
        raise NotImplementedError

    def combine(self, losses: Tensor, /) -> tuple[Tensor, Tensor]:
        """The scalar to back-propagate and the (detached) weights."""
        w = self(losses)
        return (w * losses).sum(), w.detach()


class RepresentationMethod(Method):
    """A method finding the K loss weights from the task gradients with respect to a shared representation.

    ``forward(losses, grads)``: ``losses`` ``(K,)`` (detached) and ``grads`` ``(K, D)``, the gradient of each
    loss with respect to the representation (flattened). Returns the weights ``(K,)``; the backward pass is
    then ``sum_k w_k L_k``.
    """

    kind: ClassVar[str] = "representation"

    def forward(self, losses: Tensor, grads: Tensor, /) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
    method: str = "",
) -> None:
    """Raise a one-line :class:`ReconError` unless ``value`` is a number within the given bounds."""
    where = f" of {method}" if method else ""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ReconError(f"hyperparameter {name}{where} must be {kind}, got {value!r}")
    if value != value:  # NaN
        raise ReconError(f"hyperparameter {name}{where} must be a number, got nan")
    if low is not None and (value <= low if low_open else value < low):
        op = ">" if low_open else ">="
        raise ReconError(f"hyperparameter {name}{where} must be {op} {low}, got {value!r}")
    if high is not None and value > high:
        raise ReconError(f"hyperparameter {name}{where} must be <= {high}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any], *, method: str = "") -> None:
    """Raise a one-line :class:`ReconError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        where = f" of {method}" if method else ""
        raise ReconError(f"hyperparameter {name}{where} must be one of {list(choices)}, got {value!r}")
