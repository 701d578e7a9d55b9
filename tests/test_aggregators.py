"""Aggregators: each method's defining property on random gradient matrices with conflicts, closed forms where they
exist, dtypes, determinism, and refusal of bad input."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dgr_fast.mtl import CAGrad, GradDrop, IMTLG, MGDA, Mean, NashMTL, PCGrad, Sum
from dgr_fast.mtl.aggregators import LinearAggregator

SHAPES = st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))


def conflicting(K: int, P: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random task gradients of different magnitudes that pull against each other."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(K, P, generator=gen, dtype=torch.float64)
    if K > 1:
        G[1:] -= 0.7 * G[:1]  # negative correlation with task 0
    G *= torch.logspace(-1, 1, K, dtype=torch.float64)[torch.randperm(K, generator=gen)].unsqueeze(1)
    return G.to(dtype)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def all_aggregators():
    return [Mean(), Sum(), PCGrad(seeded()), CAGrad(), CAGrad(rescale=False), IMTLG(), MGDA(), MGDA("l2"),
            NashMTL(), GradDrop(generator=seeded())]


def aggregator_ids():
    return ["mean", "sum", "pcgrad", "cagrad", "cagrad-raw", "imtlg", "mgda", "mgda-l2", "nashmtl", "graddrop"]


# ---------------------------------------------------------------- Mean, Sum


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mean_and_sum_are_exact(dtype):
    G = conflicting(5, 33, 1, dtype)
    assert torch.equal(Mean()(G), G.mean(0))
    assert torch.equal(Sum()(G), G.sum(0))
    assert torch.equal(Mean().weights(G), torch.full((5,), 0.2, dtype=dtype))
    assert torch.equal(Sum().weights(G), torch.ones(5, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sum_refuses_an_overflowing_sum_but_not_an_update_whose_total_overflows(dtype):
    big = torch.finfo(dtype).max
    # finite gradients whose sum over tasks overflows G's dtype
    with pytest.raises(ValueError, match="finite but its sum over tasks overflows"):
        Sum()(torch.full((2, 3), 0.75 * big, dtype=dtype))
    # a finite update whose entries add up to more than the dtype holds: the check must not take that for overflow
    G = torch.full((2, 8), 0.25 * big, dtype=dtype)
    assert torch.equal(Sum()(G), torch.full((8,), 0.5 * big, dtype=dtype))
    assert torch.equal(Mean()(G), G[0])


@pytest.mark.parametrize("agg", [PCGrad(seeded()), GradDrop(generator=seeded()), GradDrop(0.5, seeded())],
                         ids=["pcgrad", "graddrop", "graddrop-leak"])
def test_a_float16_update_past_its_range_is_refused_not_inf(agg):
    # float16 G is combined in float32: the cast of a finite update beyond 65504 back to float16 used to give inf
    G = torch.full((2, 3), 0.75 * torch.finfo(torch.float16).max, dtype=torch.float16)
    with pytest.raises(ValueError, match="G is finite but its .* overflows torch.float16"):
        agg(G)


# ---------------------------------------------------------------- PCGrad


def pcgrad_reference(G: torch.Tensor, orders) -> torch.Tensor:
    """PCGrad on the rows of G directly; orders[i] is the order of the other tasks for task i."""
    out = []
    for i, order in enumerate(orders):
        g = G[i].clone()
        for j in order:
            dot = g @ G[j]
            if dot < 0:
                g = g - dot / (G[j] @ G[j]) * G[j]
        out.append(g)
    return torch.stack(out).sum(0)


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_two_tasks_leaves_no_conflict(seed):
    G = conflicting(2, 17, seed)
    g1, g2 = G
    assert g1 @ g2 < 0
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g1 @ g2) / (g1 @ g1) * g1
    assert abs(p1 @ g2) < 1e-12 * g1.norm() * g2.norm() and abs(p2 @ g1) < 1e-12 * g1.norm() * g2.norm()
    assert p1 @ p2 >= 0
    d = PCGrad()(G)
    torch.testing.assert_close(d, p1 + p2, rtol=1e-12, atol=1e-12)
    assert d @ g1 >= 0 and d @ g2 >= 0


def test_pcgrad_without_conflict_is_the_sum():
    G = torch.rand(4, 9, dtype=torch.float64, generator=seeded(3))  # all dot products positive
    torch.testing.assert_close(PCGrad()(G), G.sum(0), rtol=1e-14, atol=0)


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_three_tasks_matches_one_of_the_task_orders(seed):
    G = conflicting(3, 11, seed)
    d = PCGrad(seeded(seed))(G)
    others = [[j for j in range(3) if j != i] for i in range(3)]
    candidates = [pcgrad_reference(G, [o if flip == 0 else o[::-1] for o, flip in zip(others, flips)])
                  for flips in itertools.product([0, 1], repeat=3)]
    errors = [float((d - c).abs().max()) for c in candidates]
    assert min(errors) < 1e-12 * float(G.abs().max())


def test_pcgrad_is_deterministic_with_a_seeded_generator_and_the_order_matters():
    G = conflicting(5, 23, 7)
    a, b = PCGrad(seeded(11)), PCGrad(seeded(11))
    runs_a = [a(G) for _ in range(6)]
    runs_b = [b(G) for _ in range(6)]
    for x, y in zip(runs_a, runs_b):
        assert torch.equal(x, y)
    assert any(not torch.allclose(runs_a[0], r) for r in runs_a[1:])  # fresh orders on later calls


def test_pcgrad_mean_reduction_divides_by_k():
    G = conflicting(4, 10, 2)
    torch.testing.assert_close(PCGrad(seeded(1), reduction="mean")(G), PCGrad(seeded(1))(G) / 4)


# ---------------------------------------------------------------- MGDA


def assert_min_norm_kkt(G: torch.Tensor, w: torch.Tensor, tol: float) -> None:
    """w on the simplex and d = w G satisfies <g_k, d> >= |d|^2, with equality where w_k > 0."""
    assert (w >= 0).all()
    assert abs(float(w.sum()) - 1) < tol
    d = w @ G
    gaps = G @ d - d @ d
    scale = float((G * G).sum(1).max())
    assert float(gaps.min()) >= -tol * scale
    assert float(gaps[w > 1e-9].abs().max()) <= tol * scale


@settings(max_examples=60, deadline=None)
@given(SHAPES)
def test_mgda_satisfies_the_min_norm_kkt_conditions(shape):
    G = conflicting(*shape)
    w = MGDA().weights(G)
    assert_min_norm_kkt(G, w, 1e-10)
    torch.testing.assert_close(MGDA()(G), w @ G, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(6))
def test_mgda_two_tasks_matches_the_closed_form(seed):
    G = conflicting(2, 13, seed)
    if seed % 2:
        G[1] = 3 * G[0] + 0.1 * G[1]  # a case where the min-norm point is a vertex
    g1, g2 = G
    gamma = ((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))).clamp(0, 1)
    torch.testing.assert_close(MGDA()(G), gamma * g1 + (1 - gamma) * g2, rtol=1e-11, atol=1e-13)


def test_mgda_zero_in_the_hull_gives_zero():
    g = torch.randn(8, dtype=torch.float64, generator=seeded(0))
    G = torch.stack([g, -2 * g, torch.randn(8, dtype=torch.float64, generator=seeded(1))])
    assert float(MGDA()(G).norm()) < 1e-12


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalizations_solve_on_scaled_gradients_and_combine_the_raw_ones(normalization):
    G = conflicting(4, 19, 5)
    losses = torch.tensor([0.5, 2.0, 1.3, 0.9], dtype=torch.float64)
    norms = G.norm(dim=1)
    scale = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    agg = MGDA(normalization)
    w = agg.weights(G, losses)
    assert_min_norm_kkt(G / scale[:, None], w, 1e-10)
    torch.testing.assert_close(agg(G, losses), w @ G, rtol=1e-12, atol=1e-14)


def test_mgda_loss_normalization_needs_positive_losses():
    G = conflicting(3, 5, 0)
    with pytest.raises(ValueError, match="losses"):
        MGDA("loss")(G)
    with pytest.raises(ValueError, match="losses"):
        MGDA("loss+")(G, [1.0, 0.0, 2.0])


def brute_force_min_norm_point(G: torch.Tensor) -> torch.Tensor:
    """The min-norm point of the hull of G's rows (K <= 4), by enumeration: for every support, the affine min-norm
    point min_t |g_a + sum_i t_i (g_i - g_a)| solved by least squares on the vectors (no Gram matrix, so the
    condition number is not squared), kept when its weights are >= 0; the smallest of those."""
    G = G.double()
    K = G.shape[0]
    best = None
    for n in range(1, K + 1):
        for support in itertools.combinations(range(K), n):
            anchor, others = support[0], list(support[1:])
            w = torch.zeros(K, dtype=torch.float64)
            w[anchor] = 1.0
            if others:
                t = torch.linalg.lstsq((G[others] - G[anchor]).T, -G[anchor, :, None], driver="gelsd").solution[:, 0]
                w[others] = t
                w[anchor] = 1.0 - t.sum()
                if bool((w < 0).any()):
                    continue
            x = w @ G
            if best is None or float(x.norm()) < float(best.norm()):
                best = x
    return best


@pytest.mark.parametrize("ratio", [1.0, 1e3, 1e6])
@pytest.mark.parametrize("K,P", [(2, 2), (2, 40), (3, 3), (3, 40), (4, 4), (4, 40)])
def test_mgda_is_the_brute_force_min_norm_point_at_any_norm_ratio(K, P, ratio):
    # One task's gradient `ratio` times the others': the min-norm point then lies mostly on the small tasks. P >= K
    # keeps zero out of the hull (almost surely), so that the relative error is defined.
    for seed in range(3):
        G = torch.randn(K, P, dtype=torch.float64, generator=seeded(seed))
        G[seed % K] *= ratio
        expected = brute_force_min_norm_point(G)
        d = MGDA()(G)
        assert float((d - expected).norm()) <= 1e-8 * float(expected.norm()), (seed, float(expected.norm()))


# ---------------------------------------------------------------- IMTL-G


@settings(max_examples=60, deadline=None)
@given(SHAPES)
def test_imtlg_projects_equally_on_every_unit_gradient(shape):
    G = conflicting(*shape)
    w = IMTLG().weights(G)
    d = IMTLG()(G)
    torch.testing.assert_close(d, w @ G, rtol=1e-12, atol=1e-12)
    assert abs(float(w.sum()) - 1) < 1e-9
    proj = G @ d / G.norm(dim=1)
    scale = max(float(d.norm()), float(G.norm(dim=1).max()))
    assert float((proj - proj.mean()).abs().max()) <= 1e-9 * scale


def test_imtlg_matches_the_paper_closed_form():
    G = conflicting(4, 25, 9)
    U = G / G.norm(dim=1, keepdim=True)
    D, Ud = G[0] - G[1:], U[0] - U[1:]
    alpha = G[0] @ Ud.T @ torch.linalg.inv(D @ Ud.T)
    expected = torch.cat([(1 - alpha.sum()).reshape(1), alpha])
    torch.testing.assert_close(IMTLG().weights(G), expected, rtol=1e-10, atol=1e-12)


def test_imtlg_leaves_out_zero_gradients():
    G = conflicting(4, 12, 3)
    G[2] = 0
    w = IMTLG().weights(G)
    assert w[2] == 0
    d = w @ G
    live = [0, 1, 3]
    proj = G[live] @ d / G[live].norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(3), rtol=1e-10, atol=0)


# ---------------------------------------------------------------- CAGrad


def cagrad_dual(G: torch.Tensor, w: torch.Tensor, c: float) -> torch.Tensor:
    g0 = G.mean(0)
    gw = w @ G
    return gw @ g0 + c * g0.norm() * gw.norm()


def assert_cagrad_optimal(G: torch.Tensor, c: float, tol: float) -> None:
    """d maximises min_k <g_k, d> over |d - g0| <= c |g0|, certified by duality: d is in the ball, d - g0 is a
    non-negative combination of the gradients that attain the minimum, and min_k <g_k, d> equals the dual objective
    at a feasible point (the normalised push direction, or the min-norm point when the ball is not touched)."""
    K = G.shape[0]
    beta = CAGrad(c, rescale=False).weights(G)
    d = CAGrad(c, rescale=False)(G)
    torch.testing.assert_close(d, beta @ G, rtol=1e-12, atol=1e-12)
    g0 = G.mean(0)
    rho = c * float(g0.norm())
    scale = float(G.norm(dim=1).max())
    assert float((d - g0).norm()) <= rho + tol * scale
    extra = beta - 1.0 / K
    assert float(extra.min()) >= -tol * max(float(extra.abs().max()), 1.0)
    values = G @ d
    primal = float(values.min())
    active = extra > 1e-7 * float(extra.abs().max())
    if bool(active.any()):
        assert float((values[active] - primal).abs().max()) <= tol * scale**2
    duals = [float(cagrad_dual(G, MGDA().weights(G), c))]
    if float(extra.sum()) > 0:
        duals.append(float(cagrad_dual(G, extra / extra.sum(), c)))
    assert abs(primal - min(duals)) <= tol * scale**2


@settings(max_examples=60, deadline=None)
@given(st.tuples(st.integers(2, 6), st.integers(2, 40), st.integers(0, 2**31 - 1)),
       st.sampled_from([0.1, 0.4, 0.8]))
def test_cagrad_is_optimal_for_its_primal_and_dual(shape, c):
    assert_cagrad_optimal(conflicting(*shape), c, 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_two_tasks_matches_a_brute_force_dual(seed):
    G = conflicting(2, 9, seed)
    c = 0.4
    gammas = torch.linspace(0, 1, 20001, dtype=torch.float64)
    W = torch.stack([gammas, 1 - gammas], 1)
    values = (W @ G) @ G.mean(0) + c * G.mean(0).norm() * (W @ G).norm(dim=1)
    best = int(values.argmin())
    lo, hi = float(gammas[max(best - 1, 0)]), float(gammas[min(best + 1, 20000)])
    for _ in range(200):  # golden-section refinement of the convex one-dimensional dual
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        f1, f2 = (cagrad_dual(G, torch.tensor([m, 1 - m], dtype=torch.float64), c) for m in (m1, m2))
        lo, hi = (lo, m2) if f1 <= f2 else (m1, hi)
    gw = torch.tensor([lo, 1 - lo], dtype=torch.float64) @ G
    g0 = G.mean(0)
    expected = (g0 + c * g0.norm() * gw / gw.norm()) / (1 + c**2)
    torch.testing.assert_close(CAGrad(c)(G), expected, rtol=1e-7, atol=1e-9)


def test_cagrad_with_c_zero_is_the_mean_and_rescale_divides_by_one_plus_c_squared():
    G = conflicting(4, 21, 4)
    torch.testing.assert_close(CAGrad(0.0)(G), G.mean(0), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(CAGrad(0.5)(G), CAGrad(0.5, rescale=False)(G) / 1.25, rtol=1e-14, atol=1e-15)


def test_cagrad_inside_the_ball_takes_the_nearest_direction_without_conflict():
    # g0 = (0, 0.05) conflicts slightly with g_a; zero is in the hull and the dual optimum is g_w = 0, so the best
    # minimum is 0 and the update is g0 projected onto the half-space <g_a, d> >= 0
    g_a = torch.tensor([1.0, -0.05], dtype=torch.float64)
    G = torch.stack([g_a, torch.tensor([-1.0, 0.2], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)])
    g0 = G.mean(0)
    expected = g0 - (g0 @ g_a) / (g_a @ g_a) * g_a
    torch.testing.assert_close(CAGrad(0.4, rescale=False)(G), expected, rtol=1e-13, atol=1e-15)
    assert_cagrad_optimal(G, 0.4, 1e-10)
    # g0 conflicts with no task: it is the update
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(CAGrad(0.4, rescale=False)(G), G.mean(0))


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_with_a_zero_gradient_is_optimal(seed):
    G = conflicting(5, 7, seed)
    G[seed % 5] = 0
    assert_cagrad_optimal(G, 0.4, 1e-9)


def golden_section_min(f, lo: float, hi: float, iters: int = 80) -> float:
    """The minimiser of a convex f on [lo, hi]."""
    r = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return 0.5 * (a + b)


def cagrad_by_golden_section(G: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad's raw direction g0 + rho g_w / |g_w| from its convex dual min_w <g_w, g0> + rho |g_w|, solved for K = 2
    or 3 by (nested) golden-section searches over the simplex, in float64: for K = 3, w = (x, (1 - x) y,
    (1 - x)(1 - y)), and the minimum over y is convex in x (a partial minimum of a convex function)."""
    G = G.double()
    K = G.shape[0]
    A, g0 = (G @ G.T).tolist(), G.mean(0)
    a, rho = (G @ g0).tolist(), c * float(g0.norm())

    def dual(w):
        gw_sq = sum(w[i] * w[j] * A[i][j] for i in range(K) for j in range(K))
        return sum(w[i] * a[i] for i in range(K)) + rho * math.sqrt(max(gw_sq, 0.0))

    if K == 2:
        x = golden_section_min(lambda x: dual((x, 1.0 - x)), 0.0, 1.0)
        w = (x, 1.0 - x)
    else:
        def on_slice(x, y):
            return (x, (1.0 - x) * y, (1.0 - x) * (1.0 - y))

        def best_on_slice(x):
            return on_slice(x, golden_section_min(lambda y: dual(on_slice(x, y)), 0.0, 1.0))

        w = best_on_slice(golden_section_min(lambda x: dual(best_on_slice(x)), 0.0, 1.0))
    gw = torch.tensor(w, dtype=torch.float64) @ G
    return g0 + rho * gw / gw.norm()


