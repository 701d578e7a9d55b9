"""Gradient aggregators: combine a per-task gradient matrix ``G [K, P]`` into one update ``[P]``.

Every aggregator is called as ``agg(G, losses=None)``: ``G`` holds one flattened gradient of the shared parameters
per task (any floating dtype, any device), ``losses`` (optional, ``[K]``) the task losses, which only
``MGDA(normalization="loss" | "loss+")`` uses but every aggregator checks for a length that matches ``K``.
The update comes back with ``G``'s dtype and device.

All aggregators except ``GradDrop`` return a linear combination ``sum_k w_k g_k`` of the task gradients. Their
coefficients depend on ``G`` only through the ``K x K`` Gram matrix ``G G^T``, so each one reads ``G`` twice: one
matmul for the Gram matrix, then one combination pass. The small problems on the Gram matrix (min-norm point,
CAGrad's dual, IMTL-G's linear system, Nash-MTL's bargaining equation) are solved in float64 on the CPU with
plain torch, no solver dependency. Their ``weights(G, losses=None)`` method returns the coefficients ``w [K]``.

float16/bfloat16 ``G`` is upcast to float32 for both passes (one temporary copy), so that the Gram diagonal cannot
overflow and the combination accumulates in float32; float64 stays float64.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Literal, NoReturn, Sequence

import torch
from torch import Tensor

__all__ = [
    "Aggregator",
    "LinearAggregator",
    "Mean",
    "Sum",
    "PCGrad",
    "CAGrad",
    "IMTLG",
    "MGDA",
    "GradDrop",
    "NashMTL",
]

LossesLike = Tensor | Sequence[float | Tensor]

# The small solvers run in float64, whatever G's dtype; their tolerances are relative, so that they hold at any ratio
# of the task-gradient norms.
_EPS64 = torch.finfo(torch.float64).eps
# Relative tolerance of the optimality conditions, on top of their rounding: Wolfe's |x|^2 - <x, p_j> relative to
# |x|^2, the cone projection's cosines of <g_k, d> < 0.
_GAP_TOL = 1e-13
_NEWTON_TOL = 1e-26  # squared Newton decrement of the Nash-MTL objective (affine invariant, so scale-free)
# A hard cap on the active-set iterations. The solvers also stop as soon as an iteration fails to decrease their
# objective, which in exact arithmetic every iteration does: then they are at the rounding floor.
_MAX_ITERS = 500
# CAGrad's geometric bisection on t = |g_w| in [t_lo, 1] (units of the largest task-gradient norm) with
# t_lo >= _T_FLOOR = 2^-511: 9 steps bring the ratio of the ends to 2, and 53 more to 1 + eps, beyond which float64 has
# no midpoint.
_T_FLOOR = math.sqrt(torch.finfo(torch.float64).tiny)  # the smallest t whose square is a normal float64
_BISECTION_STEPS = 64
# Least-squares solves treat singular values below this fraction of the largest as zero: dependent gradients (a
# duplicate, a multiple of another) make the small systems singular up to rounding, and an unregularised solve would
# return huge coefficients that cancel.
_RCOND = 1e-12


def _check_matrix(G: object) -> None:
    if not isinstance(G, Tensor):
        raise TypeError(f"G must be a torch.Tensor of per-task gradients [K, P], got {type(G).__name__}")
    if not G.is_floating_point():
        raise TypeError(f"G must have a floating dtype, got {G.dtype}")
    if G.ndim != 2:
        raise ValueError(f"G must be 2-D [K, P] (one flattened gradient per task), got shape {tuple(G.shape)}")
    if G.shape[0] < 1:
        raise ValueError("G must hold at least one task gradient (K >= 1), got K = 0")
    if G.shape[1] < 1:
        raise ValueError("G must have at least one parameter (P >= 1), got P = 0")


def _loss_vector(losses: LossesLike | None, num_tasks: int) -> Tensor | None:
    """The losses as a float64 CPU vector ``[K]`` (detached), or None."""
    if losses is None:
        return None
    try:
        if isinstance(losses, Tensor):
            vec = losses.detach().to("cpu", torch.float64)
        else:
            vec = torch.tensor([float(x) for x in losses], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"losses must be a [K] tensor or a sequence of K scalars: {exc}") from exc
    if vec.ndim != 1 or vec.numel() != num_tasks:
        raise ValueError(f"losses must hold one value per task (K = {num_tasks}), got shape {tuple(vec.shape)}")
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"losses must be finite, got {vec.tolist()}")
    return vec


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _raise_nonfinite(G: Tensor, what: str) -> NoReturn:
    bad_rows = (~torch.isfinite(G)).any(dim=1).nonzero().flatten().tolist()
    if bad_rows:
        raise ValueError(f"G has NaN or infinite entries in the gradients of tasks {bad_rows}")
    raise ValueError(f"G is finite but its {what} overflows {G.dtype}; rescale the losses or use a wider dtype")


def _in_dtype_of(out: Tensor, G: Tensor, what: str) -> Tensor:
    """The update ``out`` (computed in ``_compute_dtype``) in ``G``'s dtype, refusing one that is not finite: an entry
    of ``G`` that is, or a finite ``G`` whose update overflows (in the compute dtype, or in the cast to float16)."""
    result = out.to(G.dtype)
    # A non-finite entry makes the total non-finite: one reduction over P instead of an isfinite pass and an all().
    # The total of a finite result can overflow, so a non-finite total is only a hint, confirmed element-wise.
    total = result.sum(dtype=_compute_dtype(G.dtype))
    if not bool(total.isfinite()) and not bool(torch.isfinite(result).all()):
        _raise_nonfinite(G, what)
    return result


def _gram(Gc: Tensor, G: Tensor) -> Tensor:
    """``Gc Gc^T`` as a symmetric float64 CPU matrix; refuses non-finite rows (they make the diagonal non-finite)."""
    A = (Gc @ Gc.T).to("cpu", torch.float64)
    if not bool(torch.isfinite(A.diagonal()).all()):
        _raise_nonfinite(G, "Gram matrix")
    return 0.5 * (A + A.T)


def _bordered_solve(M: Tensor, rhs: Tensor) -> Tensor:
    """``w`` from ``[[M, 1], [1^T, 0]] [w; nu] = [b; e]`` (``rhs = [b; e]``, ``[n + 1, m]``): the KKT system of
    ``min w^T M w / 2 - b^T w`` subject to ``sum(w) = e``. Least squares (SVD), so a singular system still yields a
    least-squares solution.

    The system is first scaled symmetrically to a unit diagonal (``M_ij / (d_i d_j)`` with ``d_i = sqrt(M_ii)``, the
    border scaled to at most 1): task gradients whose norms differ by a factor r make ``M``'s singular values differ
    by r^2, and the SVD cut-off ``_RCOND`` would then discard the small tasks as if they were rounding noise. After the
    scaling, small singular values mean near-dependent *directions*, which is what the cut-off is for."""
    n = M.shape[0]
    d = M.diagonal().clamp(min=0.0).sqrt()
    d = torch.where(d > 0, d, torch.ones_like(d))  # a zero point has no scale to remove
    border = d.min() / d
    system = M.new_zeros(n + 1, n + 1)
    system[:n, :n] = M / (d[:, None] * d[None, :])
    system[:n, n] = border
    system[n, :n] = border
    scaled_rhs = rhs.clone()
    scaled_rhs[:n] /= d[:, None]
    scaled_rhs[n] *= d.min()
    solution = torch.linalg.lstsq(system, scaled_rhs, rcond=_RCOND, driver="gelsd").solution
    return solution[:n] / d[:, None]


def _step_to_first_zero(current: Tensor, target: Tensor) -> Tensor:
    """The active-set step shared by MGDA's and CAGrad's solvers: from the feasible ``current`` (all > 0) towards the
    sub-problem's minimiser ``target`` (some entries <= 0), stopping where the first weight reaches zero; that
    weight is set to exactly 0 (and rounding below 0 clamped), so the caller's support drops it."""
    blocked = target <= 0
    ratios = torch.full_like(target, math.inf)
    denominator = current[blocked] - target[blocked]
    # 0 / 0 where a weight that is still zero (a point just added) has a zero target: it stays at zero
    ratios[blocked] = torch.where(denominator > 0, current[blocked] / denominator, 0.0)
    first = int(ratios.argmin())
    stepped = (current + ratios[first] * (target - current)).clamp(min=0.0)
    stepped[first] = 0.0
    return stepped


