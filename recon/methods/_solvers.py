"""Exact small solvers on the K x K Gram matrix (float64 NumPy, K is the number of tasks).

They replace the iterative or external solvers used elsewhere (Frank-Wolfe for MGDA, SLSQP or cvxpy for
CAGrad, quadprog for UPGrad) with finite active-set methods that reach the optimum to machine precision,
and are fast because every step is a tiny dense linear solve. Those solves call LAPACK through SciPy's thin
wrappers (:func:`solve`, :func:`eigh`) and index with ``take`` (:func:`submatrix`): on K x K matrices NumPy's
``linalg`` and ``np.ix_`` cost 3-6 µs per call in checks and dispatch, several times the arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import lapack

_TINY = 1e-300
_EPS = float(np.finfo(np.float64).eps)


def solve(A: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """``x`` with ``A x = b`` (``b`` a vector or columns) by LU with partial pivoting (LAPACK ``dgesv``, as
    ``np.linalg.solve``); None if ``A`` is exactly singular."""
    _, _, x, info = lapack.dgesv(A, b)
    return x if info == 0 else None


def eigh(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric ``A`` from its lower triangle (LAPACK
    ``dsyevd``, as ``np.linalg.eigh``)."""
    lam, V, info = lapack.dsyevd(A, compute_v=1, lower=1)
    if info != 0:  # pragma: no cover - dsyevd fails only on non-finite input
        return np.linalg.eigh(A)
    return lam, V


