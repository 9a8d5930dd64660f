"""The registry of built-in methods, :func:`get` and :func:`resolve`."""

from __future__ import annotations

import ast
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from recon._errors import ReconError, did_you_mean
from recon.methods._base import GradientMethod, Method
from recon.methods._gradient import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    GradDrop,
    GradOPS,
    GradVac,
    Mean,
    NashMTL,
    PCGrad,
    Sum,
    UPGrad,
)
from recon.methods._rotograd import RotoGradMethod
from recon.methods._sparse import SparseTraining
from recon.methods._weighting import DWA, MGDAUB, GradNorm, UncertaintyWeighting

__all__ = [
    "MethodInfo",
    "OPTIONS",
    "REGISTRY",
    "available",
    "canonical_name",
    "format_spec",
    "get",
    "parse_hparams",
    "resolve",
    "spec_of",
]

_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class MethodInfo:
    """One registry entry: what ``recon methods`` prints."""

    name: str
    cls: type
    kind: str
    paper: str
    summary: str
    hparams: dict[str, Any] = field(default_factory=dict)  # name -> default (inspect.Parameter.empty: required)

    def hparams_text(self) -> str:
        parts = [f"{k}={v!r}" if v is not _REQUIRED else f"{k} (required)" for k, v in self.hparams.items()]
        return ", ".join(parts) if parts else "-"


def _hparams_of(cls: type, skip: tuple[str, ...] = ("n_tasks",)) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    return {
        n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in skip
    }


def _info(name: str, cls: type, summary: str) -> MethodInfo:
    return MethodInfo(name, cls, cls.kind, cls.paper, summary, _hparams_of(cls))


REGISTRY: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        _info("mean", Mean, "mean of the task gradients (joint training)"),
        _info("sum", Sum, "sum of the task gradients (joint training on the summed loss)"),
        _info("mgda", MGDA, "min-norm point of the convex hull of the task gradients"),
        _info("mgda_ub", MGDAUB, "MGDA weights from the gradients w.r.t. the shared representation"),
        _info("pcgrad", PCGrad, "project conflicting gradients onto each other's normal plane"),
        _info("graddrop", GradDrop, "keep one gradient sign per coordinate, drawn by sign purity"),
        _info("cagrad", CAGrad, "maximise the worst task improvement near the mean gradient"),
        _info("gradvac", GradVac, "raise pairwise cosines towards EMA targets (stateful)"),
        _info("gradops", GradOPS, "project each gradient off the span of the others (equal weights)"),
        _info("imtl_g", IMTLG, "equal projection of the update on every task direction"),
        _info("nashmtl", NashMTL, "Nash bargaining solution between tasks"),
        _info("aligned_mtl", AlignedMTL, "align and equally rescale the gradients' principal components"),
        _info("upgrad", UPGrad, "mean of each gradient's projection onto the dual cone"),
        _info("uncertainty", UncertaintyWeighting, "learned homoscedastic uncertainty weights"),
        _info("dwa", DWA, "weights from the epoch-to-epoch rate of loss decrease"),
        _info("gradnorm", GradNorm, "learned weights equalising gradient norms by training rate"),
        MethodInfo(  # its hyperparameters live on the RotoGrad module wrapping the model
            "rotograd",
            RotoGradMethod,
            "model",
            RotoGradMethod.paper,
            "per-task rotations of the representation + norm homogenisation; "
            "the model must contain a recon.methods.RotoGrad module",
            {"latent_size": _REQUIRED, "dim": 1, "burn_in_period": 20, "normalize_losses": False},
        ),
    )
}

#: Composable options (not methods): listed by ``recon methods``.
OPTIONS: dict[str, MethodInfo] = {
    "sparse": MethodInfo(
        "sparse",
        SparseTraining,
        "option",
        SparseTraining.paper,
        "train only the top-|w| incoming weights of each shared neuron; composes with any method",
        {"ratio": _REQUIRED},
    )
}

_ALIASES = {
    "joint": "mean",
    "ew": "sum",
    "mgdaub": "mgda_ub",
    "mgda-ub": "mgda_ub",
    "imtlg": "imtl_g",
    "imtl": "imtl_g",
    "nash_mtl": "nashmtl",
    "alignedmtl": "aligned_mtl",
    "uw": "uncertainty",
    "uncertainty_weighting": "uncertainty",
}


def available() -> list[str]:
    """Every registered method name."""
    return list(REGISTRY)


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def _parse_value(text: str) -> Any:
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_hparams(items: Iterable[str], *, where: str = "--hp") -> dict[str, Any]:
    """``["c=0.4", "rescale=none"]`` -> ``{"c": 0.4, "rescale": None}``: the one reader of hyperparameters, for
    ``--hp key=value`` and for ``--method name:key=value,key=value`` alike (Python literals; ``true``/``false``
    and ``none`` in any case; anything else stays a string)."""
    hparams: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ReconError(f"cannot read {item!r} in {where}; write key=value (e.g. cagrad:c=0.5 or --hp c=0.5)")
        hparams[key.strip()] = _parse_value(value)
    return hparams


def _parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cagrad:c=0.5,rescale=0"`` -> ``("cagrad", {"c": 0.5, "rescale": 0})``."""
    name, _, rest = spec.partition(":")
    items = [s.strip() for s in rest.split(",") if s.strip()]
    return name.strip(), parse_hparams(items, where=f"method spec {spec!r}")


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, (int, float, str)) else repr(value)