@pytest.mark.parametrize("K,ratio,dtype,rtol", [(2, 1e3, torch.float32, 1e-5), (3, 500.0, torch.float32, 1e-5),
                                                (3, 1.0, torch.float64, 1e-6), (2, 1e6, torch.float64, 1e-6),
                                                (3, 1e6, torch.float64, 1e-6)])
def test_cagrad_with_a_dominant_task_matches_an_independent_dual_solver(K, ratio, dtype, rtol):
    # The dual optimum lies on the small tasks; its |g_w|^2 is tiny next to the dominant |g_k|^2 but far above the
    # rounding of g_w, so it is not the "g_w* = 0" case (whose update, the cone projection, is a different one).
    for seed in range(2):
        G = torch.randn(K, 1000, dtype=torch.float64, generator=seeded(seed))
        G[seed % K] *= ratio
        G = G.to(dtype)
        expected = cagrad_by_golden_section(G, 0.4)
        d = CAGrad(0.4, rescale=False)(G).double()
        assert float((d - expected).norm()) <= rtol * float(expected.norm()), seed


@pytest.mark.parametrize("K", [5, 9, 13])
def test_cagrad_is_optimal_when_the_norms_span_many_orders_of_magnitude(K):
    # Norms log-normal over ~10^+-6: the dual optimum |g_w*| is many orders below the largest |g_k|. Optimality by
    # duality (primal <= dual for any feasible pair, so equality certifies both), with a tolerance relative to the
    # rounding scale of the active tasks' dot products instead of the largest squared norm.
    for seed in range(3):
        G = torch.randn(K, 60, dtype=torch.float64, generator=seeded(seed))
        G *= 10.0 ** (3 * torch.randn(K, 1, dtype=torch.float64, generator=seeded(100 + seed)))
        beta = CAGrad(0.4, rescale=False).weights(G)
        d = beta @ G
        g0 = G.mean(0)
        rho = 0.4 * float(g0.norm())
        assert float((d - g0).norm()) <= rho * (1 + 1e-9)
        extra = beta - 1.0 / K
        assert float(extra.min()) >= -1e-12 * float(extra.abs().max())
        w = extra / extra.sum()
        gw = w @ G
        dual = float(gw @ g0 + rho * gw.norm())
        primal = float((G @ d).min())
        scale = float(d.norm()) * float(G.norm(dim=1)[w > 1e-12].max())
        assert abs(primal - dual) <= 1e-10 * scale, seed


