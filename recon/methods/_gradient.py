"""Gradient methods: the ``(K, P)`` task gradients of the shared parameters to one ``(P,)`` update.

Conventions, shared with torchjd (``torchjd.aggregation``) so that the two are interchangeable: rows of ``J``
are task gradients; the update is what goes into ``.grad`` (the optimiser then subtracts it, scaled by the
learning rate); random choices use torch's global RNG, drawn in the same order as torchjd's, so a seeded
run gives the same update with either library.

All Gram-based methods are written natively on the K x K Gram matrix (see :mod:`recon.methods._solvers`):
they read ``J`` twice (``J @ J.T`` and ``w @ J``) and never copy it. ``benchmarks/methods.py`` times
them against torchjd's aggregators and against the Gram product alone.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from recon.methods._base import GradientMethod, GramMethod, check_choice, check_number, host_gram, weights_like
from recon.methods._solvers import (
    cagrad_dual,
    cagrad_dual_two,
    eigh,
    lower_bounded_qp,
    nash_bargaining,
    simplex_qp,
    submatrix,
)

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
        self._set_last_weights(_constant_weights(matrix, mean=True))
        return self.last_weights @ matrix  # a matrix-vector product is faster than matrix.mean(dim=0)


class Sum(GradientMethod):
    r"""Joint training with the sum of the task gradients: :math:`d = \sum_k g_k` (minimises :math:`\sum_k L_k`)."""

    paper: ClassVar[str] = "joint training (sum of losses)"

    def forward(self, matrix: Tensor, /) -> Tensor:
        self._set_last_weights(_constant_weights(matrix, mean=False))
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
        return simplex_qp(G)

    def _two_tasks(self, g11: float, g12: float, g22: float, eps: float) -> tuple[float, float]:
        # Algorithm 1 of the paper: gamma = [(g2 - g1)^T g2] / ||g1 - g2||^2, clipped to [0, 1]
        den = g11 + g22 - 2.0 * g12
        gamma = 0.5 if den <= 0.0 else min(max((g22 - g12) / den, 0.0), 1.0)
        return gamma, 1.0 - gamma


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

    def _two_tasks(self, g11: float, g12: float, g22: float, eps: float) -> tuple[float, float]:
        torch.randperm(2), torch.randperm(2)  # the general path's draws: the RNG stream stays torchjd's
        if g12 >= 0.0:
            return 1.0, 1.0
        return 1.0 - g12 / g11, 1.0 - g12 / g22  # (g12 < 0 implies g11, g22 > 0)

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
    the gradients at a layer's activations). Vectorised with half sums: with :math:`s = \frac12 \sum_i g_i`
    and :math:`a = \frac12 \sum_i |g_i|`, the positive and negative parts sum to :math:`s + a` and
    :math:`s - a`, and :math:`\mathcal{P} > U \iff s + a - 2Ua > 0`. With :math:`\sigma` the sign of that
    quantity the update is :math:`\sigma (\sigma s + a)`: :math:`s + a`, :math:`s - a`, or 0 when
    :math:`\mathcal{P} = U` (and where every :math:`g_i = 0`, where :math:`\mathcal{P}` is undefined), as the
    paper's two strict comparisons give. ``U`` is drawn with the same ``uniform_`` call as ``torch.rand`` (so
    the same RNG stream as torchjd's ``GradDrop``).

    Cost: one pass over ``J`` for :math:`s` and one per task for :math:`a`, then about eight passes over ``P``
    values, all in one scratch block; no ``(K, P)`` temporary. Drawing ``P`` uniform numbers dominates on a CPU.
    """

    paper: ClassVar[str] = "Chen et al., NeurIPS 2020"

    def forward(self, matrix: Tensor, /) -> Tensor:
        K, P = matrix.shape
        half = torch.full((K,), 0.5, dtype=matrix.dtype, device=matrix.device)
        scratch = torch.empty(3, P, dtype=matrix.dtype, device=matrix.device)  # one allocation, three rows
        s, a, d = scratch.unbind(0)
        torch.mv(matrix.T, half, out=s)  # s = sum_i g_i / 2
        torch.abs(matrix[0], out=a)
        for k in range(1, K):  # row by row: no (K, P) temporary for |J|
            torch.abs(matrix[k], out=d)
            a.add_(d)
        a.mul_(0.5)  # a = sum_i |g_i| / 2
        d.uniform_()  # U, the same draw as torch.rand(P)
        torch.addcmul(s, d, a, value=-2.0, out=d).add_(a).sign_()  # sign(s + a - 2 U a)
        update = torch.addcmul(a, s, d)
        self._set_last_weights(None)
        return update.mul_(d)


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
        self._scale = (1.0, 1.0 / (1.0 + self.c**2), 1.0 / (1.0 + self.c))[self.rescale]

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        trace = float(np.trace(G))
        if trace < self.norm_eps:
            return np.zeros(K)
        Gn = G / trace
        a = Gn.mean(axis=1)
        sqrt_phi = self.c * math.sqrt(max(float(Gn.mean()), 0.0))
        if sqrt_phi == 0.0:
            return np.full(K, self._scale / K)
        w = cagrad_dual(Gn, a, sqrt_phi)
        gw_norm = math.sqrt(max(float(w @ Gn @ w), 0.0))
        if gw_norm < self.norm_eps:
            return np.zeros(K)
        return (np.full(K, 1.0 / K) + (sqrt_phi / gw_norm) * w) * self._scale

    def _two_tasks(self, g11: float, g12: float, g22: float, eps: float) -> tuple[float, float]:
        # _weights in plain floats, with the trace-normalised Gram matrix [[p, q], [q, r]]
        trace = g11 + g22
        if trace < self.norm_eps:
            return 0.0, 0.0
        p, q, r = g11 / trace, g12 / trace, g22 / trace
        sqrt_phi = self.c * math.sqrt(max((p + 2.0 * q + r) / 4.0, 0.0))
        if sqrt_phi == 0.0:
            return self._scale / 2, self._scale / 2
        t = cagrad_dual_two(p, q, r, (p + q) / 2.0, (q + r) / 2.0, sqrt_phi)
        u = 1.0 - t
        gw_norm = math.sqrt(max(t * t * p + 2.0 * t * u * q + u * u * r, 0.0))
        if gw_norm < self.norm_eps:
            return 0.0, 0.0
        k = sqrt_phi / gw_norm
        return (0.5 + k * t) * self._scale, (0.5 + k * u) * self._scale


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

    On group copies (a layer split by a task partition) each group G gets its own instance
    (:meth:`~recon.methods.Method.for_group`), whose targets are those of G's pairs, moved by G's gradients only.
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
        phi_t = self._buffers["phi"]  # (direct access: this runs every step)
        if phi_t.shape != (m, m):
            self.phi = phi_t = torch.zeros(m, m, dtype=torch.float64)
        elif phi_t.device.type != "cpu" or phi_t.dtype != torch.float64:
            self.phi = phi_t = phi_t.to("cpu", torch.float64)  # the solver works on the host
        beta, e = self.beta, self.eps
        # Plain Python floats: K is small and every step below is a scalar or a length-K update, where NumPy's
        # per-call cost would dominate.
        g = G.tolist()
        phi = phi_t.tolist()
        weights = [0.0] * m
        for i in range(m):
            c = [0.0] * m  # g_i^PC = sum_k c[k] g_k
            c[i] = 1.0
            cG = list(g[i])  # cG[j] = g_i^PC . g_j
            others = [j for j in range(m) if j != i]
            if m > 2:  # (randperm(1) draws nothing from the RNG: skipping it keeps the stream torchjd's)
                others = [others[k] for k in torch.randperm(m - 1).tolist()]
            for j in others:
                norm_i = math.sqrt(max(sum(ck * x for ck, x in zip(c, cG, strict=True)), 0.0))
                norm_j = math.sqrt(max(g[j][j], 0.0))
                phi_ij = cG[j] / (norm_i * norm_j + e)
                phi_hat = phi[i][j]
                if phi_ij < phi_hat:
                    s1 = math.sqrt(max(1.0 - phi_ij * phi_ij, 0.0))
                    s2 = math.sqrt(max(1.0 - phi_hat * phi_hat, 0.0))
                    w = norm_i * (phi_hat * s1 - phi_ij * s2) / (norm_j * s2 + e)
                    c[j] += w
                    cG = [x + w * y for x, y in zip(cG, g[j], strict=True)]
                phi[i][j] = (1.0 - beta) * phi_hat + beta * phi_ij
            weights = [x + y for x, y in zip(weights, c, strict=True)]
        phi_t.numpy()[:] = phi  # (the buffer is float64 on the host, checked above)
        return np.array(weights)


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

    def _two_tasks(self, g11: float, g12: float, g22: float, eps: float) -> tuple[float, float]:
        # g1' = g1 - (g1.g2 / |g2|^2) g2, g2' = g2 - (g1.g2 / |g1|^2) g1
        return (1.0 - g12 / g11 if g11 > 0.0 else 0.0), (1.0 - g12 / g22 if g22 > 0.0 else 0.0)

    def _weights(self, G: np.ndarray, eps: float) -> np.ndarray:
        K = G.shape[0]
        d = np.sqrt(np.maximum(G.diagonal(), 0.0))
        live = d > 0
        C = np.zeros((K, K))  # row i: coefficients of g_i' on the g_j
        idx = np.flatnonzero(live)
        if idx.size == 0:
            return np.zeros(K)
        dl = d[idx]
        Gl = submatrix(G, idx) / np.outer(dl, dl)  # correlation matrix of the non-zero gradients
        lam, V = eigh(Gl)
        rtol = max(1e3 * K * eps, 1e-10)
        if lam[0] > rtol * lam[-1]:
            inv = (V / lam) @ V.T
            Cl = inv / inv.diagonal()[:, None]
            Cd = Cl / dl[None, :] * dl[:, None]
            if idx.size == K:
                return Cd.sum(axis=0)
            C[np.ix_(idx, idx)] = Cd
        else:
            for a, i in enumerate(idx):
                others = np.delete(idx, a)
                C[i, i] = 1.0
                if others.size:
                    coef = np.linalg.lstsq(submatrix(G, others), G[others, i], rcond=10 * K * eps)[0]
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
        d = np.sqrt(np.maximum(G.diagonal(), 0.0))
        lam, V = eigh(G)  # pinv(G) from the eigendecomposition, cut-off K * eps * max |lambda|
        keep = np.abs(lam) > K * eps * np.abs(lam).max()
        v = V @ (np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0) * (V.T @ d))
        s = v.sum()
        return np.zeros(K) if abs(s) < 1e-12 else v / s

    def _two_tasks(self, a: float, b: float, c: float, eps: float) -> tuple[float, float] | None:
        """Closed form for a well-conditioned 2 x 2 Gram matrix ``[[a, b], [b, c]]``: ``G^{-1} (sqrt a, sqrt
        c)`` normalised to sum 1 is ``(c sqrt a - b sqrt c, a sqrt c - b sqrt a) / ((sqrt a + sqrt c)(sqrt(ac) -
        b))``. None where the pseudo-inverse cut-off would matter."""
        half_gap = math.hypot((a - c) / 2, b)
        lam_max, lam_min = (a + c) / 2 + half_gap, (a + c) / 2 - half_gap
        if not lam_min > 2 * eps * lam_max * 1e3:  # leave near-singular cases to the general pseudo-inverse
            return None
        ra, rc = math.sqrt(a), math.sqrt(c)
        den = (ra + rc) * (math.sqrt(a * c) - b)
        return (c * ra - b * rc) / den, (a * rc - b * ra) / den


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
        lam, V = eigh(G)
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

    def _two_tasks(self, a: float, b: float, c: float, eps: float) -> tuple[float, float] | None:
        """Closed form for a full-rank 2 x 2 Gram matrix ``[[a, b], [b, c]]``: with ``s = sqrt(det G)`` and
        ``t = sqrt(tr G + 2 s)``, ``G^{-1/2} = adj(G + s I) / (s t)``, so ``alpha = sqrt(sigma) / 2 *
        (c + s - b, a + s - b) / (s t)``. None for rank 1 (the general path drops the null direction)."""
        half_gap = math.hypot((a - c) / 2, b)
        lam_max, lam_min = (a + c) / 2 + half_gap, (a + c) / 2 - half_gap
        if not lam_min > 1e3 * lam_max * 2 * eps:  # near rank 1: the eigendecomposition's cut-off decides
            return None
        # "min" and "median" (torch.median takes the lower middle value) both give the smaller eigenvalue
        scale = (lam_max + lam_min) / 2 if self.scale_mode == "rmse" else lam_min
        s = math.sqrt(a * c - b * b)
        t = math.sqrt(a + c + 2 * s)
        k = math.sqrt(scale) / (2.0 * s * t)
        return k * (c + s - b), k * (a + s - b)


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
        weights = np.zeros(K)
        for i in range(K):
            u = np.zeros(K)
            u[i] = 1.0
            weights += lower_bounded_qp(Q, u)
        return weights / K

    def _two_tasks(self, g11: float, g12: float, g22: float, eps: float) -> tuple[float, float]:
        # _weights for K = 2: v = (1, max(0, -Q12 / Q22)) for u = e1, symmetrically for e2
        trace = g11 + g22
        n = 1.0 / trace if trace >= self.norm_eps else 0.0
        q11, q12, q22 = g11 * n + self.reg_eps, g12 * n, g22 * n + self.reg_eps
        return (1.0 + max(0.0, -q12 / q11)) / 2.0, (1.0 + max(0.0, -q12 / q22)) / 2.0


