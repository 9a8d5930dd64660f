"""Gradient methods: the ``(K, P)`` task gradients of the shared parameters to one ``(P,)`` update.

Conventions, shared with torchjd (``torchjd.aggregation``) so that the two are interchangeable: rows of ``J``
are task gradients; the update is what goes into ``.grad`` (the optimiser then subtracts it, scaled by the
learning rate); random choices use torch's global RNG, drawn in the same order as torchjd's, so a seeded
run gives the same update with either library.

All Gram-based methods are written natively on the K x K Gram matrix (see :mod:`recon.methods._solvers`):
they read ``J`` twice (``J @ J.T`` and ``w @ J``), never copy it, and are never slower than torchjd's.
Nash-MTL delegates to torchjd (cvxpy), imported only when the method is first used.
"""

from __future__ import annotations

import math
from importlib.util import find_spec
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from recon._errors import ReconError
from recon.methods._base import GradientMethod, GramMethod, check_choice, check_number
from recon.methods._solvers import cagrad_dual, lower_bounded_qp, simplex_qp

__all__ = [
    "CAGrad",
    "GradDrop",
    "GradOPS",
    "GradVac",
    "IMTLG",
    "MGDA",
    "AlignedMTL",
    "Mean",
    "NashMTL",
    "PCGrad",
    "Sum",
    "UPGrad",
]

_SOLVERS_HINT = "install them with: pip install 'recon-mtl[solvers]'"


_CONSTANT_WEIGHTS: dict[tuple[int, torch.dtype, torch.device, bool], Tensor] = {}


def _constant_weights(matrix: Tensor, *, mean: bool) -> Tensor:
    """``1/K`` (mean) or ``1`` (sum) weights, cached per (K, dtype, device): no allocation per step."""
    key = (matrix.shape[0], matrix.dtype, matrix.device, mean)
    w = _CONSTANT_WEIGHTS.get(key)
    if w is None:
        K = matrix.shape[0]
        w = torch.full((K,), 1.0 / K if mean else 1.0, dtype=matrix.dtype, device=matrix.device)
        _CONSTANT_WEIGHTS[key] = w
    return w


class Mean(GradientMethod):
    r"""Joint training with the mean of the task gradients: :math:`d = \frac1K \sum_k g_k`.

    The update of minimising :math:`\frac1K \sum_k L_k` (equal weighting). Registered as ``mean`` (alias
    ``joint``).
    """

    paper: ClassVar[str] = "joint training (equal weights)"

    def forward(self, matrix: Tensor, /) -> Tensor:
        self.last_weights = _constant_weights(matrix, mean=True)
        return self.last_weights @ matrix  # a matrix-vector product is faster than matrix.mean(dim=0)


class Sum(GradientMethod):
    r"""Joint training with the sum of the task gradients: :math:`d = \sum_k g_k` (minimises :math:`\sum_k L_k`)."""

    paper: ClassVar[str] = "joint training (sum of losses)"

    def forward(self, matrix: Tensor, /) -> Tensor:
        self.last_weights = _constant_weights(matrix, mean=False)
        return self.last_weights @ matrix


class MGDA(GramMethod):
    r"""MGDA: the minimum-norm point of the convex hull of the task gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, Eq. (3)
    (Désidéri 2012): :math:`d = \sum_k \alpha_k g_k` with
    :math:`\alpha = \arg\min_{\alpha \in \Delta} \| \sum_k \alpha_k g_k \|^2`.

    The paper (Algorithm 2) and torchjd approximate this quadratic programme with Frank-Wolfe iterations;
    here it is solved exactly (to machine precision) by an active-set method on the Gram matrix, with the
    paper's closed form (Algorithm 1) for two tasks.
    """

    paper: ClassVar[str] = "Sener & Koltun, NeurIPS 2018"

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        if np.trace(G) <= 0.0:
            return np.full(K, 1.0 / K)
        if K == 2:
            # Algorithm 1 of the paper: gamma = [(g2 - g1)^T g2] / ||g1 - g2||^2, clipped to [0, 1]
            den = G[0, 0] + G[1, 1] - 2 * G[0, 1]
            gamma = 0.5 if den <= 0 else float(np.clip((G[1, 1] - G[0, 1]) / den, 0.0, 1.0))
            return np.array([gamma, 1.0 - gamma])
        return simplex_qp(G)