# ---------------------------------------------------------------- Nash-MTL


@settings(max_examples=60, deadline=None)
@given(SHAPES)
def test_nashmtl_solves_the_bargaining_equation(shape):
    G = conflicting(*shape)
    K = G.shape[0]
    alpha = NashMTL().weights(G)
    d = NashMTL()(G)
    if not bool(alpha.any()):  # zero in the hull: no bargaining solution, a zero update
        assert float(d.abs().max()) == 0
        assert float(MGDA()(G).norm()) <= 1e-5 * float(G.norm(dim=1).max())
        return
    assert (alpha > 0).all()
    A = G @ G.T
    torch.testing.assert_close(A @ alpha, 1 / alpha, rtol=1e-8, atol=0)
    torch.testing.assert_close(d, alpha @ G, rtol=1e-12, atol=1e-12)
    assert abs(float(d.norm()) - math.sqrt(K)) < 1e-8


def test_nashmtl_is_scale_invariant_and_max_norm_bounds_the_update():
    G = conflicting(3, 30, 8)
    torch.testing.assert_close(NashMTL()(1e-3 * G), NashMTL()(G), rtol=1e-9, atol=1e-12)
    d = NashMTL(max_norm=1.0)(G)
    torch.testing.assert_close(d, NashMTL()(G) / math.sqrt(3), rtol=1e-12, atol=1e-12)


