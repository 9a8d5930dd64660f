"""recon.methods against independent oracles: torchjd, scipy, hand-derived cases, the papers' properties."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import nn

import recon.methods as M
from recon._errors import ReconError

ta = pytest.importorskip("torchjd.aggregation")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def random_jacobian(K: int, P: int = 40, seed: int = 0, common: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, P, generator=g) + common * torch.randn(1, P, generator=g)).double()


CASES = [(K, seed) for K in (2, 3, 5, 8) for seed in range(2)]


# --- against torchjd (same conventions) -----------------------------------------------------------------------
@pytest.mark.parametrize("K,seed", CASES)
def test_deterministic_methods_match_torchjd(K, seed):
    J = random_jacobian(K, seed=seed)
    pairs = {
        "mean": ta.Mean(),
        "sum": ta.Sum(),
        "imtl_g": ta.IMTLG(),
        "upgrad": ta.UPGrad(),
        "aligned_mtl": ta.AlignedMTL(),
        "aligned_mtl:scale_mode=median": ta.AlignedMTL(scale_mode="median"),
        "aligned_mtl:scale_mode=rmse": ta.AlignedMTL(scale_mode="rmse"),
    }
    for name, oracle in pairs.items():
        assert rel(M.get(name)(J), oracle(J)) < 1e-9, name


@pytest.mark.parametrize("K,seed", CASES)
def test_random_order_methods_match_torchjd_with_the_same_seed(K, seed):
    J = random_jacobian(K, seed=seed)
    for name, oracle in (("pcgrad", ta.PCGrad()), ("graddrop", ta.GradDrop())):
        torch.manual_seed(123)
        ours = M.get(name)(J)
        torch.manual_seed(123)
        theirs = oracle(J)
        assert rel(ours, theirs) < 1e-12, name


@pytest.mark.parametrize("K", [2, 3, 4])
def test_gradvac_matches_torchjd_over_several_steps(K):
    ours, theirs = M.get("gradvac"), ta.GradVac()
    for step in range(4):
        J = random_jacobian(K, seed=step, common=0.1)
        torch.manual_seed(step)
        a = ours(J)
        torch.manual_seed(step)
        b = theirs(J)
        assert rel(a, b) < 1e-10
    assert ours.phi.shape == (K, K) and ours.phi.abs().sum() > 0
    ours.reset()
    assert ours.phi.numel() == 0


def test_gradvac_state_dict_resumes_exactly():
    a = M.get("gradvac")
    a(random_jacobian(3, seed=0))
    b = M.get("gradvac")
    b.load_state_dict(a.state_dict())
    J = random_jacobian(3, seed=1)
    torch.manual_seed(5)
    x = a(J)
    torch.manual_seed(5)
    assert torch.equal(x, b(J))


@pytest.mark.parametrize("K,seed", CASES)
def test_cagrad_matches_torchjd_without_rescale_and_scaled_with_it(K, seed):
    pytest.importorskip("cvxpy")
    J = random_jacobian(K, seed=seed)
    theirs = ta.CAGrad(c=0.4)(J)
    assert rel(M.get("cagrad", rescale=0)(J), theirs) < 5e-4  # torchjd solves with cvxpy/Clarabel
    assert rel(M.get("cagrad")(J), theirs / (1 + 0.4**2)) < 5e-4
    assert rel(M.get("cagrad", rescale=2)(J), theirs / 1.4) < 5e-4


# --- Nash-MTL (Navon et al. 2022): weights alpha > 0 with G alpha = 1 / alpha, G = J J^T ------------------------
def nash_residual(J: torch.Tensor, alpha: torch.Tensor) -> float:
    """max_i |(G alpha)_i - 1/alpha_i| / (1/alpha_i): the defining equation, relative (float64)."""
    J, alpha = J.double(), alpha.double()
    return float((alpha * (J @ (J.T @ alpha)) - 1.0).abs().max())


@pytest.mark.parametrize("K", range(2, 9))
def test_nashmtl_solves_the_bargaining_equation(K):
    m = M.get("nashmtl", max_norm=0.0)
    for step in range(3):  # a cold start, then warm starts from the previous solution
        J = random_jacobian(K, P=3 * K, seed=10 * K + step, common=0.5 * step)
        d = m(J)
        alpha = m.last_weights
        assert bool((alpha > 0).all()) and nash_residual(J, alpha) < 1e-6
        assert rel(d, alpha @ J) < 1e-12
        # g_i^T d = 1 / alpha_i, so ||d||^2 = alpha^T G alpha = K (unclipped)
        assert float(d.norm()) == pytest.approx(K**0.5, rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*DPP.*")
@pytest.mark.parametrize("max_norm,every", [(0.0, 1), (1.0, 1), (1.0, 2)])
@pytest.mark.parametrize("K", [2, 3, 5, 8])
def test_nashmtl_agrees_with_torchjd_over_consecutive_steps(K, max_norm, every):
    pytest.importorskip("cvxpy")
    ours = M.get("nashmtl", max_norm=max_norm, update_weights_every=every)
    theirs = ta.NashMTL(n_tasks=K, max_norm=max_norm, update_weights_every=every)
    for step in range(4):  # torchjd stops its cvxpy iterations at |G a - 1/a| < 1e-3 (G normalised)
        J = random_jacobian(K, seed=100 + step, common=0.5) * (3.0 if step % 2 else 0.2)
        a, b = ours(J), theirs(J)
        assert float(a @ b / (a.norm() * b.norm())) > 0.999 and rel(a, b) < 1e-2
        assert rel(ours.alpha, torch.as_tensor(theirs.weighting.prvs_alpha, dtype=torch.float64)) < 1e-2


def test_nashmtl_two_tasks_hand_derived():
    # g1, g2 with norms n1, n2 and cosine c > -1: G = [[n1^2, c n1 n2], [c n1 n2, n2^2]]. With alpha_i = k / n_i,
    # (G alpha)_1 = k n1 (1 + c) must equal 1 / alpha_1 = n1 / k, so k^2 = 1 / (1 + c) (for either i); the
    # solution is unique, hence alpha_i = 1 / (n_i sqrt(1 + c)) and d = (u1 + u2) / sqrt(1 + c), u_i = g_i / n_i:
    # the bisector, of norm sqrt(2). Orthogonal gradients: alpha_i = 1 / n_i, d = u1 + u2.
    n1, n2 = 3.0, 0.5
    for c in (0.0, 0.6, -0.8):
        u1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        u2 = torch.tensor([c, (1 - c * c) ** 0.5, 0.0], dtype=torch.float64)
        J = torch.stack([n1 * u1, n2 * u2])
        m = M.get("nashmtl", max_norm=0.0)
        d = m(J)
        k = 1.0 / (1.0 + c) ** 0.5
        assert torch.allclose(m.last_weights, torch.tensor([k / n1, k / n2], dtype=torch.float64), rtol=1e-12)
        assert torch.allclose(d, k * (u1 + u2), rtol=1e-12, atol=1e-15)
        clipped = M.get("nashmtl")(J)  # max_norm = 1: the same direction, of norm 1
        assert torch.allclose(clipped, d / 2**0.5, rtol=1e-12, atol=1e-15)


def test_nashmtl_three_tasks_hand_derived_from_a_warm_start():
    # three unit gradients with equal pairwise cosine c > -1/2 (here conflicting): by symmetry and uniqueness
    # alpha_i = a with a^2 (1 + 2c) = 1; scaled by norms n_i: alpha_i = 1 / (n_i sqrt(1 + 2c)).
    c, n = -0.4, torch.tensor([2.0, 0.1, 7.0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.full((3, 3), c, dtype=torch.float64) + (1 - c) * torch.eye(3, dtype=torch.float64))
    J = torch.cat([U, torch.zeros(3, 2, dtype=torch.float64)], dim=1) * n[:, None]
    m = M.get("nashmtl", max_norm=0.0)
    m(random_jacobian(3, seed=7))  # so that Newton starts away from the solution
    m(J)
    assert torch.allclose(m.last_weights, 1.0 / (n * (1 + 2 * c) ** 0.5), rtol=1e-9)


def test_nashmtl_norm_clipping_and_weight_reuse():
    J0, J1, J2, J3 = (random_jacobian(3, seed=s, common=0.5) for s in range(4))
    free = M.get("nashmtl", max_norm=0.0)
    d0 = free(J0)  # norm sqrt(3)
    m = M.get("nashmtl", max_norm=1.0)
    assert torch.allclose(m(J0), d0 / 3**0.5, rtol=1e-10)
    assert torch.allclose(m.last_weights, free.last_weights / 3**0.5, rtol=1e-10)
    assert rel(M.get("nashmtl", max_norm=2.0)(J0), d0) < 1e-12  # sqrt(3) < 2: not clipped

    reuse = M.get("nashmtl", max_norm=0.0, update_weights_every=3)
    alpha0 = free.last_weights.clone()
    assert rel(reuse(J0), d0) < 1e-12
    for J in (J1, J2):  # steps 1 and 2 reuse the weights of step 0
        assert rel(reuse(J), alpha0 @ J) < 1e-12 and torch.equal(reuse.last_weights, alpha0)
    reuse(J3)  # step 3 solves again
    assert nash_residual(J3, reuse.last_weights) < 1e-6
    assert int(reuse.step) == 4

    clip = M.get("nashmtl", max_norm=1.0, update_weights_every=2)
    clip(J0)
    big = 10.0 * J1  # reused weights on larger gradients: the update is clipped to norm 1
    d = clip(big)
    unclipped = free.last_weights @ big
    assert float(d.norm()) == pytest.approx(1.0, rel=1e-10) and rel(d, unclipped / unclipped.norm()) < 1e-12
    assert rel(clip.last_weights @ big, d) < 1e-12
    assert torch.equal(clip.alpha, free.last_weights)  # the state keeps the unclipped weights, as torchjd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nashmtl_degenerate_cases(dtype):
    g = torch.Generator().manual_seed(3)
    g1, g2, g3 = torch.randn(3, 10, generator=g, dtype=torch.float64)
    zero = torch.zeros(10, dtype=torch.float64)

    # linearly dependent gradients: singular G, the solution is still unique (alpha_i = 1 / g_i^T d)
    for J in (torch.stack([g1, g2, g1 + g2]), torch.stack([g1, g2, 2 * g1]), torch.stack([g1, g2, g3, g1 - g3])):
        m = M.get("nashmtl", max_norm=0.0)
        d = m(J.to(dtype))
        assert bool(torch.isfinite(d).all()) and nash_residual(J, m.last_weights) < (
            1e-6 if dtype == torch.float64 else 1e-4
        )

    # a zero gradient has no say: the others bargain among themselves, its weight keeps its previous value (1)
    m, ref = M.get("nashmtl", max_norm=0.0), M.get("nashmtl", max_norm=0.0)
    d = m(torch.stack([g1, zero, g2]).to(dtype))
    assert rel(d, ref(torch.stack([g1, g2]).to(dtype))) < 1e-6
    assert torch.allclose(m.last_weights[[0, 2]], ref.last_weights) and float(m.last_weights[1]) == 1.0
    assert torch.equal(M.get("nashmtl")(torch.zeros(3, 10, dtype=dtype)), torch.zeros(10, dtype=dtype))

    # no direction improves every task (0 in the convex hull): no solution, the previous weights are kept
    for J in (
        torch.stack([g1, -g1]),
        torch.stack([g1, -3 * g1]),
        torch.stack([g1, -g1, g2]),
        torch.stack([g1, g2, -(g1 + g2)]),
        torch.stack([g1, 0.3 * g2, -(0.7 * g1 + g2)]),
    ):
        K = J.shape[0]
        m = M.get("nashmtl", max_norm=0.0)
        assert torch.equal(m(J.to(dtype)), torch.ones(K, dtype=dtype) @ J.to(dtype))  # initial weights: ones
        m(random_jacobian(K, seed=K, common=1.0).to(dtype))
        before = m.last_weights.clone()
        d = m(J.to(dtype))
        assert bool(torch.isfinite(d).all()) and torch.equal(m.last_weights, before)


def test_nashmtl_state_dict_resumes_exactly():
    mats = [random_jacobian(4, seed=s, common=0.5) for s in range(6)]
    a = M.get("nashmtl", update_weights_every=2)
    for J in mats[:3]:
        a(J)
    assert set(a.state_dict()) == {"alpha", "step"} and int(a.state_dict()["step"]) == 3
    b = M.get("nashmtl", update_weights_every=2)  # fresh: its empty state takes the saved shape
    b.load_state_dict(a.state_dict())
    for J in mats[3:]:
        assert torch.equal(a(J), b(J))
    a.reset()
    assert a.alpha.numel() == 0 and int(a.step) == 0


def test_nashmtl_needs_no_solver(monkeypatch):
    for name in ("cvxpy", "ecos", "torchjd"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them would now fail
    J = random_jacobian(5)
    m = M.get("nashmtl", max_norm=0.0)
    m(J)
    assert nash_residual(J, m.last_weights) < 1e-6


# --- against scipy ------------------------------------------------------------------------------------------
def slsqp_cagrad(J: torch.Tensor, c: float) -> torch.Tensor:
    """The official CAGrad code (Cranial-XIX/CAGrad, rescale=1): SLSQP on the dual, tight tolerance."""
    K = J.shape[0]
    GG = (J @ J.T).numpy()
    g0_norm = np.sqrt(GG.mean() + 1e-8)
    b = np.ones(K) / K
    cc = c * g0_norm + 1e-8

    def obj(x):
        return x @ GG @ b + cc * np.sqrt(x @ GG @ x + 1e-8)

    res = minimize(
        obj,
        b,
        bounds=[(0, 1)] * K,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    w = torch.tensor(res.x)
    gw = w @ J
    return (J.mean(0) + cc / (gw.norm() + 1e-8) * gw) / (1 + c**2)


@pytest.mark.parametrize("K,seed", CASES + [(16, 0)])
@pytest.mark.parametrize("c", [0.2, 0.4, 0.9])
def test_cagrad_equals_the_scipy_slsqp_solution_of_its_dual(K, seed, c):
    J = random_jacobian(K, seed=seed)
    assert rel(M.get("cagrad", c=c)(J), slsqp_cagrad(J, c)) < 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_with_linearly_dependent_gradients(seed):
    J = random_jacobian(8, 3, seed=seed, common=0.5)  # 8 gradients in a 3-dimensional space
    assert rel(M.get("cagrad")(J), slsqp_cagrad(J, 0.4)) < 1e-4


def slsqp_min_norm(J: torch.Tensor) -> torch.Tensor:
    K = J.shape[0]
    G = (J @ J.T).numpy()
    res = minimize(
        lambda x: x @ G @ x,
        np.ones(K) / K,
        jac=lambda x: 2 * G @ x,
        bounds=[(0, 1)] * K,
        constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return torch.tensor(res.x) @ J


@settings(max_examples=25, deadline=None)
@given(K=st.integers(2, 8), P=st.integers(2, 30), seed=st.integers(0, 10_000), common=st.floats(-1, 1))
def test_mgda_is_the_min_norm_point_of_the_convex_hull(K, P, seed, common):
    J = random_jacobian(K, P, seed, common)
    d = M.get("mgda")(J)
    oracle = slsqp_min_norm(J)
    assert float(d.norm()) <= float(oracle.norm()) * (1 + 1e-6) + 1e-9
    assert float((d - oracle).norm()) <= 1e-4 * max(1.0, float(J.norm()))
    # optimality: no vertex improves the min-norm point, <d, g_k> >= |d|^2 for all k
    assert float((J @ d).min()) >= float(d @ d) - 1e-8 * float(J.norm()) ** 2


# --- hand-derived two-task cases ----------------------------------------------------------------------------
def T(*rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graddrop_follows_the_sign_purity_definition(dtype):
    """Chen et al. 2020, Eq. (1)-(3), checked coordinate by coordinate on hand-built columns."""
    J = torch.tensor(
        [
            [1.0, -2.0, 3.0, 0.0, 0.5, -1.0],
            [2.0, -1.0, -1.0, 0.0, 0.5, 3.0],
            [0.5, -0.5, -2.0, 0.0, -0.5, 0.0],
        ],
        dtype=dtype,
    )
    positive, negative = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
    for seed in range(20):
        torch.manual_seed(seed)
        d = M.get("graddrop")(J)
        assert d[0] == positive[0] and d[1] == negative[1]  # every sign agrees: P = 1 or 0, nothing is dropped
        assert d[3] == 0  # all gradients zero (P undefined): zero
        for i in (2, 4, 5):  # mixed signs: the sum of one sign's gradients
            assert torch.isclose(d[i], positive[i]) or torch.isclose(d[i], negative[i])


def test_graddrop_keeps_the_positive_sign_with_probability_p():
    # column i: g = (a_i, -1) so P_i = (1 + (a_i - 1) / (a_i + 1)) / 2 = a_i / (a_i + 1)
    a = torch.tensor([0.25, 1.0, 3.0, 9.0], dtype=torch.float64)
    n = 4000
    J = torch.stack([a, -torch.ones_like(a)]).repeat(1, n)  # n copies of every column
    torch.manual_seed(0)
    kept_positive = (M.get("graddrop")(J).view(n, 4) > 0).double().mean(0)
    expected = a / (a + 1)
    # binomial standard error <= sqrt(0.25 / 4000) = 0.008: 4.5 sigma
    assert torch.allclose(kept_positive, expected, atol=0.036), (kept_positive, expected)


def test_mgda_two_task_closed_forms():
    assert torch.allclose(M.get("mgda")(T([1.0, 0.0], [0.0, 1.0])), T(0.5, 0.5))
    # |(2a, 1-a)|^2 minimal at a = 1/5
    assert torch.allclose(M.get("mgda")(T([2.0, 0.0], [0.0, 1.0])), T(0.4, 0.8))
    assert torch.allclose(M.get("mgda")(T([1.0, 0.0], [-1.0, 0.0])), T(0.0, 0.0))
    # one gradient inside the other's direction: the shorter one
    assert torch.allclose(M.get("mgda")(T([1.0, 0.0], [3.0, 0.0])), T(1.0, 0.0))


def test_pcgrad_two_task_hand_derived():
    # g1.g2 = -1: g1' = g1 + g2/2 = (.5, .5); g2' = g2 + g1 = (0, 1)
    assert torch.allclose(M.get("pcgrad")(T([1.0, 0.0], [-1.0, 1.0])), T(0.5, 1.5))
    # orthogonal: untouched
    assert torch.allclose(M.get("pcgrad")(T([1.0, 0.0], [0.0, 2.0])), T(1.0, 2.0))


def test_pcgrad_leaves_non_conflicting_gradients_untouched():
    J = torch.rand(5, 30, dtype=torch.float64)  # all dot products > 0
    torch.manual_seed(0)
    assert torch.allclose(M.get("pcgrad")(J), J.sum(0))
    # task 3 conflicts with nobody and nobody's projection involves it: its row stays g_3
    J = T([1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    torch.manual_seed(0)
    assert torch.allclose(M.get("pcgrad")(J), T(0.5, 1.5, 1.0))


def test_gradops_two_task_hand_derived():
    # g1' = g1 - proj_g2(g1) = (1,0) - (1,1)/2; g2' = g2 - proj_g1(g2) = (0,1)
    assert torch.allclose(M.get("gradops")(T([1.0, 0.0], [1.0, 1.0])), T(0.5, 0.5))
    # a gradient inside the span of the others projects to zero
    assert torch.allclose(M.get("gradops")(T([1.0, 0.0], [2.0, 0.0], [0.0, 1.0])), T(0.0, 1.0))


def test_gradops_equals_explicit_least_squares_projections():
    J = random_jacobian(5, 20, seed=3)
    expected = torch.zeros(20, dtype=torch.float64)
    for i in range(5):
        others = torch.cat([J[:i], J[i + 1 :]])
        coef = torch.linalg.lstsq(others.T, J[i]).solution
        expected += J[i] - others.T @ coef
    assert rel(M.get("gradops")(J), expected) < 1e-9


@settings(max_examples=40, deadline=None)
@given(K=st.integers(2, 8), P=st.integers(2, 40), seed=st.integers(0, 10_000), common=st.floats(-2, 2))
def test_gradops_update_conflicts_with_no_task(K, P, seed, common):
    J = random_jacobian(K, P, seed, common).float()
    d = M.get("gradops")(J)
    tol = 1e-4 * float(J.norm()) ** 2
    assert float((J @ d).min()) >= -tol


def test_imtl_g_equal_projections_and_cagrad_c0_is_the_mean():
    J = random_jacobian(3, seed=7)
    d = M.get("imtl_g")(J)
    proj = (J / J.norm(dim=1, keepdim=True)) @ d
    assert torch.allclose(proj, proj[0].expand(3), rtol=1e-9)
    assert rel(M.get("cagrad", c=0.0)(J), J.mean(0)) < 1e-12


def test_upgrad_on_non_conflicting_gradients_is_the_mean():
    J = torch.rand(4, 10, dtype=torch.float64)
    assert rel(M.get("upgrad")(J), ta.UPGrad()(J)) < 1e-9
    d = M.get("upgrad")(T([1.0, 0.0], [-1.0, 1.0]))
    assert float(T([1.0, 0.0], [-1.0, 1.0]).matmul(d).min()) >= -1e-9  # in the dual cone


@pytest.mark.parametrize("K", [2, 4])
def test_weights_from_a_gram_matrix(K):
    J = random_jacobian(K, seed=1)
    G = J @ J.T
    for name in ("mgda", "cagrad", "imtl_g", "upgrad", "aligned_mtl", "gradops"):
        m = M.get(name)
        w = m.weights(G)
        assert rel(w @ J, M.get(name)(J)) < 1e-9, name


TWO_TASK_GRAMS = {
    "random": None,
    "opposite": ((1.0, -1.0), (-1.0, 1.0)),
    "orthogonal": ((4.0, 0.0), (0.0, 1e-3)),
    "nearly parallel": ((1.0, 1.0 - 1e-6), (1.0 - 1e-6, 1.0 + 1e-6)),
    "conflicting, norms 1:1000": ((1.0, -300.0), (-300.0, 1e6)),
    "conflicting, norms 1:10": ((1.0, -3.0), (-3.0, 100.0)),
    "aligned": ((2.0, 1.5), (1.5, 3.0)),
    "one zero gradient": ((0.0, 0.0), (0.0, 2.0)),
}


@pytest.mark.parametrize("case", list(TWO_TASK_GRAMS))
@pytest.mark.parametrize("name", ["mgda", "pcgrad", "cagrad", "gradops", "imtl_g", "aligned_mtl", "upgrad"])
def test_two_task_closed_forms_equal_the_general_solvers(name, case):
    """The plain-float two-task paths against the general K-task path (active sets, eigendecompositions)."""
    rows = TWO_TASK_GRAMS[case]
    if rows is None:
        J = random_jacobian(2, seed=7)
        G = (J @ J.T).numpy()
    else:
        G = np.array(rows)
    m = M.get(name)
    torch.manual_seed(0)
    fast = m._two_tasks(float(G[0, 0]), float(G[0, 1]), float(G[1, 1]), 1e-7)
    next_draw_fast = torch.rand(1)
    if fast is None:  # ill-conditioned: IMTL-G and Aligned-MTL defer to the general path by design
        lam = np.linalg.eigvalsh(G)
        assert name in ("imtl_g", "aligned_mtl") and lam[0] <= 2e3 * 1e-7 * lam[-1]
        return
    torch.manual_seed(0)
    general = m._weights(G, 1e-7)
    # (1e-6: the general solvers regularise by 1e-12, which shows when |g1 - g2|^2 is 3e-6 of the trace)
    np.testing.assert_allclose(fast, general, rtol=1e-6, atol=1e-12, err_msg=f"{name}, {case}")
    assert torch.equal(next_draw_fast, torch.rand(1))  # both drew the same from the RNG (PCGrad's order)


# --- loss weighting and representation methods --------------------------------------------------------------
def test_uncertainty_weighting_follows_kendall_eq7():
    m = M.get("uncertainty").bind(["a", "b"])
    with torch.no_grad():
        m.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = torch.tensor([2.0, 3.0], requires_grad=True)
    total, w = m.combine(losses)
    s = torch.tensor([0.5, -1.0])
    assert torch.allclose(w, 0.5 * torch.exp(-s))
    assert float(total.detach()) == pytest.approx(float((0.5 * torch.exp(-s) * losses.detach() + 0.5 * s).sum()))
    total.backward()
    assert torch.allclose(m.log_vars.grad, -0.5 * torch.exp(-s) * losses.detach() + 0.5)
    assert [p is m.log_vars for p in m.parameters()] == [True]


def test_binding_to_another_number_of_tasks_starts_afresh():
    m = M.get("dwa").bind(["a", "b"])
    m.end_epoch([1.0, 2.0])
    assert m.bind(["x", "y"]) is m and int(m.epochs) == 1  # same number of tasks: state kept
    m.bind(["only"])
    assert m.history.shape == (2, 1) and int(m.epochs) == 0
    u = M.get("uncertainty").bind(3)
    first = u.log_vars
    u.bind(1)
    assert u.log_vars is not first and u.log_vars.shape == (1,)


def test_learnable_methods_must_be_bound_first():
    with pytest.raises(ReconError, match="bind"):
        M.get("uncertainty")(torch.ones(2))
    assert M.get("gradnorm", n_tasks=3).weights.shape == (3,)


def test_dwa_follows_mtan_eq7_and_keeps_state_in_the_state_dict():
    m = M.get("dwa").bind(["a", "b", "c"])
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(m(losses), torch.ones(3))
    m.end_epoch({"a": 1.0, "b": 2.0, "c": 4.0})
    assert torch.equal(m(losses), torch.ones(3))
    m.end_epoch([0.5, 2.0, 2.0])
    r = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    expected = 3 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    assert torch.allclose(m(losses).double(), expected, atol=1e-6)
    clone = M.get("dwa")
    clone.load_state_dict(m.state_dict())
    assert torch.allclose(clone(losses), m(losses))
    # without arguments: the mean of the losses seen since the last epoch end
    n = M.get("dwa").bind(2)
    for v in ([1.0, 4.0], [3.0, 2.0]):
        n(torch.tensor(v))
    n.end_epoch()
    assert torch.allclose(n.history[1], torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_gradnorm_weight_gradient_is_the_papers_lgrad_gradient():
    K = 3
    m = M.get("gradnorm", alpha=1.5).bind(K)
    grads = torch.randn(K, 7, dtype=torch.float32)
    L0 = torch.tensor([1.0, 2.0, 3.0])
    m(L0, grads)  # first call records L(0)
    m.weights.grad = None
    with torch.no_grad():
        m.weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
    L = torch.tensor([0.5, 1.5, 2.5])
    w_used = m(L, grads)
    # oracle: autograd on the paper's L_grad with the target detached
    w = torch.tensor([0.5, 1.0, 1.5], requires_grad=True)
    G = w * grads.norm(dim=1)
    r = (L / L0) / (L / L0).mean()
    target = (G.mean() * r**1.5).detach()
    (G - target).abs().sum().backward()
    assert torch.allclose(m.weights.grad, w.grad)
    assert torch.allclose(w_used, torch.tensor([0.5, 1.0, 1.5]))  # already sum to K


def test_mgda_ub_weights_are_mgda_on_the_feature_gradients():
    R = random_jacobian(3, 12, seed=2).float()
    w = M.get("mgda_ub")(torch.ones(3), R)
    assert rel((w.double() @ R.double()), M.get("mgda")(R.double())) < 1e-5
    wl = M.get("mgda_ub", normalization="l2")(torch.ones(3), R)
    Rn = R / R.norm(dim=1, keepdim=True)
    assert rel(wl.double() @ Rn.double(), M.get("mgda")(Rn.double())) < 1e-5


# --- RotoGrad ------------------------------------------------------------------------------------------------
def test_rotograd_rotations_train_and_backbone_gets_the_homogenised_gradient():
    torch.manual_seed(0)
    backbone = nn.Linear(5, 4)
    heads = {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)}
    net = M.RotoGrad(backbone, heads, latent_size=4)
    x = torch.randn(8, 5)
    out = net(x)
    losses = {"a": out["a"].pow(2).mean(), "b": (out["b"] - 1).pow(2).mean()}
    # oracle for the backbone: u_k = grad of L_k w.r.t. z (rotations are the identity at start)
    z = backbone(x)
    u = [torch.autograd.grad(heads[t](z).sub(0 if t == "a" else 1).pow(2).mean(), z)[0] for t in ("a", "b")]
    norms = torch.stack([g.norm() for g in u])
    C = (norms / norms.sum() * norms).sum() if False else norms.sum() / 2  # first step: alphas = 1/K
    expected_gz = sum(g / n * C for g, n in zip(u, norms, strict=True))
    expected_w = torch.autograd.grad(z, backbone.weight, expected_gz)[0]
    scales = recon_backward(losses, net)
    assert torch.allclose(backbone.weight.grad, expected_w, atol=1e-6)
    assert torch.allclose(scales, C / norms, atol=1e-6)
    rot_params = list(net.rotation_parameters())
    assert all(p.grad is not None for p in rot_params)
    head_expected = torch.autograd.grad(heads["a"](z.detach()).pow(2).mean(), heads["a"].weight)[0]
    assert torch.allclose(heads["a"].weight.grad, head_expected, atol=1e-6)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    opt.step()
    R = net.rotation("a").detach()
    assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)
    assert float(torch.linalg.det(R)) == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(R, torch.eye(4))


def recon_backward(losses, net):
    import recon._backward as rb

    return rb.backward(losses, net, "rotograd").weights


def test_rotograd_method_needs_a_rotograd_module():
    net = nn.Linear(2, 2)
    out = net(torch.randn(3, 2)).sum()
    import recon._backward as rb

    with pytest.raises(ReconError, match="RotoGrad"):
        rb.backward({"a": out, "b": out * 2}, net, "rotograd")


# --- registry -----------------------------------------------------------------------------------------------
def test_every_registered_method_builds_with_its_defaults():
    for name, info in M.REGISTRY.items():
        m = M.get(name)
        assert m.kind == info.kind and info.paper
        assert isinstance(m, nn.Module)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ReconError, match="unknown method 'nope'.*pcgrad.*cagrad.*rotograd"):
        M.get("nope")


def test_bad_hyperparameters_list_the_valid_choices():
    with pytest.raises(ReconError, match="unknown hyperparameter 'alpha'.*valid: c, rescale, norm_eps"):
        M.get("cagrad", alpha=0.5)
    with pytest.raises(ReconError, match="c of cagrad must be >= 0"):
        M.get("cagrad", c=-1)
    with pytest.raises(ReconError, match=r"rescale of cagrad must be one of \[0, 1, 2\]"):
        M.get("cagrad", rescale=3)
    with pytest.raises(ReconError, match="scale_mode"):
        M.get("aligned_mtl", scale_mode="max")
    with pytest.raises(ReconError, match="valid: none"):
        M.get("pcgrad", beta=1)


def test_names_aliases_and_specs():
    m = M.get("CAGrad:c=0.5,rescale=0")
    assert (m.c, m.rescale) == (0.5, 0)
    assert isinstance(M.get("joint"), M.Mean) and isinstance(M.get("IMTL-G"), M.IMTLG)
    with pytest.raises(ReconError, match="key=value"):
        M.get("cagrad:0.5")


def test_resolve_accepts_names_instances_aggregators_and_callables():
    J = random_jacobian(3)
    inst = M.get("mgda")
    assert M.resolve(inst) is inst
    assert isinstance(M.resolve("upgrad"), M.UPGrad)
    wrapped = M.resolve(ta.UPGrad())
    assert wrapped.kind == "gradient" and rel(wrapped(J), ta.UPGrad()(J)) < 1e-12
    fn = M.resolve(lambda J: J[0])
    assert torch.equal(fn(J), J[0])
    with pytest.raises(ReconError, match="cannot use int"):
        M.resolve(3)
    with pytest.raises(ReconError, match="option"):
        M.resolve(M.SparseTraining(ratio=0.5))


def test_importing_recon_methods_imports_no_heavy_solver():
    heavy = "('cvxpy', 'quadprog', 'qpsolvers', 'torchjd')"
    code = f"import sys, recon.methods, recon._backward; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- sparse training ---------------------------------------------------------------------------------------
def test_sparse_training_keeps_the_top_magnitude_weights_of_each_neuron():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Conv1d(6, 4, 3))
    sp = M.SparseTraining(ratio=0.3).apply(enc)
    lin, conv = enc[0].weight, enc[2].weight
    assert set(sp.masks) == {lin, conv}
    for w, k in ((lin, 3), (conv, round(0.3 * 18))):
        rows = w.detach().reshape(w.shape[0], -1).abs()
        mask = sp.masks[w].reshape(w.shape[0], -1)
        assert (mask.sum(1) == k).all()
        for r in range(rows.shape[0]):
            kept = rows[r][mask[r]]
            dropped = rows[r][~mask[r]]
            assert kept.min() >= dropped.max()


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_sparse_training_frozen_weights_never_change(opt_name):
    import recon._backward as rb

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
    heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
        if opt_name == "sgd"
        else torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    )
    sp = M.SparseTraining(ratio=0.25).attach(trunk, opt)
    before = {p: p.detach().clone() for p in sp.masks}
    for _ in range(5):
        x = torch.randn(16, 6)
        z = trunk(x)
        losses = {t: heads[t](z).pow(2).mean() + (1.0 if t == "b" else 0.0) * z.mean() for t in heads}
        opt.zero_grad()
        rb.backward(losses, nn.ModuleList([trunk, heads]), "pcgrad")
        for p, mask in sp.masks.items():
            assert (p.grad[~mask] == 0).all()
        opt.step()
    for p, mask in sp.masks.items():
        assert torch.equal(p.detach()[~mask], before[p][~mask])
        assert not torch.equal(p.detach()[mask], before[p][mask])
    sp.remove()
    assert not sp.masks


def test_sparse_training_state_dict_restores_the_original_masks():
    torch.manual_seed(0)
    enc = nn.Linear(6, 4)
    sp = M.SparseTraining(ratio=0.5).attach(enc)
    state = sp.state_dict()
    original = enc.weight.detach().clone()
    with torch.no_grad():
        enc.weight.mul_(-3.0)  # training moved the weights: a new top-|w| choice would differ
    again = M.SparseTraining(ratio=0.5).attach(enc)
    again.load_state_dict(state)
    assert torch.equal(again.masks[enc.weight], sp.masks[enc.weight])
    again.apply()  # without a target: put the frozen entries back
    mask = sp.masks[enc.weight]
    assert torch.equal(enc.weight.detach()[~mask], original[~mask])


@pytest.mark.parametrize("cos", [-1.0, -0.99, 0.0, 0.5, 0.999, 1 - 1e-6, 1.0])
@pytest.mark.parametrize("ratio", [1.0, 1e3])
def test_two_task_closed_forms_match_torchjd_from_orthogonal_to_collinear(cos, ratio):
    """IMTL-G and Aligned-MTL have closed forms at K = 2; near rank 1 they defer to the general path."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 50, generator=g, dtype=torch.float64)
    v = v - (v @ u) / (u @ u) * u
    u, v = u / u.norm(), v / v.norm()
    J = torch.stack([u, ratio * (cos * u + math.sqrt(max(1 - cos * cos, 0.0)) * v)])
    for name, oracle in (
        ("imtl_g", ta.IMTLG()),
        ("aligned_mtl", ta.AlignedMTL()),
        ("aligned_mtl:scale_mode=median", ta.AlignedMTL(scale_mode="median")),
        ("aligned_mtl:scale_mode=rmse", ta.AlignedMTL(scale_mode="rmse")),
    ):
        ours, theirs = M.get(name)(J), oracle(J)
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9 * ratio), name