class PCGrad(GramMethod):
    r"""PCGrad: project each task gradient onto the normal plane of the gradients it conflicts with.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1 / Eq. (1): for each task
    i, visiting the other tasks j in random order, if :math:`g_i^{PC} \cdot g_j < 0` then
    :math:`g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j`; the update is
    :math:`\sum_i g_i^{PC}`.

    Computed on the Gram matrix. The random order comes from torch's global RNG (``torch.randperm(K)`` once
    per task, as torchjd's ``PCGrad``): seed it with ``torch.manual_seed`` for reproducibility.
    """

    paper: ClassVar[str] = "Yu et al., NeurIPS 2020"

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        weights = np.zeros(K)
        for i in range(K):
            perm = torch.randperm(K).tolist()
            c = np.zeros(K)
            c[i] = 1.0
            Gc = G[:, i].copy()  # Gc[j] = g_i^PC . g_j
            for j in perm:
                if j == i:
                    continue
                inner = Gc[j]
                if inner < 0.0:
                    step = inner / G[j, j]
                    c[j] -= step
                    Gc -= step * G[:, j]
            weights += c
        return weights


class GradDrop(GradientMethod):
    r"""GradDrop: keep, coordinate by coordinate, only the gradients of one sign chosen at random.

    Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS
    2020, Eqs. (1)-(3), Algorithm 1 lines 10-15 (no leak): the positive sign purity
    :math:`\mathcal{P} = \frac12 (1 + \frac{\sum_i g_i}{\sum_i |g_i|})`, :math:`U \sim \mathcal{U}(0, 1)` per
    coordinate, :math:`M_i = \mathbb{1}[\mathcal{P} > U] \mathbb{1}[g_i > 0] + \mathbb{1}[\mathcal{P} < U]
    \mathbb{1}[g_i < 0]`, update :math:`\sum_i M_i g_i`.

    Applied to the flattened shared-parameter gradients, as torchjd's ``GradDrop`` (the paper applies it to
    the gradients at a layer's activations). Vectorised: since :math:`\sum_i \max(g_i, 0) = (S + A)/2` and
    :math:`\sum_i \min(g_i, 0) = (S - A)/2` with :math:`S = \sum_i g_i`, :math:`A = \sum_i |g_i|`, it needs two
    reductions over ``J`` and draws ``U`` with the same ``torch.rand`` call as torchjd (same RNG stream).
    """

    paper: ClassVar[str] = "Chen et al., NeurIPS 2020"

    def forward(self, matrix: Tensor, /) -> Tensor:
        ones = torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        S = ones @ matrix  # sum_i g_i
        A = ones @ matrix.abs()  # sum_i |g_i|
        U = torch.rand(S.shape, dtype=matrix.dtype, device=matrix.device)
        # P > U  <=>  S > (2U - 1) A   (and P < U <=> S < (2U - 1) A); A = 0 gives neither, as P = nan does
        sgn = torch.sign(S - U.mul_(2.0).sub_(1.0).mul_(A))
        update = torch.addcmul(S, A, sgn).mul_(0.5)  # (S + A) / 2 where P > U, (S - A) / 2 where P < U
        self.last_weights = None
        return update.masked_fill_(sgn == 0, 0.0)