def _rounding_floor(M: Tensor, w: Tensor) -> float:
    """The float64 rounding level of ``|x|^2 = w^T M w`` for ``x = sum_i w_i p_i`` (``M``: the Gram matrix of the
    points ``p_i``): ``K eps (sum_i |w_i| |p_i|)^2``. Changes of ``|x|^2`` below it cannot be told from rounding."""
    norms = M.diagonal().clamp(min=0.0).sqrt()
    return M.shape[0] * _EPS64 * float(w.abs() @ norms) ** 2


def _kkt_violations(M: Tensor, w: Tensor, rel_tol: float) -> tuple[float, Tensor]:
    """``|x|^2`` and, per point j, how far ``x = sum_i w_i p_i`` (``M``: the Gram matrix of the points ``p_i``)
    violates the min-norm optimality condition ``<p_j, x> >= |x|^2`` beyond what ``rel_tol |x|^2`` and rounding
    allow: positive where adding p_j would still shorten x. The rounding allowance of ``|x|^2 - <p_j, x>`` is
    ``K eps (sum_i w_i |p_i|) (sum_i w_i |p_i| + |p_j|)``. Relative, so it means the same at any ratio of the points'
    norms; an absolute gap on a matrix with a unit largest diagonal is huge next to a small |x|^2, and ``<p_j, x>``
    for a long p_j carries rounding that is huge next to it."""
    Mw = M @ w
    x_sq = float(w @ Mw)
    norms = M.diagonal().clamp(min=0.0).sqrt()
    combined = float(w.abs() @ norms)
    allowed = rel_tol * max(x_sq, 0.0) + M.shape[0] * _EPS64 * combined * (combined + norms)
    return x_sq, (x_sq - Mw) - allowed


