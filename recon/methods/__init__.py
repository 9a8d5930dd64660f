"""Multi-task gradient methods, behind one interface.

``recon.methods.get(name, **hparams)`` builds any registered method and records the spec it was made from
(``method.spec``, e.g. ``"cagrad:c=0.4"``; :func:`spec_of` names any method, :func:`canonical_name` reads the
class names older run files hold); ``recon.methods.resolve(x)`` turns a name,
a recon method, a torchjd ``Aggregator`` or any callable ``(K, P) -> (P,)`` into a method that
:func:`recon.backward` can use. ``recon methods`` lists them all with their hyperparameters and papers.

Kinds (``method.kind``):

* ``"gradient"``: ``method(J)`` maps the ``(K, P)`` task gradients of the shared parameters to a ``(P,)`` update
  (mean, sum, mgda, pcgrad, graddrop, cagrad, gradvac, gradops, imtl_g, nashmtl, aligned_mtl, upgrad).
* ``"loss"``: weights from the losses alone, one backward of the weighted sum (uncertainty, dwa). DWA needs
  ``method.end_epoch()`` at every epoch end; uncertainty has learnable parameters (``method.bind(tasks)``
  then add ``method.parameters()`` to the optimiser).
* ``"representation"``: weights from the gradients w.r.t. a shared representation passed as
  ``recon.backward(..., features=z)`` (mgda_ub; gradnorm, which also has learnable weights).
* ``"model"``: rotograd, whose rotations live in a :class:`RotoGrad` module wrapping the model.

:class:`SparseTraining` is a composable option, not a method: it masks the shared encoder's gradients so
any method trains only the top-magnitude weights of each neuron.

Every method is native (PyTorch plus small float64 NumPy solvers on the K x K Gram matrix): importing or using
this package never imports cvxpy, quadprog or torchjd. torchjd aggregators can still be attached as methods.
"""

from recon.methods._base import GradientMethod, GramMethod, LossWeighting, Method, RepresentationMethod
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
from recon.methods._registry import (
    OPTIONS,
    REGISTRY,
    AggregatorMethod,
    CallableMethod,
    MethodInfo,
    available,
    canonical_name,
    format_spec,
    get,
    parse_hparams,
    resolve,
    spec_of,
)
from recon.methods._rotograd import RotoGrad, RotoGradMethod
from recon.methods._sparse import SparseTraining
from recon.methods._weighting import DWA, MGDAUB, GradNorm, UncertaintyWeighting

__all__ = [
    "DWA",
    "IMTLG",
    "MGDA",
    "MGDAUB",
    "OPTIONS",
    "REGISTRY",
    "AggregatorMethod",
    "AlignedMTL",
    "CAGrad",
    "CallableMethod",
    "GradDrop",
    "GradNorm",
    "GradOPS",
    "GradVac",
    "GradientMethod",
    "GramMethod",
    "LossWeighting",
    "Mean",
    "Method",
    "MethodInfo",
    "NashMTL",
    "PCGrad",
    "RepresentationMethod",
    "RotoGrad",
    "RotoGradMethod",
    "SparseTraining",
    "Sum",
    "UPGrad",
    "UncertaintyWeighting",
    "available",
    "canonical_name",
    "format_spec",
    "get",
    "parse_hparams",
    "resolve",
    "spec_of",
]