class CAGrad(GramMethod):
    r"""CAGrad: the update maximising the worst task improvement in a ball around the average gradient.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, Eq. (3) and
    Algorithm 1: with :math:`g_0 = \frac1K \sum_k g_k` and :math:`\phi = c^2 \|g_0\|^2`, solve the dual
    (Eq. 5) :math:`w^* = \arg\min_{w \in \Delta} g_w^\top g_0 + \sqrt{\phi} \|g_w\|` and take
    :math:`d = g_0 + \frac{\sqrt\phi}{\|g_{w^*}\|} g_{w^*}`.

    ``c`` (default 0.4, the paper's setting for NYUv2/Cityscapes) is the radius of the ball relative to
    :math:`\|g_0\|`. ``rescale`` follows the official code (Cranial-XIX/CAGrad): ``0`` returns :math:`d`
    (torchjd's ``CAGrad(c)`` convention), ``1`` (default, as in the paper's experiments) returns
    :math:`d / (1 + c^2)`, ``2`` returns :math:`d / (1 + c)`.

    The dual is solved natively and exactly by Newton's method on the faces of the simplex (no SLSQP, no
    cvxpy). Degenerate cases follow torchjd: if the Gram matrix's trace or :math:`\|g_{w^*}\|` (on the
    trace-normalised Gram matrix) is below ``norm_eps``, the update is zero.
    """

    paper: ClassVar[str] = "Liu et al., NeurIPS 2021"

    def __init__(self, *, c: float = 0.4, rescale: Literal[0, 1, 2] = 1, norm_eps: float = 1e-4) -> None:
        super().__init__()
        check_number("c", c, low=0.0, method="cagrad")
        check_choice("rescale", rescale, (0, 1, 2), method="cagrad")
        check_number("norm_eps", norm_eps, low=0.0, method="cagrad")
        self.c, self.rescale, self.norm_eps = float(c), int(rescale), float(norm_eps)
        self._hparams = {"c": c, "rescale": rescale, "norm_eps": norm_eps}

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        trace = float(np.trace(G))
        if trace < self.norm_eps:
            return np.zeros(K)
        Gn = G / trace
        a = Gn.mean(axis=1)
        sqrt_phi = self.c * math.sqrt(max(float(Gn.mean()), 0.0))
        if sqrt_phi == 0.0:
            weights = np.full(K, 1.0 / K)
        else:
            w = cagrad_dual(Gn, a, sqrt_phi)
            gw_norm = math.sqrt(max(float(w @ Gn @ w), 0.0))
            if gw_norm < self.norm_eps:
                return np.zeros(K)
            weights = np.full(K, 1.0 / K) + (sqrt_phi / gw_norm) * w
        if self.rescale == 1:
            weights = weights / (1.0 + self.c**2)
        elif self.rescale == 2:
            weights = weights / (1.0 + self.c)
        return weights