def _min_norm_weights(M: Tensor) -> Tensor:
    """Weights ``w`` on the simplex minimising ``w^T M w``: the min-norm point of the convex hull of points whose Gram
    matrix is ``M`` (``[K, K]`` PSD, float64). Wolfe's (1976) algorithm, exact up to rounding: a corral of affinely
    independent points, the affine min-norm point of the corral, and line steps that drop points with zero weight.
    The entering point is the one that violates the optimality condition most beyond its tolerance
    (``_kkt_violations`` with ``_GAP_TOL``). It stops when none does, when that point is already in the corral, or
    when a major cycle fails to decrease ``|x|^2`` by more than its rounding floor (in exact arithmetic each one
    decreases it: the floor is reached, e.g. on a Gram matrix that rounding made slightly indefinite, where the same
    corral would otherwise come back again and again), so it always ends, after at most ``_MAX_ITERS`` major cycles
    of at most K sub-problems each. Off the support the weights are exactly zero. All-zero points give uniform
    weights."""
    K = M.shape[0]
    scale = float(M.diagonal().max())
    if scale <= 0.0:
        return M.new_full((K,), 1.0 / K)
    M = M / scale
    w = M.new_zeros(K)
    start = int(M.diagonal().argmin())
    w[start] = 1.0
    for _ in range(_MAX_ITERS):
        x_sq, violations = _kkt_violations(M, w, _GAP_TOL)
        j = int(violations.argmax())
        support = w > 0
        if bool(support[j]) or not float(violations[j]) > 0.0:
            break
        trial = w.clone()
        support[j] = True
        while True:
            idx = support.nonzero().flatten()
            n = idx.numel()
            rhs = M.new_zeros(n + 1, 1)
            rhs[n] = 1.0
            v = _bordered_solve(M[idx][:, idx], rhs)[:, 0]
            if bool((v > 0).all()):
                trial.zero_()
                trial[idx] = v
                break
            # Move towards the affine minimiser until the first weight reaches zero, and drop that point.
            current = _step_to_first_zero(trial[idx], v)
            total = float(current.sum())
            if not total > 0.0:  # rounding broke the sub-problem (the step keeps sum 1 in exact arithmetic)
                break
            trial.zero_()
            trial[idx] = current / total
            support = trial > 0
        if not float(trial @ M @ trial) < x_sq - _rounding_floor(M, w):
            break
        w = trial
    return w


def _zero_level(num_tasks: int, eps: float) -> float:
    """Squared norm, relative to the rounding scale ``(sum_k w_k |g_k|)^2`` of a combination ``sum_k w_k g_k``, below
    which the combination cannot be told from zero: the rounding of ``w^T A w`` in a Gram matrix computed with unit
    roundoff ``eps``."""
    return 8.0 * num_tasks * eps


def _rounding_scale(A: Tensor, w: Tensor) -> float:
    """``(sum_k |w_k| |g_k|)^2`` (``A``: the Gram matrix): the scale of the rounding in ``w^T A w``."""
    return float(w.abs() @ A.diagonal().clamp(min=0.0).sqrt()) ** 2


def _support_key(w: Tensor) -> tuple[int, ...]:
    return tuple(w.nonzero().flatten().tolist())


class Aggregator(ABC):
    """Combines per-task gradients ``G [K, P]`` into one update ``[P]`` (same dtype and device as ``G``)."""

    def __call__(self, G: Tensor, losses: LossesLike | None = None) -> Tensor:
        """Args:
            G: ``[K, P]`` floating tensor, row k the flattened gradient of task k's loss.
            losses: optional ``[K]`` task losses (tensor or sequence of scalars).
        Returns:
            ``[P]`` update in ``G.dtype`` on ``G.device``.
        """
        _check_matrix(G)
        return self._aggregate(G, _loss_vector(losses, G.shape[0]))

    @abstractmethod
    def _aggregate(self, G: Tensor, losses: Tensor | None) -> Tensor: ...

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


class LinearAggregator(Aggregator):
    """An aggregator whose update is a linear combination ``sum_k w_k g_k`` of the task gradients."""

    def weights(self, G: Tensor, losses: LossesLike | None = None) -> Tensor:
        """The coefficients ``w [K]`` of the update, on ``G.device``, float64 for float64 ``G`` and float32 otherwise.
        Randomised aggregators (PCGrad) draw afresh on each call."""
        _check_matrix(G)
        Gc = G.to(_compute_dtype(G.dtype))
        return self._weights(Gc, G, _loss_vector(losses, G.shape[0])).to(device=G.device, dtype=Gc.dtype)

    def _aggregate(self, G: Tensor, losses: Tensor | None) -> Tensor:
        Gc = G.to(_compute_dtype(G.dtype))
        w = self._weights(Gc, G, losses).to(device=G.device, dtype=Gc.dtype)
        return _in_dtype_of(w @ Gc, G, "combination sum_k w_k g_k")

    @abstractmethod
    def _weights(self, Gc: Tensor, G: Tensor, losses: Tensor | None) -> Tensor:
        """Coefficients ``[K]`` (float64 CPU) for ``G`` (``Gc``: ``G`` in the compute dtype)."""


class _GramAggregator(LinearAggregator):
    """Coefficients from the Gram matrix ``G G^T``: one read of ``G`` for it, one for the combination."""

    def _weights(self, Gc: Tensor, G: Tensor, losses: Tensor | None) -> Tensor:
        return self._solve(_gram(Gc, G), losses, torch.finfo(Gc.dtype).eps)

    @abstractmethod
    def _solve(self, A: Tensor, losses: Tensor | None, eps: float) -> Tensor:
        """Coefficients ``[K]`` (float64 CPU) from the Gram matrix ``A [K, K]`` (float64 CPU); ``eps`` is the unit
        roundoff of the dtype the Gram matrix was computed in."""


class _Uniform(LinearAggregator):
    """The same coefficient for every task: no Gram matrix, one read of ``G``."""

    _mean: bool

    def _weights(self, Gc: Tensor, G: Tensor, losses: Tensor | None) -> Tensor:
        K = G.shape[0]
        return torch.full((K,), 1.0 / K if self._mean else 1.0, dtype=torch.float64)

    def _aggregate(self, G: Tensor, losses: Tensor | None) -> Tensor:
        reduce = G.mean if self._mean else G.sum
        return _in_dtype_of(reduce(dim=0, dtype=_compute_dtype(G.dtype)), G, "sum over tasks")