def test_nashmtl_edge_cases():
    g = torch.randn(6, dtype=torch.float64, generator=seeded(2))
    torch.testing.assert_close(NashMTL()(g[None]), g / g.norm())  # K = 1: alpha = 1 / |g|
    assert torch.equal(NashMTL()(torch.stack([g, -g])), torch.zeros(6, dtype=torch.float64))
    G = conflicting(3, 6, 1)
    G[1] = 0
    alpha = NashMTL().weights(G)
    assert alpha[1] == 0 and (alpha[[0, 2]] > 0).all()
    live = G[[0, 2]]
    torch.testing.assert_close(live @ live.T @ alpha[[0, 2]], 1 / alpha[[0, 2]], rtol=1e-9, atol=0)


@pytest.mark.parametrize("K,ratio,dtype,rtol", [(8, 150.0, torch.float32, 1e-5), (3, 500.0, torch.float32, 1e-5),
                                                (2, 1e3, torch.float32, 1e-5), (8, 1e6, torch.float64, 1e-12),
                                                (3, 1e9, torch.float64, 1e-12)])
def test_nashmtl_with_a_dominant_task_solves_the_bargaining_equation(K, ratio, dtype, rtol):
    # Unit gradients in 10^4 dimensions are nearly orthogonal: zero is far from their hull, whatever the norms.
    G = torch.randn(K, 10_000, dtype=torch.float64, generator=seeded(K))
    G[0] *= ratio
    G = G.to(dtype)
    alpha = NashMTL().weights(G).double()
    d = NashMTL()(G).double()
    assert (alpha > 0).all()
    residual = alpha * (G.double() @ d) - 1.0  # <g_k, d> alpha_k = 1 for every task
    assert float(residual.abs().max()) <= rtol
    assert abs(float(d.norm()) - math.sqrt(K)) <= rtol * math.sqrt(K)