class GradVac(GramMethod):
    r"""Gradient Vaccine: raise the cosine of each task pair towards an EMA target.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models", ICLR 2021, Eq. (3)-(4) and Algorithm 2: for each task i and the other tasks j in
    random order, with :math:`\phi_{ij} = \cos(g_i^{PC}, g_j)` and target :math:`\hat\phi_{ij}` (initially 0),
    if :math:`\phi_{ij} < \hat\phi_{ij}` then :math:`g_i^{PC} \mathrel{+}= \frac{\|g_i^{PC}\| (\hat\phi_{ij}
    \sqrt{1 - \phi_{ij}^2} - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2})}{\|g_j\| \sqrt{1 - \hat\phi_{ij}^2}} g_j`;
    then :math:`\hat\phi_{ij} \leftarrow (1 - \beta) \hat\phi_{ij} + \beta \phi_{ij}`. Update
    :math:`\sum_i g_i^{PC}`.

    Stateful (the targets live in the buffer ``phi``; :meth:`reset` clears them). Defaults ``beta=0.5`` and
    ``eps=1e-8`` are torchjd's and LibMTL's (we could not check the value the paper used); whole-model
    granularity (one group: all shared parameters). Random order as torchjd (``torch.randperm(K - 1)`` once per
    task, global RNG).
    """

    paper: ClassVar[str] = "Wang et al., ICLR 2021"

    def __init__(self, *, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        check_number("beta", beta, low=0.0, high=1.0, method="gradvac")
        check_number("eps", eps, low=0.0, method="gradvac")
        self.beta, self.eps = float(beta), float(eps)
        self._hparams = {"beta": beta, "eps": eps}
        self.register_buffer("phi", torch.zeros(0, 0, dtype=torch.float64))

    def reset(self) -> None:
        self.phi = torch.zeros(0, 0, dtype=torch.float64)

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        m = G.shape[0]
        if self.phi.shape != (m, m):
            self.phi = torch.zeros(m, m, dtype=torch.float64)
        elif self.phi.device.type != "cpu" or self.phi.dtype != torch.float64:
            self.phi = self.phi.to("cpu", torch.float64)  # the solver works on the host
        phi = self.phi.numpy()  # shares memory with the buffer
        beta, e = self.beta, self.eps
        C = np.eye(m)
        for i in range(m):
            cG = C[i] @ G
            others = [j for j in range(m) if j != i]
            order = [others[k] for k in torch.randperm(m - 1).tolist()]
            for j in order:
                dot_ij = cG[j]
                norm_i = math.sqrt(max(float(cG @ C[i]), 0.0))
                norm_j = math.sqrt(max(float(G[j, j]), 0.0))
                phi_ij = dot_ij / (norm_i * norm_j + e)
                phi_hat = phi[i, j]
                if phi_ij < phi_hat:
                    s1 = math.sqrt(max(1.0 - phi_ij * phi_ij, 0.0))
                    s2 = math.sqrt(max(1.0 - phi_hat * phi_hat, 0.0))
                    w = norm_i * (phi_hat * s1 - phi_ij * s2) / (norm_j * s2 + e)
                    C[i, j] += w
                    cG = cG + w * G[j]
                phi[i, j] = (1.0 - beta) * phi_hat + beta * phi_ij
        return C.sum(axis=0)


class GradOPS(GramMethod):
    r"""GradOPS: project each task gradient onto the orthogonal complement of the span of the others.

    Zhu et al., "Gradient Deconfliction via Orthogonal Projections onto Subspaces For Multi-task Learning",
    WSDM 2025 (arXiv 2503.03438): :math:`g_i' = g_i - \Pi_{S_{-i}}(g_i)` with
    :math:`S_{-i} = \mathrm{span}\{g_j : j \neq i\}`, and the update :math:`G' = \sum_i g_i'`. Each
    :math:`g_i'` is orthogonal to every :math:`g_j, j \ne i`, and :math:`g_i' \cdot g_i = \|g_i'\|^2 \ge 0`, so
    :math:`G' \cdot g_j = \|g_j'\|^2 \ge 0`: the update conflicts with no task ("strongly non-conflicting"),
    whatever the number of tasks and with no dependence on an order.

    .. warning::
        The paper also re-weights the :math:`g_i'` with a single trade-off hyperparameter :math:`\alpha`.
        We could not retrieve the paper's text for that weighting (only its abstract and summaries were
        reachable), so it is **not implemented**: this is GradOPS with equal weights, i.e. the unweighted sum
        of the projected gradients. We did not invent a substitute.

    Computed on the Gram matrix: if G is well conditioned, :math:`g_i' = b_i / (G^{-1})_{ii}` with the dual
    basis :math:`b_i = \sum_j (G^{-1})_{ij} g_j`; otherwise each projection is a least-squares solve on the
    other tasks' Gram block (a gradient lying in the span of the others projects to zero).
    """

    paper: ClassVar[str] = "Zhu et al., WSDM 2025 (arXiv 2503.03438)"

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        if K == 2:  # g1' = g1 - (g1.g2 / |g2|^2) g2, g2' = g2 - (g1.g2 / |g1|^2) g1
            w1 = 1.0 - G[0, 1] / G[0, 0] if G[0, 0] > 0 else 0.0
            w2 = 1.0 - G[0, 1] / G[1, 1] if G[1, 1] > 0 else 0.0
            return np.array([w1, w2])
        d = np.sqrt(np.clip(np.diag(G), 0.0, None))
        live = d > 0
        C = np.zeros((K, K))  # row i: coefficients of g_i' on the g_j
        idx = np.flatnonzero(live)
        if idx.size == 0:
            return np.zeros(K)
        Gl = G[np.ix_(idx, idx)] / np.outer(d[idx], d[idx])  # correlation matrix of the non-zero gradients
        lam = np.linalg.eigvalsh(Gl)
        rtol = max(1e3 * K * eps, 1e-10)
        if lam[0] > rtol * lam[-1]:
            inv = np.linalg.inv(Gl)
            Cl = inv / np.diag(inv)[:, None]
            C[np.ix_(idx, idx)] = Cl / d[idx][None, :] * d[idx][:, None]
        else:
            for a, i in enumerate(idx):
                others = np.delete(idx, a)
                C[i, i] = 1.0
                if others.size:
                    coef = np.linalg.lstsq(G[np.ix_(others, others)], G[others, i], rcond=10 * K * eps)[0]
                    C[i, others] = -coef
        return C.sum(axis=0)


class IMTLG(GramMethod):
    r"""IMTL-G: the update with equal projections onto every task gradient's direction.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Section 3.2 (Eq. 6-8): find
    :math:`d = \sum_k \alpha_k g_k`, :math:`\sum_k \alpha_k = 1`, such that :math:`d \cdot u_k` is the same for
    all k, with :math:`u_k = g_k / \|g_k\|`. Closed form on the Gram matrix,
    :math:`\alpha \propto G^{+} \mathrm{diag}(G)^{1/2}`, the generalisation of torchjd's ``IMTLG`` (Quinton &
    Rey 2024) that also accepts linearly dependent gradients; pseudo-inverse cut-off ``K * eps`` of the
    gradients' dtype, as ``torch.linalg.pinv``. Zero weights if they cannot be normalised.
    """

    paper: ClassVar[str] = "Liu et al., ICLR 2021"

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        d = np.sqrt(np.clip(np.diag(G), 0.0, None))
        lam, V = np.linalg.eigh(G)  # pinv(G) from the eigendecomposition, cut-off K * eps * max |lambda|
        keep = np.abs(lam) > K * eps * np.abs(lam).max()
        v = V @ (np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0) * (V.T @ d))
        s = v.sum()
        return np.zeros(K) if abs(s) < 1e-12 else v / s