class Mean(_Uniform):
    """The mean of the task gradients, ``G.mean(0)``: the gradient of the mean loss."""

    _mean = True


class Sum(_Uniform):
    """The sum of the task gradients, ``G.sum(0)``: the gradient of the summed loss."""

    _mean = False


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


class PCGrad(_GramAggregator):
    """PCGrad, projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    For each task i, in a random order of the other tasks j: if ``<g_i^PC, g_j> < 0``, remove the component of
    ``g_i^PC`` along the *original* ``g_j``. The update is ``sum_i g_i^PC`` (``reduction="mean"``: divided by K).

    Every projection is a linear combination of the original gradients, so it runs on the Gram matrix: the
    coefficients of each ``g_i^PC`` are updated with ``<g_i^PC, g_j> = c_i^T A[:, j]`` and the update is one
    combination pass over G. Zero gradients are never projected on (their dot products are zero).

    Randomness: for each task i the order of the other K - 1 tasks is ``argsort`` of a row of
    ``torch.rand(K, K - 1, generator=generator)``; ``generator`` must be a CPU generator (None: the global torch RNG).

    Deviations from the authors' code: the official TensorFlow code discards the result of its ``tf.random.shuffle``,
    so every task is projected in the fixed order 0..K-1 (itself included, a no-op); the paper's Algorithm 1 draws a
    random order per task, as done here. The CAGrad/Auto-Lambda
    code, which the DGR code uses, averages (``reduction="mean"``) and then multiplies by K in its ``overwrite_grad``,
    that is, it applies the sum.
    """

    def __init__(self, generator: torch.Generator | None = None, reduction: Literal["sum", "mean"] = "sum") -> None:
        _check_generator(generator)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (PCGrad draws its task order on the CPU), "
                             f"got one on {generator.device}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.generator = generator
        self.reduction = reduction

    def _solve(self, A: Tensor, losses: Tensor | None, eps: float) -> Tensor:
        K = A.shape[0]
        coef = torch.eye(K, dtype=torch.float64)
        if K > 1:
            ranks = torch.rand(K, K - 1, generator=self.generator).argsort(dim=1)
            tasks = torch.arange(K).unsqueeze(1)
            order = ranks + (ranks >= tasks).long()  # skip task i itself in row i
            diag = A.diagonal()
            safe_diag = torch.where(diag > 0, diag, torch.ones_like(diag))
            for step in range(K - 1):
                j = order[:, step]
                dots = (coef * A[:, j].T).sum(dim=1)  # <g_i^PC, g_j> for every i at once
                coef[tasks.squeeze(1), j] -= torch.clamp(dots, max=0.0) / safe_diag[j]
        w = coef.sum(dim=0)
        return w / K if self.reduction == "mean" else w


class CAGrad(_GramAggregator):
    """CAGrad, conflict-averse gradient descent (Liu et al., "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021).

    With ``g0 = mean_k g_k`` and ``rho = c |g0|``, the update maximises ``min_k <g_k, d>`` over the ball
    ``|d - g0| <= rho``. Its dual: ``w* = argmin_{w in simplex} <g_w, g0> + rho |g_w|`` with ``g_w = sum_k w_k g_k``;
    then ``d = g0 + rho g_w* / |g_w*|``, divided by ``1 + c^2`` when ``rescale`` (as the authors' ``rescale=1``).
    ``c = 0`` gives the mean.

    Solver (exact, no scipy): for t > 0, the minimiser of ``<g0, x> + rho (|x|^2 / (2t) + t / 2)`` over the hull is
    the min-norm point of the hull shifted by ``(t / rho) g0`` (Wolfe's algorithm on a shifted Gram matrix), and
    the dual optimum is where ``|x(t)| = t``. The root lies in ``[|x0|, max_k |g_k|]`` (x0: the min-norm point of
    the hull); a geometric bisection on t, which resolves it relative to its own size and so takes at most 64
    steps in float64, finds the active set. On a fixed active set ``x`` is affine in t, so the root is a quadratic
    equation, solved exactly and checked against the optimality conditions.

    "Zero to rounding", with eps the unit roundoff of the Gram matrix's dtype, means for a combination
    ``sum_k w_k g_k`` that its squared norm is at most ``8 K eps (sum_k w_k |g_k|)^2``, the rounding level of that
    combination (relative to its own scale, not to the largest ``|g_k|^2``, so that a combination of tasks much
    smaller than the largest is not taken for zero). When g0 is zero to rounding (gradients that cancel), so is
    rho: the ball is the point g0, which is the update. When zero lies in the hull (x0 is zero to rounding) and the
    ball reaches the cone ``{d: <g_k, d> >= 0 for all k}``, the dual optimum is ``g_w* = 0``, the ball constraint is
    inactive and every direction in the ball that conflicts with no task is optimal: the update is the one nearest
    to g0, the projection of g0 onto that cone, ``g0 + sum_k lam_k g_k`` with ``lam >= 0`` (a non-negative
    least-squares problem on the Gram matrix). Otherwise ``g_w* != 0`` and the bisection runs.

    Deviations from the authors' code: they solve the dual with scipy SLSQP from the uniform start (about 1e-6
    accuracy) and add 1e-8 guards to ``|g0|``, ``rho`` and ``|g_w|``; this solver is exact to rounding and has no
    guards. In the ``g_w* = 0`` case the authors' guards return about g0, which may conflict with a task. The
    DGR/Auto-Lambda trainers multiply the returned direction by K (``overwrite_grad``) to match the scale of a
    summed loss; this class returns the direction itself.
    """

    def __init__(self, c: float = 0.4, rescale: bool = True) -> None:
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        self.c = float(c)
        self.rescale = bool(rescale)

    def _solve(self, A: Tensor, losses: Tensor | None, eps: float) -> Tensor:
        K = A.shape[0]
        mean_w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        w = _cagrad_dual(A, mean_w, self.c, eps)
        return w / (1.0 + self.c**2) if self.rescale else w