# ---------------------------------------------------------------- GradDrop


def test_graddrop_keeps_the_sum_where_signs_agree():
    G = conflicting(3, 50, 0).abs() * torch.where(torch.rand(50, generator=seeded(1)) < 0.5, -1.0, 1.0)
    torch.testing.assert_close(GradDrop(generator=seeded())(G), G.sum(0), rtol=1e-15, atol=0)


def test_graddrop_picks_one_sign_per_element():
    G = conflicting(4, 300, 2)
    pos, neg = G.clamp(min=0).sum(0), G.clamp(max=0).sum(0)
    out = GradDrop(generator=seeded())(G)
    assert bool(((out == pos) | (out == neg)).all())
    assert bool((out == pos).any()) and bool((out == neg).any())
    torch.testing.assert_close(GradDrop(leak=1.0, generator=seeded())(G), G.sum(0), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(GradDrop(leak=0.25, generator=seeded(5))(G),
                               0.25 * G.sum(0) + 0.75 * GradDrop(generator=seeded(5))(G), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(GradDrop(generator=seeded(5), reduction="mean")(G),
                               GradDrop(generator=seeded(5))(G) / 4)


def test_graddrop_keeps_the_positive_parts_with_the_sign_purity_probability():
    # every element has gradients (2, 1, -1): purity P = 3 / 4
    G = torch.tensor([[2.0], [1.0], [-1.0]]).expand(3, 200_000)
    out = GradDrop(generator=seeded(0))(G)
    share = float((out == 3.0).double().mean())
    assert bool(((out == 3.0) | (out == -1.0)).all())
    assert abs(share - 0.75) < 0.005  # 5 standard deviations; the draw is seeded


def test_graddrop_is_deterministic_with_a_seeded_generator():
    G = conflicting(3, 64, 1)
    assert torch.equal(GradDrop(generator=seeded(4))(G), GradDrop(generator=seeded(4))(G))
    assert not torch.equal(GradDrop(generator=seeded(4))(G), GradDrop(generator=seeded(5))(G))


# ---------------------------------------------------------------- all aggregators


@pytest.mark.parametrize("index", range(len(all_aggregators())), ids=aggregator_ids())
@pytest.mark.parametrize("K,P", [(1, 1), (1, 7), (2, 1), (3, 2), (5, 3), (7, 129)])
def test_odd_sizes_give_a_finite_update_of_the_right_shape(index, K, P):
    agg = all_aggregators()[index]
    G = conflicting(K, P, K * 100 + P)
    d = agg(G)
    assert d.shape == (P,) and d.dtype == torch.float64 and bool(torch.isfinite(d).all())
    if isinstance(agg, LinearAggregator) and not isinstance(agg, PCGrad):
        torch.testing.assert_close(d, agg.weights(G) @ G, rtol=1e-10, atol=1e-12)


class CallBudget:
    """Wraps a solver of ``dgr_fast.mtl.aggregators`` and fails as soon as it is called more than ``limit`` times."""

    def __init__(self, function, limit: int) -> None:
        self.function, self.limit, self.calls = function, limit, 0

    def __call__(self, *args):
        self.calls += 1
        assert self.calls <= self.limit, f"{self.function.__name__} called more than {self.limit} times"
        return self.function(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [2, 3, 8, 16, 50])
def test_cancelling_gradients_finish_in_a_bounded_number_of_solver_calls(K, dtype, monkeypatch):
    # Rows that sum to zero make g0 = mean zero to rounding (CAGrad's rho = c |g0| too), K > P makes zero lie in the
    # hull, and float32 rounding makes the Gram matrix indefinite at its rounding level: the solvers must still stop.
    # Bounds: CAGrad's bisection on t = |g_w| in (0, 1] resolves t to float64 precision in at most 11 steps that find
    # its binary exponent (float64 has 2^11 of them) and 53 for its mantissa, plus the min-norm points of the hull
    # and at the two ends. Wolfe's method needs about K major cycles of at most P + 1 sub-problems (a corral of
    # P-dimensional points has at most P + 1 of them), and 2 K cycles leave room.
    from dgr_fast.mtl import aggregators

    bisection_budget = 11 + (1 - int(math.log2(torch.finfo(torch.float64).eps))) + 3
    original_min_norm = aggregators._min_norm_weights
    solve = CallBudget(aggregators._bordered_solve, math.inf)  # counts the sub-problems only
    monkeypatch.setattr(aggregators, "_bordered_solve", solve)
    for P in (1, 2, 3):
        wolfe_budget = 2 * K * (P + 1)

        def min_norm(M):
            before = solve.calls
            w = original_min_norm(M)
            assert solve.calls - before <= wolfe_budget, f"Wolfe's method took {solve.calls - before} sub-problems"
            return w

        for residue in (0.0, 1e-6, 1e-3):  # exact cancellation, and g0 just above and well above rounding
            G = torch.randn(K, P, dtype=torch.float64, generator=seeded(K + P))
            G = (G - G.mean(0) + residue * torch.randn(P, dtype=torch.float64, generator=seeded(1))).to(dtype)
            for agg in (CAGrad(), CAGrad(0.8, rescale=False), NashMTL(), MGDA(), MGDA("l2"), IMTLG(), PCGrad()):
                monkeypatch.setattr(aggregators, "_min_norm_weights", CallBudget(min_norm, bisection_budget))
                d = agg(G)
                assert d.shape == (P,) and bool(torch.isfinite(d).all()), (agg, P, residue)
        # CAGrad's update stays in its ball |d - g0| <= c |g0|, which for cancelling rows is at the rounding level
        G = torch.randn(K, P, dtype=torch.float64, generator=seeded(K + P))
        G = (G - G.mean(0)).to(dtype)
        g0 = G.double().mean(0)
        d = CAGrad(0.4, rescale=False)(G).double()
        scale = float(G.double().norm(dim=1).max())
        assert float((d - g0).norm()) <= 0.4 * float(g0.norm()) + 10 * K * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize("index", range(len(all_aggregators())), ids=aggregator_ids())
def test_one_task_gives_its_own_direction(index):
    agg = all_aggregators()[index]
    g = torch.randn(1, 9, dtype=torch.float64, generator=seeded(3))
    d = agg(g)
    cos = float(d @ g[0] / (d.norm() * g.norm()))
    assert abs(cos - 1) < 1e-12


@pytest.mark.parametrize("index", range(len(all_aggregators())), ids=aggregator_ids())
def test_float32_agrees_with_float64(index):
    G64 = conflicting(4, 257, 6)
    G32 = G64.float()
    if isinstance(all_aggregators()[index], GradDrop):
        # its uniform draws differ between dtypes: check the float32 result on its own
        out32 = all_aggregators()[index](G32)
        pos, neg = G32.clamp(min=0).sum(0), G32.clamp(max=0).sum(0)
        assert bool(((out32 == pos) | (out32 == neg)).all())
        return
    d64 = all_aggregators()[index](G64)
    d32 = all_aggregators()[index](G32)
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), d64, rtol=2e-4, atol=2e-4 * float(d64.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(all_aggregators())), ids=aggregator_ids())
def test_half_precision_is_computed_in_float32(index, dtype):
    G = conflicting(3, 40, 2).to(dtype)
    d = all_aggregators()[index](G)
    assert d.dtype == dtype
    assert torch.equal(d, all_aggregators()[index](G.float()).to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("index", range(len(all_aggregators())), ids=aggregator_ids())
def test_cuda_matches_cpu(index):
    G = conflicting(4, 1000, 3)
    agg = all_aggregators()[index]
    if isinstance(agg, GradDrop):
        agg = GradDrop(generator=torch.Generator(device="cuda").manual_seed(0))
        d = agg(G.cuda())
        pos, neg = G.clamp(min=0).sum(0), G.clamp(max=0).sum(0)
        assert bool((torch.isclose(d.cpu(), pos) | torch.isclose(d.cpu(), neg)).all())
        return
    d = agg(G.cuda())
    assert d.device.type == "cuda"
    torch.testing.assert_close(d.cpu(), all_aggregators()[index](G), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("index", range(len(all_aggregators())), ids=aggregator_ids())
def test_bad_input_is_refused_with_a_named_argument(index):
    agg = all_aggregators()[index]
    G = conflicting(3, 8, 0)
    with pytest.raises(TypeError, match="G"):
        agg(G.numpy())
    with pytest.raises(TypeError, match="G"):
        agg(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="G"):
        agg(G[0])
    with pytest.raises(ValueError, match="G"):
        agg(G[None])
    with pytest.raises(ValueError, match="K >= 1"):
        agg(G[:0])
    with pytest.raises(ValueError, match="P >= 1"):
        agg(G[:, :0])
    for bad in (math.nan, math.inf, -math.inf):
        broken = G.clone()
        broken[1, 5] = bad
        with pytest.raises(ValueError, match=r"G has NaN or infinite entries in the gradients of tasks \[1\]"):
            agg(broken)
    with pytest.raises(ValueError, match="losses"):
        agg(G, torch.ones(4))
    with pytest.raises(ValueError, match="losses"):
        agg(G, [1.0, math.nan, 2.0])
    with pytest.raises(TypeError, match="losses"):
        agg(G, ["a", "b", "c"])
    if isinstance(agg, LinearAggregator):
        with pytest.raises(ValueError, match="G"):
            agg.weights(G[:, :0])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="c"):
        CAGrad(c=-0.1)
    with pytest.raises(ValueError, match="normalization"):
        MGDA("l1")
    with pytest.raises(ValueError, match="leak"):
        GradDrop(leak=1.5)
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(reduction="max")
    with pytest.raises(ValueError, match="max_norm"):
        NashMTL(max_norm=0.0)
    with pytest.raises(TypeError, match="generator"):
        PCGrad(generator=0)