class AlignedMTL(GramMethod):
    r"""Aligned-MTL: align the principal components of the gradient system and rescale them equally.

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023, Algorithm 1:
    with the eigendecomposition :math:`G = V \Lambda V^\top` (rank r), the balance transformation
    :math:`B = \sqrt{\sigma} V \Lambda^{-1/2} V^\top` and weights :math:`\alpha = B w` for the preference
    :math:`w = \frac1K \mathbf 1`. ``scale_mode`` picks :math:`\sigma`: the smallest (``"min"``, the paper's
    default), median or mean (``"rmse"``) non-zero eigenvalue. Same computation and rank cut-off
    (``max eigenvalue * K * eps``) as torchjd's ``AlignedMTL``, in float64.
    """

    paper: ClassVar[str] = "Senushkin et al., CVPR 2023"

    def __init__(self, *, scale_mode: Literal["min", "median", "rmse"] = "min") -> None:
        super().__init__()
        check_choice("scale_mode", scale_mode, ("min", "median", "rmse"), method="aligned_mtl")
        self.scale_mode = scale_mode
        self._hparams = {"scale_mode": scale_mode}

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        lam, V = np.linalg.eigh(G)
        tol = lam.max() * K * eps
        rank = int((lam > tol).sum())
        pref = np.full(K, 1.0 / K)
        if rank == 0:
            return pref
        order = np.argsort(lam)[::-1]
        lam, V = lam[order][:rank], V[:, order][:, :rank]
        if self.scale_mode == "min":
            scale = lam[-1]
        elif self.scale_mode == "median":
            scale = np.sort(lam)[(rank - 1) // 2]  # torch.median: the lower of the two middle values
        else:
            scale = lam.mean()
        B = math.sqrt(scale) * (V / np.sqrt(lam)) @ V.T
        return B @ pref


class UPGrad(GramMethod):
    r"""UPGrad: average of the projections of each task gradient onto the dual cone of all of them.

    Quinton & Rey, "Jacobian Descent For Multi-Objective Optimization" (TorchJD), arXiv 2406.16232, Eq. (4)
    and Proposition 1: :math:`d = \frac1K \sum_i \pi_J(g_i)` where the projection of :math:`J^\top u` onto the
    dual cone is :math:`J^\top v` with :math:`v = \arg\min_{v \succeq u} v^\top G v`.

    Same problem and conventions as torchjd's ``UPGrad`` with its default ``QuadprogProjector`` (the Gram
    matrix normalised by its trace, zero if the trace is below ``norm_eps``, plus ``reg_eps * I``), but the K
    quadratic programmes are solved natively by an exact active-set method: no quadprog needed.
    """

    paper: ClassVar[str] = "Quinton & Rey, arXiv 2406.16232 (TorchJD)"

    def __init__(self, *, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        super().__init__()
        check_number("norm_eps", norm_eps, low=0.0, method="upgrad")
        check_number("reg_eps", reg_eps, low=0.0, low_open=True, method="upgrad")
        self.norm_eps, self.reg_eps = float(norm_eps), float(reg_eps)
        self._hparams = {"norm_eps": norm_eps, "reg_eps": reg_eps}

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        trace = float(np.trace(G))
        Gn = G / trace if trace >= self.norm_eps else np.zeros_like(G)
        Q = Gn + self.reg_eps * np.eye(K)
        if K == 2:  # v = (1, max(0, -Q12/Q22)) for u = e1, symmetrically for e2
            return np.array([1.0 + max(0.0, -Q[0, 1] / Q[0, 0]), 1.0 + max(0.0, -Q[0, 1] / Q[1, 1])]) / 2
        weights = np.zeros(K)
        for i in range(K):
            u = np.zeros(K)
            u[i] = 1.0
            weights += lower_bounded_qp(Q, u)
        return weights / K


class NashMTL(GradientMethod):
    r"""Nash-MTL: the Nash bargaining solution between tasks.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Eq. (4) and Algorithm 1: weights
    :math:`\alpha \succ 0` with :math:`G \alpha = 1 / \alpha`, approximated by a sequence of convex problems
    (``optim_niter`` iterations), recomputed every ``update_weights_every`` steps, and the update
    :math:`\alpha^\top J` clipped to norm ``max_norm`` (0 disables clipping). Defaults from the official
    code (max_norm=1.0, update_weights_every=1, optim_niter=20).

    Delegates to torchjd's ``NashMTL`` (cvxpy with ECOS), imported on first use only; needs the ``solvers``
    extra. Stateful (:meth:`reset`); the solver's warm start and step counter are saved by ``state_dict()``.
    """

    paper: ClassVar[str] = "Navon et al., ICML 2022"

    def __init__(self, *, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        super().__init__()
        check_number("max_norm", max_norm, low=0.0, method="nashmtl")
        check_number("update_weights_every", update_weights_every, low=1, integer=True, method="nashmtl")
        check_number("optim_niter", optim_niter, low=1, integer=True, method="nashmtl")
        missing = [name for name in ("cvxpy", "ecos") if find_spec(name) is None]
        if missing:
            raise ReconError(f"method 'nashmtl' needs {' and '.join(missing)}; {_SOLVERS_HINT}")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self._hparams = {
            "max_norm": max_norm,
            "update_weights_every": update_weights_every,
            "optim_niter": optim_niter,
        }
        self._agg: Any = None

    def _aggregator(self, n_tasks: int) -> Any:
        if self._agg is None or self._agg.n_tasks != n_tasks:
            try:
                from torchjd.aggregation import NashMTL as _TorchJDNashMTL
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ReconError(f"method 'nashmtl' needs torchjd with cvxpy; {_SOLVERS_HINT}") from exc
            self._agg = _TorchJDNashMTL(
                n_tasks=n_tasks,
                max_norm=self.max_norm,
                update_weights_every=self.update_weights_every,
                optim_niter=self.optim_niter,
            )
        return self._agg

    def reset(self) -> None:
        if self._agg is not None:
            self._agg.reset()

    def get_extra_state(self) -> dict[str, Any]:
        """The solver's warm start and step counter, so that ``state_dict()`` resumes a run exactly."""
        if self._agg is None:
            return {}
        w = self._agg.weighting
        return {
            "n_tasks": int(w.n_tasks),
            "step": float(w.step),
            "prvs_alpha": np.asarray(w.prvs_alpha, dtype=np.float64).tolist(),
            "normalization_factor": np.asarray(w.normalization_factor, dtype=np.float64).tolist(),
        }

    def set_extra_state(self, state: Any) -> None:
        if not state:
            self._agg = None
            return
        w = self._aggregator(int(state["n_tasks"])).weighting
        w.reset()
        w.prvs_alpha = np.asarray(state["prvs_alpha"], dtype=np.float64)
        w.normalization_factor = np.asarray(state["normalization_factor"], dtype=np.float64)
        if state["step"] > 0:
            w._init_optim_problem()  # torchjd builds the cvxpy problem at step 0 only
        w.step = state["step"]

    def forward(self, matrix: Tensor, /) -> Tensor:
        agg = self._aggregator(matrix.shape[0])
        weights = agg.weighting(matrix)
        self.last_weights = weights
        return weights @ matrix