def _cagrad_dual(A: Tensor, mean_w: Tensor, c: float, eps: float) -> Tensor:
    """Coefficients of CAGrad's raw direction ``g0 + rho g_w* / |g_w*|`` (see ``CAGrad``)."""
    K = A.shape[0]
    scale = float(A.diagonal().max())
    if scale <= 0.0 or c == 0.0:
        return mean_w
    A = A / scale  # the coefficients are invariant to the scale of G
    a = A @ mean_w  # a_i = <g_i, g0>
    g0_sq = float(mean_w @ a)
    level = _zero_level(K, eps)
    if g0_sq <= level * _rounding_scale(A, mean_w):
        # The gradients cancel: g0 is zero to rounding, and so is rho = c |g0|, and the ball is the point g0. A
        # bisection on [0, 1 / rho] would only resolve rounding noise, on shifted Gram matrices made of it.
        return mean_w
    rho = c * math.sqrt(g0_sq)

    def shifted(s: float) -> Tensor:  # Gram matrix of the points g_i + s g0
        return A + s * (a[:, None] + a[None, :]) + s * s * g0_sq

    def excess(w: Tensor, s: float) -> float:  # |x(t)| - t with t = rho s
        return math.sqrt(max(float(w @ A @ w), 0.0)) - rho * s

    w_min_norm = _min_norm_weights(A)
    x0_sq = float(w_min_norm @ A @ w_min_norm)
    x0_floor = level * _rounding_scale(A, w_min_norm)
    zero_in_hull = x0_sq <= x0_floor
    if zero_in_hull:
        # Zero is in the hull, so min_k <g_k, d> <= 0 for every d. If the ball reaches the cone of directions that
        # conflict with no task, 0 is the optimum (dual: g_w* = 0) and every such direction in the ball attains it:
        # take the one nearest to g0. Otherwise the optimum is negative and g_w* != 0: the bisection finds it.
        lam = _cone_projection_weights(A, a, g0_sq)
        if float(lam @ A @ lam) <= rho * rho:
            return mean_w + lam

    # The root t* = |g_w*| lies in [|x0|, 1] (x0: the min-norm point; |x(t)| >= |x0| for every t, and |x(t)| <= 1,
    # the largest |g_i|); below the rounding level of |x0| a t cannot be told from 0. The bisection is geometric, so
    # that it resolves t* relative to its own size however small it is next to the largest gradient.
    lo, hi = max(math.sqrt(max(x0_sq, x0_floor)), _T_FLOOR) / rho, 1.0 / rho
    w_lo, w_hi = _min_norm_weights(shifted(lo)), _min_norm_weights(shifted(hi))
    if zero_in_hull and not excess(w_lo, lo) > 0.0:
        # t* is below the rounding level of |g_w|: this is g_w* = 0, where the ball reaches the cone to rounding.
        return mean_w + _cone_projection_weights(A, a, g0_sq)
    key_lo, key_hi = _support_key(w_lo), _support_key(w_hi)
    w = w_hi
    for step in range(_BISECTION_STEPS + 1):
        if key_lo == key_hi:
            exact = _cagrad_on_support(A, a, g0_sq, rho, list(key_lo), lo, hi, shifted)
            if exact is not None:
                w = exact
                break
        mid = math.sqrt(lo) * math.sqrt(hi)
        if step == _BISECTION_STEPS or not lo < mid < hi:
            break  # t is resolved to float64 rounding: keep the minimiser at the upper end
        w_mid = _min_norm_weights(shifted(mid))
        if excess(w_mid, mid) > 0.0:
            lo, key_lo = mid, _support_key(w_mid)
        else:
            hi, key_hi, w = mid, _support_key(w_mid), w_mid
    gw_sq = float(w @ A @ w)
    # Rounding in |g_w|^2 is relative to (sum_i w_i |g_i|)^2, not to the largest |g_i|^2: a dual optimum on tasks much
    # smaller than the largest is far above rounding even when its |g_w|^2 is tiny next to max_i |g_i|^2.
    if gw_sq <= level * _rounding_scale(A, w):
        return mean_w + _cone_projection_weights(A, a, g0_sq)  # g_w* = 0 after all, missed above by rounding
    return mean_w + (rho / math.sqrt(gw_sq)) * w