def format_spec(name: str, hparams: Mapping[str, Any] | None = None) -> str:
    """``("cagrad", {"c": 0.4})`` -> ``"cagrad:c=0.4"``; what :func:`get` reads back (``format_spec(name)`` is
    the name, lower-cased)."""
    base = name.strip().lower()
    if not hparams:
        return base
    return base + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in hparams.items())


def spec_of(method: Any) -> str:
    """The name a method goes by in run files: the spec the user gave (``"joint"``, ``"cagrad:c=0.4"``).

    A string is normalised (``"CAGrad: c=0.4"`` -> ``"cagrad:c=0.4"``); a method made by :func:`get` carries
    its spec; a method instance built directly gets its registry name (``PCGrad()`` -> ``"pcgrad"``); a torchjd
    aggregator or a callable its class or function name.
    """
    if isinstance(method, str):
        return format_spec(*_parse_spec(method)) if ":" in method else format_spec(method)
    spec = getattr(method, "spec", None)
    if spec:
        return spec
    if isinstance(method, AggregatorMethod):
        return type(method.aggregator).__name__
    if isinstance(method, CallableMethod) or (callable(method) and not isinstance(method, Method)):
        fn = method.fn if isinstance(method, CallableMethod) else method
        return getattr(fn, "__name__", type(fn).__name__)
    return canonical_name(type(method).__name__)


def canonical_name(name: str) -> str:
    """A method's name as run files should hold it: older ``summary.json`` files hold class names (``"PCGrad"``,
    ``"Mean"``), newer ones the user's spec; this maps a class name to its registry name (``"Mean"``, the joint
    training baseline, to ``"joint"``) and leaves anything else as it is."""
    if name == Mean.__name__:
        return "joint"
    for info in REGISTRY.values():
        if info.cls.__name__ == name:
            return info.name
    return name


def get(name: str, **hparams: Any) -> Method:
    """A new instance of the registered method ``name`` with hyperparameters ``hparams``.

    ``name`` is case-insensitive, accepts a few aliases (``joint`` = ``mean``, ``nash_mtl``, ``imtlg``, ...) and
    may carry hyperparameters as ``"name:key=value,key=value"`` (handy on a command line). An unknown name,
    an unknown hyperparameter or an invalid value raises :class:`ReconError` listing the valid choices.
    """
    if not isinstance(name, str):
        raise ReconError(f"a method name must be a string, got {type(name).__name__}; valid: {', '.join(REGISTRY)}")
    base, spec_hparams = _parse_spec(name) if ":" in name else (name, {})
    key = _canonical(base)
    if key not in REGISTRY:
        raise ReconError(f"unknown method {base!r}{did_you_mean(base, REGISTRY)}; valid methods: {', '.join(REGISTRY)}")
    info = REGISTRY[key]
    merged = {**spec_hparams, **hparams}
    if info.kind == "model":
        if merged:
            raise ReconError(
                f"method {key!r} takes its hyperparameters on the RotoGrad module wrapping the model "
                f"({info.hparams_text()}), not here"
            )
        method = info.cls()
        method.spec = format_spec(base)
        return method
    valid = list(_hparams_of(info.cls, skip=()))
    unknown = [k for k in merged if k not in valid]
    if unknown:
        choices = ", ".join(valid) if valid else "none"
        raise ReconError(f"unknown hyperparameter {unknown[0]!r} for method {key!r}; valid: {choices}")
    try:
        method = info.cls(**merged)
    except TypeError as exc:  # pragma: no cover - guarded by the checks above
        raise ReconError(f"bad hyperparameters for method {key!r}: {exc}") from exc
    method.spec = format_spec(base, merged)
    return method


class AggregatorMethod(GradientMethod):
    """Wraps a torchjd ``Aggregator`` (or any module mapping ``(K, P)`` to ``(P,)``) as a recon method."""

    paper = "torchjd aggregator"

    def __init__(self, aggregator: Any) -> None:
        super().__init__()
        self.aggregator = aggregator

    def forward(self, matrix: Tensor, /) -> Tensor:
        return self.aggregator(matrix)

    def reset(self) -> None:
        if hasattr(self.aggregator, "reset"):
            self.aggregator.reset()

    def extra_repr(self) -> str:
        return repr(self.aggregator)


class CallableMethod(GradientMethod):
    """Wraps any callable mapping a ``(K, P)`` tensor of task gradients to a ``(P,)`` update."""

    paper = "user-supplied"

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, matrix: Tensor, /) -> Tensor:
        return self.fn(matrix)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _is_torchjd_aggregator(obj: Any) -> bool:
    # torchjd.aggregation imports cvxpy/quadprog when installed: never import it here, only look it up.
    module = sys.modules.get("torchjd.aggregation")
    return module is not None and isinstance(obj, module.Aggregator)


def resolve(method: Any) -> Method:
    """Normalise anything a user may attach into a :class:`~recon.methods.Method`.

    Accepts a registry name (or ``"name:key=value"`` spec), a recon method instance (returned as is), a
    torchjd ``Aggregator`` instance, or any callable ``(K, P) -> (P,)``. Anything else raises
    :class:`ReconError`.
    """
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        return get(method)
    if _is_torchjd_aggregator(method):
        return AggregatorMethod(method)
    if isinstance(method, SparseTraining):
        raise ReconError(
            "SparseTraining is an option, not a method: apply it to the shared parameters "
            "(SparseTraining(ratio=...).attach(encoder, optimizer)) and pass a method such as 'mean'"
        )
    if callable(method):
        return CallableMethod(method)
    raise ReconError(
        f"cannot use {type(method).__name__} as a method; pass a name ({', '.join(REGISTRY)}), a recon method, "
        "a torchjd Aggregator or a callable (K, P) -> (P,)"
    )