def submatrix(A: np.ndarray, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """``A[np.ix_(rows, cols)]`` for integer index arrays (``cols`` defaults to ``rows``), without ``np.ix_``."""
    return A.take(rows, axis=0).take(rows if cols is None else cols, axis=1)


def _solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = solve(A, b)
    return np.linalg.lstsq(A, b, rcond=None)[0] if x is None else x


def simplex_qp(Q: np.ndarray, q: np.ndarray | None = None, *, tol: float = 1e-13) -> np.ndarray:
    r"""Solve :math:`\min_{x \in \Delta} \tfrac12 x^\top Q x + q^\top x` (Q symmetric PSD, :math:`\Delta` the simplex).

    Primal active-set method (Nocedal & Wright, Algorithm 16.3), started at the barycentre. ``Q`` is scaled
    to unit mean diagonal and regularised by ``1e-12`` so that every face problem has a unique solution.
    Finite: at most a few times K iterations in practice.
    """
    K = Q.shape[0]
    if K == 1:
        return np.ones(1)
    scale = max(float(Q.trace()) / K, _TINY)
    # The KKT matrix [[Qn, 1], [1, 0]] of the whole simplex, built once; a face's system is a submatrix of it.
    kkt = np.zeros((K + 1, K + 1))
    Qn = kkt[:K, :K]
    np.divide(Q, scale, out=Qn)
    Qn.flat[:: K + 1] += 1e-12
    kkt[:K, K] = 1.0
    kkt[K, :K] = 1.0
    rhs = np.zeros(K + 1)
    if q is not None:
        rhs[:K] = np.asarray(q, dtype=np.float64) / -scale
    rhs[K] = 1.0
    qn = -rhs[:K]
    x = np.full(K, 1.0 / K)
    free = np.ones(K, dtype=bool)
    for _ in range(20 * K + 20):
        F = np.flatnonzero(free)
        n = F.size
        if n == K:
            sol = _solve(kkt, rhs)
        else:
            rows = np.append(F, K)
            sol = _solve(submatrix(kkt, rows), rhs.take(rows))
        y, lam = sol[:n], -sol[n]
        if y.min() >= 0.0:
            if n == K:  # no bound is active: no multiplier to check
                x = y
                break
            x[:] = 0.0
            x[F] = y
            mu = Qn @ x + qn - lam
            mu[F] = np.inf
            j = int(mu.argmin())
            if mu[j] >= -tol:
                break
            free[j] = True
        else:
            xF = x[F]
            d = y - xF
            neg = d < 0
            ratios = np.full(n, np.inf)
            ratios[neg] = xF[neg] / -d[neg]
            k = int(ratios.argmin())
            t = min(max(ratios[k], 0.0), 1.0)
            x[F] = xF + t * d
            x[F[k]] = 0.0
            free[F[k]] = False
    x = np.maximum(x, 0.0)
    return x / x.sum()


def lower_bounded_qp(Q: np.ndarray, u: np.ndarray, *, tol: float = 1e-13) -> np.ndarray:
    r"""Solve :math:`\min_v \tfrac12 v^\top Q v` subject to :math:`v \succeq u`, for Q symmetric positive definite.

    With :math:`x = v - u` this is the linear complementarity problem :math:`x \ge 0`, :math:`\mu = Q x + Q u \ge
    0`, :math:`x^\top \mu = 0`, solved by block principal pivoting (Judice & Pires 1994) with Murty's single
    pivot as the anti-cycling fallback: exact and finite for a positive definite Q, usually 1-3 linear solves.
    """
    K = Q.shape[0]
    q = Q @ u
    free = q < 0  # start by freeing the bounds whose multiplier is negative at v = u
    if not free.any():  # v = u is optimal (u conflicts with no direction the bounds allow)
        return np.array(u, dtype=np.float64)
    best, budget = K + 1, 3
    x = np.zeros(K)
    for _ in range(10 * K + 10):
        x[:] = 0.0
        F = np.flatnonzero(free)
        if F.size:
            x[F] = _solve(submatrix(Q, F), -q[F])
        mu = Q @ x + q
        bad = (free & (x < -tol)) | (~free & (mu < -tol))
        n_bad = int(bad.sum())
        if n_bad == 0:
            return x + u
        if n_bad < best:
            best, budget = n_bad, 3
            free ^= bad
        elif budget > 0:
            budget -= 1
            free ^= bad
        else:
            j = int(np.flatnonzero(bad)[-1])
            free[j] = not free[j]
    return _active_set_lower_bounded_qp(Q, u, tol=tol)  # pragma: no cover - not reached for PD Q


def _active_set_lower_bounded_qp(Q: np.ndarray, u: np.ndarray, *, tol: float = 1e-13) -> np.ndarray:
    """Primal active-set method for the same problem (slower, kept as a fallback)."""
    K = Q.shape[0]
    v = np.array(u, dtype=np.float64)
    active = np.ones(K, dtype=bool)
    for _ in range(20 * K + 20):
        grad = Q @ v
        mu = np.where(active, grad, np.inf)
        j = int(np.argmin(mu))
        if mu[j] >= -tol:
            break
        active[j] = False
        for _ in range(K + 1):
            F = np.flatnonzero(~active)
            A = np.flatnonzero(active)
            y = u.astype(np.float64).copy()
            rhs = -(submatrix(Q, F, A) @ u[A]) if A.size else np.zeros(F.size)
            y[F] = _solve(submatrix(Q, F), rhs)
            if np.all(y[F] >= u[F]):
                v = y
                break
            d = y[F] - v[F]
            ratios = np.full(F.size, np.inf)
            blocking = (y[F] < u[F]) & (d < 0)
            ratios[blocking] = (u[F][blocking] - v[F][blocking]) / d[blocking]
            k = int(np.argmin(ratios))
            t = min(max(ratios[k], 0.0), 1.0)
            v[F] = v[F] + t * d
            v[F[k]] = u[F[k]]
            active[F[k]] = True
    return v


def cagrad_dual(G: np.ndarray, a: np.ndarray, r: float, *, tol: float = 1e-12) -> np.ndarray:
    r"""Solve CAGrad's dual :math:`\min_{w \in \Delta} a^\top w + r \sqrt{w^\top G w}` (Liu et al. 2021, Eq. 5).

    Exact primal active-set method. On a face F (the free coordinates), the stationarity conditions
    :math:`a_F + r G_{FF} w_F / \|g_w\| = \lambda \mathbf 1`, :math:`\sum w = 1` have a closed form: with
    :math:`z = w / \|g_w\| = G_{FF}^{-1}(\lambda \mathbf 1 - a_F) / r` and :math:`z^\top G_{FF} z = 1`, λ (the
    optimal value) solves a quadratic. From the current feasible point the method moves towards the face
    optimum, stops at the first bound it meets (f is convex, so it decreases along the way), and frees the
    zero coordinate whose KKT multiplier is most negative when the face optimum is feasible. Two tasks: closed
    form. Degenerate faces (the face optimum at :math:`g_w = 0`) fall back to a Newton active-set method.
    Checked against scipy's SLSQP on random, also rank-deficient, problems (tests/test_methods.py).
    ``G`` should be scaled to order one (CAGrad's weights do not depend on the scale of ``G``).
    """
    K = G.shape[0]
    if K == 1:
        return np.ones(1)
    if K == 2:
        t = cagrad_dual_two(float(G[0, 0]), float(G[0, 1]), float(G[1, 1]), float(a[0]), float(a[1]), r)
        return np.array([t, 1.0 - t])
    # A 1e-10 ridge makes every face problem well posed when the gradients are linearly dependent; it moves
    # the objective by less than 1e-9 (G is scaled to unit trace).
    G = G.copy()
    G.flat[:: K + 1] += 1e-10
    w = np.full(K, 1.0 / K)
    free = np.ones(K, dtype=bool)
    for _ in range(20 * K + 20):
        F = np.flatnonzero(free)
        y = _cagrad_face(G, a, r, F)
        if y is None:
            return _cagrad_dual_newton(G, a, r)
        yF = y[F]
        if yF.min() >= 0.0:
            w = y
            Gw = G @ w
            n = math.sqrt(max(float(w @ Gw), 0.0))
            if n <= 1e-15:
                return _cagrad_dual_newton(G, a, r)
            if F.size == K:  # no bound is active: no multiplier to check
                return w
            grad = a + r * Gw / n
            lam = float(w @ grad)
            mu = np.where(free, np.inf, grad - lam)
            j = int(np.argmin(mu))
            if mu[j] >= -tol:
                return w
            free[j] = True
        else:
            d = yF - w[F]
            neg = d < 0
            ratios = np.where(neg, w[F] / np.where(neg, -d, 1.0), np.inf)
            k = int(np.argmin(ratios))
            t = min(max(float(ratios[k]), 0.0), 1.0)
            w[F] = np.clip(w[F] + t * d, 0.0, None)
            w[F[k]] = 0.0
            w /= w.sum()
            free[F[k]] = False
    return _cagrad_dual_newton(G, a, r)  # pragma: no cover - the active set converges long before


def _cagrad_face(G: np.ndarray, a: np.ndarray, r: float, F: np.ndarray) -> np.ndarray | None:
    """The minimiser of the dual over the affine hull of face F (zeros elsewhere), or None if degenerate."""
    m = F.size
    GF = G if m == G.shape[0] else submatrix(G, F)
    GF = GF + 0.0  # a copy, regularised below
    GF.flat[:: m + 1] += 1e-12
    aF = a.take(F)
    rhs = np.empty((m, 2))
    rhs[:, 0] = 1.0
    rhs[:, 1] = aF
    sol = solve(GF, rhs)
    if sol is None:
        return None
    p, s = sol[:, 0], sol[:, 1]
    A2, B2, C2 = p.sum(), s.sum(), float(aF @ s) - r * r
    disc = B2 * B2 - A2 * C2
    if not math.isfinite(disc) or disc < 0.0 or A2 <= 0.0:
        return None
    best, best_value = None, math.inf
    root = math.sqrt(disc)
    for lam in ((B2 - root) / A2, (B2 + root) / A2):
        z = (lam * p - s) / r  # w / |g_w| on the face, with z^T G_FF z = 1
        sz = float(z.sum())
        if not sz > 0.0:
            continue
        value = (float(aF @ z) + r) / sz  # a^T w + r |g_w| at w = z / sz, where |g_w| = 1 / sz
        if value < best_value:
            best, best_value = z / sz, value
    if best is None:
        return None
    y = np.zeros(G.shape[0])
    y[F] = best
    return y


def _cagrad_dual_newton(G: np.ndarray, a: np.ndarray, r: float, *, tol: float = 1e-10) -> np.ndarray:
    """Newton's method on the faces of the simplex for the CAGrad dual (robust to degenerate faces)."""
    K = G.shape[0]

    def value(w: np.ndarray) -> float:
        return float(a @ w + r * np.sqrt(max(w @ G @ w, 0.0) + 1e-30))

    w = np.full(K, 1.0 / K)
    free = np.ones(K, dtype=bool)
    f = value(w)
    for _ in range(50 * K):
        Gw = G @ w
        n = np.sqrt(max(w @ Gw, 0.0) + 1e-30)
        grad = a + r * Gw / n
        F = np.flatnonzero(free)
        gF = grad[F]
        lam = gF.mean()
        pg = gF - lam
        face_optimal = bool(np.max(np.abs(pg)) <= tol)
        if not face_optimal:
            m = F.size
            A = np.zeros((m + 1, m + 1))
            A[:m, :m] = r * (submatrix(G, F) / n - np.outer(Gw[F], Gw[F]) / n**3) + 1e-12 * np.eye(m)
            A[:m, m] = 1.0
            A[m, :m] = 1.0
            b = np.zeros(m + 1)
            b[:m] = -gF
            d = _solve(A, b)[:m]
            slope = float(gF @ d)
            if not np.isfinite(slope) or slope >= 0.0:
                d = -pg  # Newton direction unusable: projected gradient
                slope = -float(pg @ pg)
            face_optimal = -slope <= 1e-24
        if not face_optimal:
            wF = w[F]
            neg = d < 0
            ratios = np.where(neg, wF / np.where(neg, -d, 1.0), np.inf)
            k = int(np.argmin(ratios))
            tmax = float(ratios[k])
            t = min(1.0, tmax)
            while True:
                w_new = w.copy()
                w_new[F] = np.clip(wF + t * d, 0.0, None)
                f_new = value(w_new)
                if f_new <= f + 1e-4 * t * slope:
                    break
                t *= 0.5
                if t < 1e-12:
                    break
            if t < 1e-12:
                face_optimal = True  # no decrease left on this face, up to rounding
            else:
                if t == tmax:
                    w_new[F[k]] = 0.0
                    free[F[k]] = False
                w = w_new / w_new.sum()
                f = value(w)
                continue
        mu = np.where(free, np.inf, grad - lam)
        j = int(np.argmin(mu))
        if mu[j] >= -tol:
            break
        free[j] = True
    return w


def cagrad_dual_two(g11: float, g12: float, g22: float, a1: float, a2: float, r: float) -> float:
    """Two tasks, ``w = (t, 1 - t)``: ``f(t) = a_2 + t delta + r sqrt(A (t - t0)^2 + m)``, convex in t; returns t.

    Plain floats (this runs at every step of a two-task model: NumPy's per-call cost would dominate).
    """
    delta = a1 - a2
    A = g11 + g22 - 2.0 * g12  # |g1 - g2|^2
    if A <= 1e-15 * max(g11, g22, 1e-300):
        return 0.5 if abs(delta) <= 1e-15 else (0.0 if delta > 0 else 1.0)
    t0 = (g22 - g12) / A  # closest point of the line through g1, g2 to the origin
    m = max(g22 - A * t0 * t0, 0.0)  # its squared distance
    k = r * r * A - delta * delta
    if k <= 0.0:  # the slope never vanishes: f is monotone in t
        t = 0.0 if delta > 0 else 1.0
    else:
        t = t0 - delta * math.sqrt(m / (A * k))
    return min(max(t, 0.0), 1.0)


def nash_bargaining(C: np.ndarray, x0: np.ndarray, *, maxiter: int = 20, tol: float = 1e-10) -> tuple[np.ndarray, bool]:
    r"""Solve :math:`C x = 1 / x`, :math:`x \succ 0`: the Nash bargaining weights (Navon et al. 2022, Eq. 4).

    ``C`` is symmetric positive semi-definite (for Nash-MTL, the cosine matrix of the task gradients, unit
    diagonal). The solution is the minimiser of the strictly convex, self-concordant
    :math:`\phi(x) = \tfrac12 x^\top C x - \sum_i \log x_i` (gradient :math:`Cx - 1/x`), which exists, and is then
    unique even for a singular ``C``, iff no :math:`v \succeq 0, v \ne 0` has :math:`Cv = 0`, i.e. (Gordan) iff
    some direction :math:`d` has :math:`g_i^\top d > 0` for every task.

    Damped Newton from ``x0`` (first rescaled by the exact minimiser of :math:`\phi` along it), on the scaled
    system :math:`(D C D + I) y = -\rho` with :math:`D = \mathrm{diag}(x)`, :math:`\rho = x \circ Cx - 1`, and
    the step :math:`x \leftarrow x \circ (1 + t y)`. The Newton decrement is :math:`\lambda^2 = -\rho^\top y` and
    :math:`|y_i| \le \lambda`: for :math:`\lambda^2 < 0.1` the full step (quadratic convergence region) keeps
    :math:`x \succ 0`; otherwise an Armijo backtracking on :math:`\phi` starts from the largest step keeping
    every :math:`x_i` above 1/100 of its value. Returns ``(x, converged)``, converged when
    :math:`\max_i |x_i (Cx)_i - 1| \le` ``tol`` (or its rounding error, if larger) after at most ``maxiter``
    Newton steps; an infeasible problem never converges (its iterates grow without bound).
    """
    K = C.shape[0]
    x = np.array(x0, dtype=np.float64)
    q = float(x @ C @ x)
    if q > 0.0:
        x *= np.sqrt(K / q)  # argmin_s phi(s x) = sqrt(K / x^T C x)
    eye = np.eye(K)
    for it in range(maxiter + 1):
        Cx = C @ x
        rho = x * Cx
        rho -= 1.0
        err = float(np.abs(rho).max())
        if err <= tol:
            return x, True
        if err <= 1e-3 and err <= tol + 64 * _EPS * float((x * (np.abs(C) @ x)).max()):
            return x, True  # converged to the rounding error of x * Cx (ill-conditioned, e.g. nearly infeasible)
        if it == maxiter or err != err:
            break
        A = C * x
        A *= x[:, None]
        A += eye
        y = solve(A, rho)  # minus the scaled Newton step
        if y is None:  # pragma: no cover - A = D C D + I is positive definite
            raise np.linalg.LinAlgError("singular Newton system")
        lam2 = float(rho @ y)
        if not lam2 > 0.0:  # rounding has taken over (a huge x, as when there is no solution)
            break
        ymax = float(y.max())
        if lam2 < 0.1 and ymax < 0.99:
            x = x - x * y
            continue
        t = 1.0 if ymax <= 0.99 else 0.99 / ymax
        phi = 0.5 * float(x @ Cx) - float(np.log(x).sum())
        for _ in range(60):
            xn = x - (t * x) * y
            if 0.5 * float(xn @ C @ xn) - float(np.log(xn).sum()) <= phi - 0.25 * t * lam2:
                break
            t *= 0.5
        x = xn
    return x, False