def _cone_projection_weights(A: Tensor, a: Tensor, g0_sq: float) -> Tensor:
    """``lam >= 0`` minimising ``|g0 + sum_k lam_k g_k|^2`` (``A``: Gram matrix, ``a_k = <g_k, g0>``), so that
    ``g0 + G^T lam`` is the projection of g0 onto the cone ``{d: <g_k, d> >= 0}`` (Moreau). Lawson-Hanson active
    set on the Gram matrix, least-squares sub-problems. A constraint enters when its cosine with the current
    direction d is below ``-_GAP_TOL`` beyond the rounding of ``<g_k, d>``; like Wolfe's solver it stops when an
    iteration fails to decrease the objective by more than its rounding floor, and after at most ``_MAX_ITERS``
    iterations."""
    K = A.shape[0]
    norms = A.diagonal().clamp(min=0.0).sqrt()
    lam = A.new_zeros(K)
    passive = torch.zeros(K, dtype=torch.bool)
    objective = 0.0  # |g0 + G^T lam|^2 - |g0|^2
    for _ in range(_MAX_ITERS):
        grad = A @ lam + a  # <g_k, d> for d = g0 + G^T lam
        d_norm = math.sqrt(max(g0_sq + objective, 0.0))
        rounding = K * _EPS64 * (math.sqrt(max(g0_sq, 0.0)) + float(lam @ norms))  # in <g_k, d> / |g_k|
        entering = ~passive & (grad < -(_GAP_TOL * d_norm + rounding) * norms)
        if not bool(entering.any()):
            break
        trial, trial_passive = lam.clone(), passive.clone()
        trial_passive[int(torch.where(entering, grad, math.inf).argmin())] = True
        while True:
            idx = trial_passive.nonzero().flatten()
            z = torch.linalg.lstsq(A[idx][:, idx], -a[idx, None], rcond=_RCOND, driver="gelsd").solution[:, 0]
            if bool((z > 0).all()):
                trial.zero_()
                trial[idx] = z
                break
            lam_idx = _step_to_first_zero(trial[idx], z)
            trial.zero_()
            trial[idx] = lam_idx
            trial_passive = trial > 0
        trial_objective = float(trial @ A @ trial + 2.0 * (a @ trial))
        if not trial_objective < objective - _rounding_floor(A, trial):
            break
        lam, passive, objective = trial, trial_passive, trial_objective
    return lam


def _cagrad_on_support(A: Tensor, a: Tensor, g0_sq: float, rho: float, support: list[int], lo: float, hi: float,
                       shifted: Callable[[float], Tensor]) -> Tensor | None:
    """The dual optimum if its active set is ``support`` and its t / rho lies in ``[lo, hi]``, else None."""
    idx = torch.tensor(support)
    n = len(support)
    rhs = A.new_zeros(n + 1, 2)
    rhs[n, 0] = 1.0
    rhs[:n, 1] = -a[idx]
    A_s = A[idx][:, idx]
    base, slope = _bordered_solve(A_s, rhs).T  # weights on the support: base + s * slope
    q0, q1, q2 = float(base @ A_s @ base), float(base @ A_s @ slope), float(slope @ A_s @ slope)
    # |x(s)|^2 = (rho s)^2  <=>  (q2 - rho^2) s^2 + 2 q1 s + q0 = 0
    qa, qb = q2 - rho * rho, 2.0 * q1
    if abs(qa) <= 1e-15 * max(abs(qb), abs(q0), 1.0):
        roots = [-q0 / qb] if qb != 0.0 else []
    else:
        disc = qb * qb - 4.0 * qa * q0
        if disc < 0.0:
            return None
        root_disc = math.sqrt(disc)
        # the numerically stable pair of roots
        q = -0.5 * (qb + math.copysign(root_disc, qb))
        roots = [q / qa] + ([q0 / q] if q != 0.0 else [])
    slack = 1e-12 * hi
    inside = [s for s in roots if lo - slack <= s <= hi + slack]
    if not inside:
        return None
    s = min(max(max(inside), 0.0), hi)
    ws = base + s * slope
    if bool((ws < -1e-12).any()):
        return None
    ws = ws.clamp(min=0.0)
    w = A.new_zeros(A.shape[0])
    w[idx] = ws / ws.sum()
    if float(_kkt_violations(shifted(s), w, 1e-10)[1].max()) > 0.0:
        return None
    return w


class IMTLG(_GramAggregator):
    """IMTL-G, the gradient half of impartial multi-task learning (Liu et al., "Towards Impartial Multi-task
    Learning", ICLR 2021).

    Finds ``d = sum_k alpha_k g_k`` with ``sum_k alpha_k = 1`` whose projections on every unit task gradient
    ``u_k = g_k / |g_k|`` are equal. The paper's closed form,
    ``alpha_{2:K} = g_1 U^T (D U^T)^{-1}`` with rows ``D_k = g_1 - g_k`` and ``U_k = u_1 - u_k``, is the same linear
    system; here it is solved in the bordered form ``alpha^T B = lambda 1^T, 1^T alpha = 1`` with
    ``B_kj = <g_k, u_j>`` built from the Gram matrix, by least squares (SVD).

    Deviations from the authors' code: no official code was released; the public versions (LibMTL, Nash-MTL's
    ``weight_methods.py``, copied by the DGR code) invert ``D U^T`` and add 1e-8 I when it is singular. Least squares
    returns the exact solution when the system is regular and the minimum-norm one when it is singular (for instance
    K > P). Tasks whose gradient is exactly zero have no unit direction: they are left out of the conditions and get
    ``alpha_k = 0`` (their gradient contributes nothing anyway); the public versions return NaN there. IMTL-L (the
    learnable loss scales of the same paper) is not part of this class.
    """

    def _solve(self, A: Tensor, losses: Tensor | None, eps: float) -> Tensor:
        K = A.shape[0]
        norms = A.diagonal().clamp(min=0.0).sqrt()
        live = (norms > 0).nonzero().flatten()
        n = live.numel()
        if n == 0:
            return torch.full((K,), 1.0 / K, dtype=torch.float64)
        A_live = A[live][:, live] / float(norms.max()) ** 2
        B = A_live / (norms[live] / float(norms.max()))[None, :]  # B[k, j] = <g_k, u_j>, scaled
        system = A.new_zeros(n + 1, n + 1)
        system[:n, :n] = B.T
        system[:n, n] = -1.0
        system[n, :n] = 1.0
        rhs = A.new_zeros(n + 1, 1)
        rhs[n] = 1.0
        alpha = torch.linalg.lstsq(system, rhs, rcond=_RCOND, driver="gelsd").solution[:n, 0]
        w = A.new_zeros(K)
        w[live] = alpha
        return w