class NashMTL(GradientMethod):
    r"""Nash-MTL: the Nash bargaining solution between tasks.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022 (arXiv 2202.01017), Eq. (4) and
    Algorithm 1: the update :math:`d = J^\top \alpha` with the weights :math:`\alpha \succ 0` solving
    :math:`G \alpha = 1 / \alpha` (elementwise), :math:`G = J J^\top`; equivalently :math:`g_i^\top d = 1 /
    \alpha_i`, and :math:`d` maximises :math:`\sum_i \log(g_i^\top d) - \tfrac12 \|d\|^2`. Recomputed every
    ``update_weights_every`` steps (the previous weights are reused in between), and the update clipped to norm
    ``max_norm`` by rescaling :math:`\alpha` (0 disables clipping). Defaults from the official code
    (max_norm=1.0, update_weights_every=1, optim_niter=20).

    Solved natively and to machine precision (the official code and torchjd approximate it by a
    concave-convex procedure solved with cvxpy at every step; both converge to the same :math:`\alpha`):
    since the solution is covariant to the scale of each task gradient, the equation is solved on the cosine
    matrix :math:`C = S^{-1} G S^{-1}`, :math:`S = \mathrm{diag}(\|g_i\|)`, as :math:`C \gamma = 1/\gamma`,
    :math:`\alpha = S^{-1} \gamma`, by damped Newton on the convex dual :math:`\tfrac12 \gamma^\top C \gamma -
    \sum_i \log \gamma_i` (:func:`recon.methods._solvers.nash_bargaining`; closed form
    :math:`\gamma_i = 1/\sqrt{1 + \cos(g_1, g_2)}` for two tasks), warm-started from the previous weights and
    capped at ``optim_niter`` Newton steps. torchjd and the official code divide G by its Frobenius norm inside
    their solver but put the norm back in its constraints: their :math:`\alpha`, like this one, solves the
    equation for the unnormalised G. Since :math:`\|d\|^2 = \alpha^\top G \alpha = K`, with ``max_norm=1`` a
    freshly solved update is always clipped (to norm 1). Degenerate cases:

    * linearly dependent gradients (singular :math:`G`): :math:`d` and :math:`\alpha` are still unique
      (:math:`\alpha_i = 1 / g_i^\top d`); nothing special is done.
    * zero gradients: a task with :math:`g_i = 0` has no say (no :math:`d` improves it); the others bargain
      among themselves and its weight keeps its previous value (it does not change the update); torchjd keeps
      all the previous weights instead.
    * no direction improves every task (0 in the convex hull of the gradients, e.g. :math:`g_1 = -g_2`): the
      equation has no solution; the previous weights are kept (initially ones), as torchjd does in practice.

    Stateful (:meth:`reset`): the buffers ``alpha`` (the last solution, float64) and ``step`` are saved by
    ``state_dict()``, so a resumed run continues exactly.

    On group copies each group G bargains on its own (:meth:`~recon.methods.Method.for_group`: its own ``alpha``
    and ``step``, its update clipped to ``max_norm`` on its own).
    """

    paper: ClassVar[str] = "Navon et al., ICML 2022"

    def __init__(self, *, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        super().__init__()
        check_number("max_norm", max_norm, low=0.0, method="nashmtl")
        check_number("update_weights_every", update_weights_every, low=1, integer=True, method="nashmtl")
        check_number("optim_niter", optim_niter, low=1, integer=True, method="nashmtl")
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self._hparams = {
            "max_norm": max_norm,
            "update_weights_every": update_weights_every,
            "optim_niter": optim_niter,
        }
        self.register_buffer("alpha", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def reset(self) -> None:
        self.alpha = torch.zeros(0, dtype=torch.float64)
        self.step = torch.zeros((), dtype=torch.long)

    def _solve(self, G: np.ndarray, prev: np.ndarray, cold: bool, eps: float) -> np.ndarray | None:
        r"""The weights for the Gram matrix ``G`` (float64), or None to keep ``prev`` (no solution).

        No solution when 0 is in the convex hull of the normalised gradients, numerically: when the squared
        distance m from 0 to that hull is within the Gram matrix's rounding (``thr = n eps``, n live tasks). As
        :math:`\max_i \gamma_i \ge 1 / \sqrt{n m}` at the solution, the hull is only computed (by
        :func:`simplex_qp`) when Newton did not converge or gamma is large.
        """
        K = G.shape[0]
        if K == 2:  # closed form: gamma_1 = gamma_2 = 1 / sqrt(1 + cos(g1, g2)), and m = (1 + cos) / 2
            g11, g12, g22 = float(G[0, 0]), float(G[0, 1]), float(G[1, 1])
            tiny = max(g11, g22) * 1e-24
            if g11 > tiny and g22 > tiny and math.isfinite(g11 + g12 + g22):
                c = max(-1.0, min(1.0, g12 / math.sqrt(g11 * g22)))
                if (1.0 + c) / 2.0 <= max(2 * eps, 1e-12):
                    return None
                k = 1.0 / math.sqrt(1.0 + c)
                return np.array([k / math.sqrt(g11), k / math.sqrt(g22)])
        if not np.isfinite(G).all():
            return None
        diag = np.diag(G)
        live = diag > max(float(diag.max()), 0.0) * 1e-24  # |g_i| > 1e-12 max_j |g_j|: zero gradients drop out
        n = int(live.sum())
        if n == 0:
            return None
        s = np.sqrt(diag[live])
        C = (G if n == K else submatrix(G, np.flatnonzero(live))) / np.outer(s, s)
        thr = max(n * eps, 1e-12)
        if n == 1:
            gamma = np.ones(1)
        elif n == 2:
            c = float(np.clip(C[0, 1], -1.0, 1.0))
            if (1.0 + c) / 2.0 <= thr:
                return None
            gamma = np.full(2, 1.0 / math.sqrt(1.0 + c))
        else:
            x0 = np.ones(n) if cold else prev[live] * s
            if not (np.isfinite(x0).all() and (x0 > 0.0).all()):
                x0 = np.ones(n)
            try:
                gamma, converged = nash_bargaining(C, x0, maxiter=self.optim_niter)
            except np.linalg.LinAlgError:
                return None
            if not (np.isfinite(gamma).all() and (gamma > 0.0).all()):
                return None
            if not converged or float(gamma.max()) ** 2 * n * thr >= 1.0:
                w = simplex_qp(C)
                if float(w @ C @ w) <= thr:
                    return None
            # (not converged but feasible: the last iterate is returned, as torchjd does after optim_niter)
        alpha = prev.copy()
        alpha[live] = gamma / s
        return alpha

    def forward(self, matrix: Tensor, /) -> Tensor:
        K = matrix.shape[0]
        state = self._buffers  # (direct access: this runs every step)
        if state["alpha"].shape != (K,):  # first call, or another number of tasks: start afresh (alpha = ones)
            self.alpha = torch.ones(K, dtype=torch.float64)
            self.step = torch.zeros((), dtype=torch.long)
        elif state["alpha"].device.type != "cpu" or state["alpha"].dtype != torch.float64:
            self.alpha = state["alpha"].to("cpu", torch.float64)  # the solver works on the host
        if state["step"].device.type != "cpu":
            self.step = state["step"].cpu()
        alpha_t, step_t = state["alpha"], state["step"]
        counter = step_t.numpy()  # a view of the buffer (on the host, checked above): cheaper than add_()
        step = int(counter)
        counter[...] = step + 1
        if step % self.update_weights_every != 0:  # reuse the previous weights (clipped on the update itself)
            weights = alpha_t.to(matrix.device, matrix.dtype, copy=True)  # not a view of the state
            update = weights @ matrix
            if self.max_norm > 0:
                scale = (self.max_norm / torch.linalg.vector_norm(update)).clamp_(max=1.0)  # no host sync
                update.mul_(scale)
                weights.mul_(scale)
            self._set_last_weights(weights)
            return update
        G = host_gram(matrix @ matrix.T)
        alpha = alpha_t.numpy()  # shares memory with the buffer
        new = self._solve(G, alpha, step == 0, torch.finfo(matrix.dtype).eps)
        if new is not None:
            alpha[:] = new
        w = alpha
        if self.max_norm > 0:
            norm = math.sqrt(max(float(alpha @ G @ alpha), 0.0))  # |alpha @ J|, from the Gram matrix
            if norm > self.max_norm:
                w = alpha * (self.max_norm / norm)
        weights = weights_like(w, matrix)
        self._set_last_weights(weights)
        return weights @ matrix