class MGDA(_GramAggregator):
    """MGDA, the multiple-gradient descent algorithm as in Sener and Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018.

    The update is the min-norm point of the convex hull of the task gradients, ``sum_k w_k g_k`` with
    ``w = argmin_{w in simplex} |sum_k w_k g_k|^2``, solved exactly (Wolfe's min-norm-point algorithm on the Gram
    matrix). Its KKT conditions: ``<g_k, d> >= |d|^2`` for all k, with equality where ``w_k > 0``. The solver's
    tolerances are relative to ``|d|^2`` (or to the rounding level of d when d is the result of cancellation) and its
    sub-problems are scaled to unit-diagonal systems, so it stays exact to rounding whatever the ratio of the
    gradients' norms.

    ``normalization`` (the authors' ``gradient_normalizers``): the weights are found on ``g_k / n_k`` with ``n_k`` = 1
    ("none"), ``|g_k|`` ("l2"), ``L_k`` ("loss") or ``L_k |g_k|`` ("loss+"); as in their training script, which
    back-propagates ``sum_k w_k L_k``, the update then combines the *unnormalised* gradients, ``sum_k w_k g_k``.
    "loss" and "loss+" need positive ``losses``. A zero gradient keeps n_k = 1 under "l2"/"loss+" (it stays zero).

    Deviations from the authors' code: they run Frank-Wolfe (``MinNormSolver``: closed form for pairs as the start,
    at most 250 iterations, stop at a change of 1e-5); this solver is exact to rounding. With "none" the update is
    exactly the min-norm point; the paper's MGDA-UB variant (gradients w.r.t. the shared representation instead of
    the parameters) is a choice of what the rows of ``G`` are, not of this class.
    """

    def __init__(self, normalization: Literal["none", "l2", "loss", "loss+"] = "none") -> None:
        if normalization not in ("none", "l2", "loss", "loss+"):
            raise ValueError(f"normalization must be 'none', 'l2', 'loss' or 'loss+', got {normalization!r}")
        self.normalization = normalization

    def _solve(self, A: Tensor, losses: Tensor | None, eps: float) -> Tensor:
        norms = A.diagonal().clamp(min=0.0).sqrt()
        if self.normalization in ("loss", "loss+"):
            if losses is None:
                raise ValueError(f"MGDA(normalization={self.normalization!r}) needs the task losses: pass losses=")
            if not bool((losses > 0).all()):
                raise ValueError(f"losses must be positive to normalise MGDA by them, got {losses.tolist()}")
        if self.normalization == "none":
            return _min_norm_weights(A)
        if self.normalization == "l2":
            scale = norms
        elif self.normalization == "loss":
            scale = losses
        else:
            scale = losses * norms
        scale = torch.where(norms > 0, scale, torch.ones_like(scale))
        return _min_norm_weights(A / (scale[:, None] * scale[None, :]))


class NashMTL(_GramAggregator):
    """Nash-MTL, multi-task learning as a bargaining game (Navon et al., "Multi-Task Learning as a Bargaining Game",
    ICML 2022).

    The update ``d = sum_k alpha_k g_k`` with ``alpha > 0`` solving ``G G^T alpha = 1 / alpha``: the Nash bargaining
    solution, for which ``<g_k, d> = 1 / alpha_k`` for every task and ``|d| = sqrt(K)``. ``alpha`` is the unique
    minimiser of the strictly convex, self-concordant ``alpha^T A alpha / 2 - sum_k log alpha_k``; it is found by damped
    Newton steps (``1 / (1 + lambda)`` while the Newton decrement lambda >= 1/4, then full steps), which stay in
    ``alpha > 0`` and converge quadratically. The problem is invariant to scaling each task: with ``D = diag(|g_k|)``
    and ``U`` the Gram matrix of the unit gradients ``g_k / |g_k|``, ``alpha = D^-1 beta`` where ``U beta = 1 / beta``;
    Newton runs on U, so a task whose gradient dominates the others' costs no accuracy.
    ``max_norm`` (optional) scales ``alpha`` down so that ``|d| <= max_norm``.

    No solution exists when zero lies in the convex hull of the gradients (no direction helps every task; the
    objective is unbounded): the update is then zero. Zero lies in the hull of the gradients iff it lies in the hull
    of the unit gradients; "zero lies in the hull" means, to rounding, that the min-norm point u of the unit
    gradients has ``|u|^2 <= 8 K eps`` (eps: the unit roundoff of G's compute dtype), the rounding level of a
    combination of unit vectors.
    A task whose gradient is exactly zero has no stake in the bargaining: it is left out (``alpha_k = 0``) and the
    others bargain.

    Deviations from the authors' code: they approximate the solution with a sequence of convex programs (cvxpy/ECOS,
    at most 20, stopping at a residual of 1e-3), warm-started from the previous step, optionally updating alpha only
    every few steps (``update_weights_every``), and clip the gradient norm of the shared parameters to ``max_norm``
    (1.0 in their experiments, which rescales the norm-sqrt(K) update) with ``clip_grad_norm_``. This class is
    stateless and exact to rounding; the zero-in-hull case and zero gradients (where their solver fails and keeps the
    previous alpha) are handled as described. They scale the Gram matrix by its Frobenius norm, which leaves a
    dominated task's rows at the rounding level; here it is scaled per task, as above. ``max_norm`` here bounds the
    norm of this update, which equals the clipped norm when G holds all shared parameters.
    """

    def __init__(self, max_norm: float | None = None) -> None:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be None or a finite number > 0, got {max_norm!r}")
        self.max_norm = max_norm

    def _solve(self, A: Tensor, losses: Tensor | None, eps: float) -> Tensor:
        K = A.shape[0]
        alpha = A.new_zeros(K)
        live = (A.diagonal() > 0).nonzero().flatten()
        if live.numel() == 0:
            return alpha
        norms = A.diagonal()[live].sqrt()
        # The solution is invariant to scaling each task: with D = diag(|g_k|) and A = D U D (U: the Gram matrix of
        # the unit gradients), A alpha = 1 / alpha iff beta = D alpha solves U beta = 1 / beta. On U every task has
        # the same scale, so neither the zero-in-hull test nor Newton's steps depend on the ratio of the norms.
        U = A[live][:, live] / (norms[:, None] * norms[None, :])
        U.diagonal().fill_(1.0)
        w = _min_norm_weights(U)
        if float(w @ U @ w) <= _zero_level(K, eps) * _rounding_scale(U, w):  # that scale is (sum_k w_k)^2 = 1
            return alpha
        beta = U.new_ones(live.numel())  # the exact solution when the gradients are orthogonal
        previous_sq = math.inf
        for _ in range(_MAX_ITERS):
            grad = U @ beta - 1.0 / beta
            step = torch.linalg.solve(U + torch.diag(beta.pow(-2)), grad)
            decrement_sq = float(grad @ step)
            # In the full-step phase (decrement < 1/4) the decrement falls quadratically in exact arithmetic, so
            # one that does not fall is at the rounding floor.
            if decrement_sq <= _NEWTON_TOL or (decrement_sq < 0.0625 and not decrement_sq < previous_sq):
                break
            previous_sq = decrement_sq
            decrement = math.sqrt(decrement_sq)
            beta = beta - (step if decrement < 0.25 else step / (1.0 + decrement))
        alpha[live] = beta / norms
        if self.max_norm is not None:
            norm = math.sqrt(max(float(alpha @ A @ alpha), 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha


class GradDrop(Aggregator):
    """GradDrop, gradient sign dropout (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient
    Sign Dropout", NeurIPS 2020).

    Per element p of the gradient, the sign purity ``P_p = (1 + sum_k g_kp / sum_k |g_kp|) / 2`` is the share of the
    positive gradient mass; with ``U_p ~ Uniform[0, 1)`` the positive parts are kept where ``U_p < P_p`` and the
    negative parts elsewhere: ``out_p = sum_k max(g_kp, 0)`` or ``sum_k min(g_kp, 0)``. ``leak`` in [0, 1] mixes in the
    plain sum: ``leak * sum_k g_k + (1 - leak) * out`` (the paper's leak parameter, here one value for all tasks).
    ``reduction="mean"`` divides by K. Only the positive and negative sums over tasks are needed, so no K x P mask.

    How it is applied here, and how that deviates from the paper: the paper applies GradDrop to the gradient w.r.t.
    an *activation* A at the end of the shared trunk, where the gradients are first multiplied by ``sign(A)`` and
    summed over the batch to compute the purity, and the same mask is applied to every sample's activation gradient;
    the masked gradient then flows back into the trunk. Here it is applied element-wise to the K flattened *parameter*
    gradients, with no ``sign(A)`` factor and no batch dimension, which is what the CAGrad/Auto-Lambda code (and so
    the DGR code) does. That code uses ``reduction="mean"`` with a 1e-8 guard in the purity and multiplies by K
    afterwards (``overwrite_grad``), that is, it applies the sum; the comparison ``U * (pos - neg) < pos`` used here
    needs no guard.

    Randomness: ``U = torch.rand(P, generator=generator, device=G.device, dtype=float32 or float64)``; the generator
    must live on ``G``'s device (None: that device's global RNG).
    """

    def __init__(self, leak: float = 0.0, generator: torch.Generator | None = None,
                 reduction: Literal["sum", "mean"] = "sum") -> None:
        if not (isinstance(leak, (int, float)) and 0.0 <= leak <= 1.0):
            raise ValueError(f"leak must be a number in [0, 1], got {leak!r}")
        _check_generator(generator)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.leak = float(leak)
        self.generator = generator
        self.reduction = reduction

    def _aggregate(self, G: Tensor, losses: Tensor | None) -> Tensor:
        gen_device = None if self.generator is None else self.generator.device
        if gen_device is not None and (gen_device.type != G.device.type or
                                       gen_device.index not in (None, G.device.index)):
            raise ValueError(f"generator is on {self.generator.device} but G is on {G.device}: GradDrop draws one "
                             "uniform number per element of G's row on G's device")
        dtype = _compute_dtype(G.dtype)
        pos = G.clamp(min=0).sum(dim=0, dtype=dtype)
        neg = G.clamp(max=0).sum(dim=0, dtype=dtype)
        mass = pos - neg  # sum_k |g_k|: infinite or NaN exactly where a column holds a non-finite entry
        if not bool(torch.isfinite(mass).all()):
            _raise_nonfinite(G, "sum of absolute values over tasks")
        u = torch.rand(G.shape[1], generator=self.generator, device=G.device, dtype=dtype)
        # U < P with P = pos / mass, without dividing (mass = 0 only where every gradient is zero)
        out = torch.where(u * mass < pos, pos, neg)
        if self.leak:
            out = self.leak * (pos + neg) + (1.0 - self.leak) * out
        if self.reduction == "mean":
            out = out / G.shape[0]
        return _in_dtype_of(out, G, "sum over tasks of the kept sign")
