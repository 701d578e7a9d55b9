"""AdaTask: task-wise adaptive learning rates (Yang et al., AAAI 2023; DESIGN.md section 5).

The optimizer keeps, for every *shared* parameter θ and every task k, its own moments m_k and v_k (fp32 whatever θ's
dtype; fp64 for fp64 θ) and one step counter, and updates

    adam:     m_k = b1 m_k + (1 - b1) g_k,   v_k = b2 v_k + (1 - b2) g_k^2,
              θ -= lr * sum_k mhat_k / (sqrt(vhat_k) + eps)          (mhat, vhat bias-corrected)
    rmsprop:  v_k = b2 v_k + (1 - b2) g_k^2,  θ -= lr * sum_k g_k / (sqrt(v_k) + eps)
    adagrad:  v_k = v_k + g_k^2,              θ -= lr * sum_k g_k / (sqrt(v_k) + eps)

The sum over tasks (not the mean) is the published rule. Task-specific parameters (``task_params``) take ordinary
Adam on their ``.grad``, which is exactly the rule above with K = 1.

One step of a param group is one call into a backend for each (device, dtype) bucket of its parameters:

- ``cuda``: ``csrc/cuda/adatask.cu``, one launch over a pointer table of every tensor of the bucket.
- ``triton``: ``dgr_fast/kernels/adatask.py``, the same pointer-table scheme (also runs in the CPU interpreter).
- ``cpp``: ``csrc/cpu/adatask.cpp``, one ``at::parallel_for`` over chunks of every tensor of the bucket.
- ``torch``: ``torch._foreach_*`` ops, K passes (the portable path, defined here).
- ``reference``: ``dgr_fast/reference/adatask.py``, task by task and tensor by tensor.

Each fused backend reads θ, the K gradients and the 2K moments once and writes θ and the moments once.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from dgr_fast.backends import BACKENDS, resolve_backend
from dgr_fast.reference.adatask import VARIANTS, adatask_step_reference

_IMPLEMENTED: tuple[str, ...] = ("cuda", "triton", "cpp", "torch", "reference")
_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "cuda": _LOW_PRECISION,
    "triton": _LOW_PRECISION,
    "cpp": _LOW_PRECISION + (torch.float64,),
}
_VARIANT_CODE = {name: i for i, name in enumerate(VARIANTS)}


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the moments kept for a parameter of ``param_dtype``: fp32, or fp64 for fp64 parameters."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@dataclass
class StepArgs:
    """One step of a (device, dtype) bucket, as every backend takes it.

    ``params`` T tensors; ``grads[t]`` ``[K, n_t]`` (inner stride 1, θ's dtype); moments ``[K, n_t]`` contiguous in
    ``state_dtype`` (``exp_avgs`` empty unless adam); ``coef`` ``[T, 2]`` fp64 (step size lr / bc1, sqrt(bc2));
    ``steps`` the T step counters (already advanced); ``variant`` the index in ``VARIANTS``; ``grad_scale`` /
    ``found_inf`` ``[1]`` fp32 or None; ``au_sums`` ``[T, K]`` fp32, written (each task's squared update share).
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    coef: torch.Tensor
    steps: list[torch.Tensor]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    variant: int
    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None
    au_sums: torch.Tensor | None


def _skip_on_host(a: StepArgs) -> bool:
    """The portable backends read ``found_inf`` on the host (a sync): True (and AU shares zeroed) to skip the step."""
    if a.found_inf is None or not bool(a.found_inf.item()):
        return False
    if a.au_sums is not None:
        a.au_sums.zero_()
    return True


def _step_torch(a: StepArgs) -> None:
    """The portable backend: matches ``dgr_fast.reference.adatask.adatask_step_reference`` with foreach ops."""
    if _skip_on_host(a):
        return
    num_tasks = a.grads[0].shape[0]
    math_dtype = a.exp_avg_sqs[0].dtype
    theta = [p.view(-1) if p.dtype == math_dtype else p.view(-1).to(math_dtype) for p in a.params]
    if a.weight_decay != 0.0:
        torch._foreach_mul_(theta, 1.0 - a.lr * a.weight_decay)
    coef = a.coef.to(math_dtype)
    neg_step_size = list((-coef[:, 0]).unbind())
    bc2_sqrt = list(coef[:, 1].unbind())
    inv_scale = None if a.grad_scale is None else a.grad_scale.to(math_dtype).reshape(()).reciprocal()
    total: list[torch.Tensor] | None = None
    for k in range(num_tasks):
        g = [gr[k] for gr in a.grads]
        if inv_scale is not None:
            g = torch._foreach_mul(g, inv_scale)
        elif g[0].dtype != math_dtype:
            g = [x.to(math_dtype) for x in g]
        v = [s[k] for s in a.exp_avg_sqs]
        # The same ops in the same order as torch.optim.Adam's single-tensor path (lerp_, mul_ + addcmul_, sqrt,
        # div, add, then addcdiv's (value * m) / denom), so that K = 1 reproduces it bit for bit.
        if a.variant == _VARIANT_CODE["adam"]:
            m = [s[k] for s in a.exp_avgs]
            torch._foreach_lerp_(m, g, 1.0 - a.beta1)
            torch._foreach_mul_(v, a.beta2)
            torch._foreach_addcmul_(v, g, g, value=1.0 - a.beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            numer = m
        else:
            if a.variant == _VARIANT_CODE["rmsprop"]:
                torch._foreach_mul_(v, a.beta2)
                torch._foreach_addcmul_(v, g, g, value=1.0 - a.beta2)
            else:
                torch._foreach_addcmul_(v, g, g, value=1.0)
            denom = torch._foreach_sqrt(v)
            numer = g
        torch._foreach_add_(denom, a.eps)
        u = torch._foreach_mul(numer, neg_step_size)
        torch._foreach_div_(u, denom)
        if a.au_sums is not None:
            a.au_sums[:, k] = torch.stack([x.double().square().sum() for x in u]).float()
        if total is None:
            total = u
        else:
            torch._foreach_add_(total, u)
    assert total is not None
    torch._foreach_add_(theta, total)
    for p, t in zip(a.params, theta):
        if t.data_ptr() != p.data_ptr():
            p.view(-1).copy_(t)


def _step_reference(a: StepArgs) -> None:
    if _skip_on_host(a):
        return
    shares = adatask_step_reference(
        [p.view(-1) for p in a.params],
        a.grads,
        a.exp_avgs if a.exp_avgs else [torch.empty_like(v) for v in a.exp_avg_sqs],
        a.exp_avg_sqs,
        [int(s.item()) for s in a.steps],
        lr=a.lr,
        beta1=a.beta1,
        beta2=a.beta2,
        eps=a.eps,
        weight_decay=a.weight_decay,
        variant=VARIANTS[a.variant],
        inv_grad_scale=1.0 if a.grad_scale is None else 1.0 / float(a.grad_scale.item()),
    )
    if a.au_sums is not None:
        a.au_sums.copy_(torch.stack(shares))


def _extension_step(namespace: str) -> Callable[[StepArgs], None]:
    """The ``cpp``/``cuda`` step: the extension's op ``torch.ops.<namespace>.adatask_step_`` (same schema in both)."""
    def step(a: StepArgs) -> None:
        getattr(torch.ops, namespace).adatask_step_(
            a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.coef, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay,
            a.variant, a.grad_scale, a.found_inf, a.au_sums,
        )  # fmt: skip

    return step


def _step_triton(a: StepArgs) -> None:
    from dgr_fast.kernels.adatask import adatask_step_triton

    adatask_step_triton(a)


def adatask_backend(device: torch.device | str, dtype: torch.dtype = torch.float32, backend: str | None = None) -> str:
    """The backend ``AdaTask(..., backend=backend)`` steps parameters of ``device``/``dtype`` with (resolved as the
    step resolves it: ``$DGR_FAST_BACKEND`` when ``backend`` is None; raises as the step would)."""
    return resolve_backend("adatask_step", backend, torch.device(device), dtype, _IMPLEMENTED, _DTYPES)


def _load_extension(backend: str) -> None:
    # Importing the extension module runs its TORCH_LIBRARY registrations; resolve_backend has already checked
    # that it imports.
    if backend == "cpp":
        import dgr_fast._C  # noqa: F401
    elif backend == "cuda":
        import dgr_fast._C_cuda  # noqa: F401


_STEP: dict[str, Callable[..., None]] = {
    "cuda": _extension_step("dgr_fast_cuda"),
    "triton": _step_triton,
    "cpp": _extension_step("dgr_fast_cpu"),
    "torch": _step_torch,
    "reference": _step_reference,
}


def _check_hyper(where: str, lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where}{name} must be a real number, got {type(value).__name__}")
        if not value >= 0.0:  # also refuses NaN
            raise ValueError(f"{where}{name} must be >= 0, got {value}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair of numbers, got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise TypeError(f"{where}betas[{i}] must be a real number, got {type(b).__name__}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}betas[{i}] must be in [0, 1), got {b}")


def _as_groups(params: Any, name: str, shared: bool) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{name} must be an iterable of tensors or of param-group dicts, got a single tensor")
    items = list(params)
    if not items:
        raise ValueError(f"{name} is empty")
    if all(isinstance(x, dict) for x in items):
        return [{**g, "shared": shared} for g in items]
    for i, x in enumerate(items):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor (or every entry a param-group dict), got {type(x).__name__}")
    return [{"params": items, "shared": shared}]


class AdaTask(Optimizer):
    """Task-wise adaptive learning rates for multi-task learning (Yang et al., AAAI 2023).

    Args:
        params: the *shared* parameters (an iterable of tensors, or of param-group dicts with their own
            ``lr``/``betas``/``eps``/``weight_decay``). Each keeps per-task moments ``[num_tasks, *θ.shape]``.
        num_tasks: K >= 1.
        lr, betas, eps: as in Adam. ``rmsprop`` uses ``betas[1]`` as the decay of its EMA of g^2 and ignores
            ``betas[0]``; ``adagrad`` ignores both.
        weight_decay: decoupled (AdamW style: θ *= 1 - lr * weight_decay before the update), for shared and task
            parameters alike. An extension: the paper has none (the authors' code accepts and ignores it).
        variant: ``"adam"`` (the paper's main rule), ``"rmsprop"`` or ``"adagrad"``.
        task_params: task-specific parameters (heads): ordinary Adam (AdamW with ``weight_decay`` > 0) on ``.grad``.
        backend: ``None`` (fastest available; ``$DGR_FAST_BACKEND``), or one of ``cuda``, ``triton``, ``cpp``,
            ``torch``, ``reference``; a named backend that cannot run raises ``RuntimeError``.
        track_au: keep each task's AU per shared parameter (see :meth:`task_dominance`).
        au_beta: decay of the AU exponential average.

    Gradients: ``step(task_grads=...)`` takes one ``[num_tasks, *θ.shape]`` tensor (or ``None``: θ is not updated)
    per shared parameter in order, or one ``[num_tasks, P]`` tensor over all P shared elements (split into views,
    no copy); ``step()`` uses what :meth:`backward` computed. Gradients are cast to θ's dtype when they differ.

    Mixed precision: fp32/bf16/fp16 (and fp64) parameters with fp32 (fp64) moments. With ``torch.amp.GradScaler``,
    ``scaler.step(opt)`` hands the scale and the found-inf flag to ``step``, or pass ``grad_scale``/``found_inf``
    (1-element fp32 tensors on the parameters' device) yourself: gradients are unscaled inside the step and the whole
    step (moments, θ, step counter, AU) is skipped when ``found_inf`` is non-zero. The ``cpp``/``triton``/``cuda``
    backends do this without a host sync; ``torch``/``reference`` read the flag on the host. While a scale is active
    the per-task gradients are also checked for inf/NaN (one extra read of them), because GradScaler only inspects
    ``.grad``; a skip caused by them alone does not lower the scaler's scale.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        num_tasks: int,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variant: str = "adam",
        task_params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
        backend: str | None = None,
        track_au: bool = False,
        au_beta: float = 0.99,
    ) -> None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral):
            raise TypeError(f"num_tasks must be an int, got {type(num_tasks).__name__}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if not isinstance(track_au, bool):
            raise TypeError(f"track_au must be a bool, got {type(track_au).__name__}")
        if isinstance(au_beta, bool) or not isinstance(au_beta, numbers.Real) or not 0.0 <= au_beta < 1.0:
            raise ValueError(f"au_beta must be a number in [0, 1), got {au_beta!r}")
        _check_hyper("", lr, betas, eps, weight_decay)
        self.num_tasks = int(num_tasks)
        self.variant = variant
        self.backend = backend
        self.track_au = track_au
        self.au_beta = float(au_beta)
        groups = _as_groups(params, "params", shared=True)
        if task_params is not None:
            groups += _as_groups(task_params, "task_params", shared=False)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, shared=True)
        self._pending: tuple[torch.Tensor, dict[torch.Tensor, torch.Tensor]] | None = None
        super().__init__(groups, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; ``shared=False`` in it makes its parameters task-specific (ordinary Adam)."""
        merged = {**self.defaults, **param_group}
        _check_hyper(f"param group {len(self.param_groups)}: ", merged["lr"], merged["betas"], merged["eps"],
                     merged["weight_decay"])  # fmt: skip
        if not isinstance(merged["shared"], bool):
            raise TypeError(f"param group {len(self.param_groups)}: shared must be a bool")
        super().add_param_group(param_group)

    # ---------------------------------------------------------------------------------------------------------- #
    def shared_params(self) -> list[torch.Tensor]:
        """The shared parameters, in the order ``task_grads`` follows."""
        return [p for g in self.param_groups if g["shared"] for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` of every parameter and the per-task gradients :meth:`backward` accumulated."""
        super().zero_grad(set_to_none)
        self._pending = None

    def backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        features: torch.Tensor | None = None,
        mode: str = "loop",
        retain_graph: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        """Compute per-task gradients of the shared parameters (kept for :meth:`step`) and the gradient of the sum
        of ``losses`` w.r.t. ``task_params`` (accumulated into ``.grad``). Repeated calls accumulate, like
        ``Tensor.backward``; :meth:`zero_grad` clears both.

        Args:
            losses: ``num_tasks`` scalar losses (a sequence, or a ``[num_tasks]`` tensor).
            features, mode, retain_graph, chunk_size: as :func:`dgr_fast.mtl.per_task_grads`. ``mode="loop"`` takes
                K backward passes through the whole graph, the task parameters included (the authors' code takes
                K + 1); ``mode="batched"`` one batched pass through the encoder plus K small ones above ``features``.
        """
        from dgr_fast.mtl.grads import _check_losses, _per_task_grads

        loss_list = _check_losses(losses)
        if len(loss_list) != self.num_tasks:
            raise ValueError(f"losses: expected {self.num_tasks} losses (num_tasks), got {len(loss_list)}")
        shared = [p for p in self.shared_params() if p.requires_grad]
        heads = [p for g in self.param_groups if not g["shared"] for p in g["params"] if p.requires_grad]
        if not shared:
            raise ValueError("params: no shared parameter requires grad")
        flat, head_grads = _per_task_grads(loss_list, shared, features, mode, retain_graph, chunk_size, heads)
        for p, g in zip(heads, head_grads):
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g)
        if self._pending is not None:
            self._pending[0].add_(flat)
            return
        views: dict[torch.Tensor, torch.Tensor] = {}
        offset = 0
        for p in shared:
            views[p] = flat[:, offset : offset + p.numel()].view(self.num_tasks, *p.shape)
            offset += p.numel()
        self._pending = (flat, views)

    # ---------------------------------------------------------------------------------------------------------- #
    def _resolve_task_grads(self, task_grads: Any) -> list[torch.Tensor | None]:
        shared = self.shared_params()
        K = self.num_tasks
        if task_grads is None:
            if self._pending is None:
                raise ValueError("task_grads: no per-task gradients; pass task_grads=... or call opt.backward(losses)")
            views = self._pending[1]
            return [views.get(p) for p in shared]
        if isinstance(task_grads, torch.Tensor):
            total = sum(p.numel() for p in shared)
            if task_grads.dim() != 2 or tuple(task_grads.shape) != (K, total):
                raise ValueError(f"task_grads: a single tensor must be [num_tasks, P] = [{K}, {total}], "
                                 f"got {list(task_grads.shape)}")  # fmt: skip
            if task_grads.stride(1) != 1:
                raise ValueError("task_grads: a [num_tasks, P] tensor must be contiguous along P")
            out: list[torch.Tensor | None] = []
            offset = 0
            for p in shared:
                out.append(task_grads[:, offset : offset + p.numel()].view(K, *p.shape))
                offset += p.numel()
            grads = out
        else:
            grads = list(task_grads)
            if len(grads) != len(shared):
                raise ValueError(f"task_grads: expected one entry per shared parameter ({len(shared)}), got {len(grads)}")
        for i, (p, g) in enumerate(zip(shared, grads)):
            if g is None:
                continue
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"task_grads[{i}] must be a tensor or None, got {type(g).__name__}")
            if not g.is_floating_point():
                raise TypeError(f"task_grads[{i}] must be floating point, got {g.dtype}")
            if tuple(g.shape) != (K, *p.shape):
                raise ValueError(f"task_grads[{i}] must have shape [num_tasks, *param.shape] = {[K, *p.shape]}, "
                                 f"got {list(g.shape)}")  # fmt: skip
            if g.device != p.device:
                raise ValueError(f"task_grads[{i}] is on {g.device} but its parameter is on {p.device}")
        return grads

    @staticmethod
    def _check_amp_tensor(name: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.numel() != 1 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 1-element floating tensor, got shape {list(t.shape)} {t.dtype}")

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        task_grads: Sequence[torch.Tensor | None] | torch.Tensor | None = None,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> Any:
        """One AdaTask step (shared parameters) and one Adam step (task parameters).

        Args:
            closure: re-evaluates the model; it should call :meth:`backward`. Its result is returned.
            task_grads: see the class docstring; ``None`` uses what :meth:`backward` accumulated.
            grad_scale: the AMP loss scale (gradients are divided by it inside the step), 1-element fp32.
            found_inf: non-zero skips the whole step, without a host sync on the fused backends.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        self._check_amp_tensor("grad_scale", grad_scale)
        self._check_amp_tensor("found_inf", found_inf)
        grads = self._resolve_task_grads(task_grads)
        for gi, group in enumerate(self.param_groups):
            if group["shared"]:
                continue
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError(f"param group {gi}: AdaTask does not take sparse gradients")
        # Bucket by (device, dtype) and pick every bucket's backend before anything changes, so that a backend that
        # cannot run raises with the optimizer untouched.
        work = []
        shared_iter = iter(grads)
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
            for p in group["params"]:
                if group["shared"]:
                    g = next(shared_iter)
                    if g is None:
                        continue
                    g2 = g.reshape(self.num_tasks, -1)
                else:
                    if p.grad is None:
                        continue
                    g2 = p.grad.reshape(1, -1)
                if g2.dtype != p.dtype:
                    g2 = g2.to(p.dtype)
                if g2.shape[1] > 1 and g2.stride(1) != 1:
                    g2 = g2.contiguous()
                ps, gs = buckets.setdefault((p.device, p.dtype), ([], []))
                ps.append(p)
                gs.append(g2)
            for (device, dtype), (ps, gs) in buckets.items():
                backend = adatask_backend(device, dtype, self.backend)
                work.append((group, ps, gs, device, dtype, backend))
        if grad_scale is not None or found_inf is not None:
            found_inf = self._fold_task_grad_nonfinite(grads, found_inf)
        for group, ps, gs, device, dtype, backend in work:
            self._bucket_step(group, ps, gs, device, dtype, backend, grad_scale, found_inf)
        return loss

    def _fold_task_grad_nonfinite(self, grads: list[torch.Tensor | None], found_inf: torch.Tensor | None) -> torch.Tensor:
        present = [g for g in grads if g is not None]
        device = present[0].device if present else self.shared_params()[0].device
        flag = torch.zeros((), dtype=torch.float32, device=device)
        if present:
            flag = flag + (~torch.stack([torch.isfinite(g).all() for g in present]).all()).float()
        if found_inf is not None:
            flag = flag + found_inf.to(device=device, dtype=torch.float32).reshape(())
        return flag

    def _bucket_step(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        backend: str,
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> None:
        _load_extension(backend)
        shared = group["shared"]
        K = self.num_tasks if shared else 1
        adam = self.variant == "adam" or not shared
        sdt = state_dtype(dtype)
        states = []
        for p in params:
            st = self.state[p]
            if not st:
                shape = (K, *p.shape) if shared else tuple(p.shape)
                st["step"] = torch.zeros((), dtype=torch.float32, device=device)
                if adam:
                    st["exp_avg"] = torch.zeros(shape, dtype=sdt, device=device)
                st["exp_avg_sq"] = torch.zeros(shape, dtype=sdt, device=device)
                if shared and self.track_au:
                    st["au"] = torch.zeros(K, dtype=torch.float32, device=device)
            states.append(st)
        if found_inf is not None:
            found_inf = found_inf.to(device=device, dtype=torch.float32).reshape(1)
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, dtype=torch.float32).reshape(1)
        steps = [st["step"] for st in states]
        if found_inf is None:
            torch._foreach_add_(steps, 1.0)
        else:
            torch._foreach_add_(steps, (found_inf == 0).to(torch.float32).reshape(()))
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        s = torch.stack(steps).double()
        if adam:
            coef = torch.stack([lr / (1.0 - beta1**s), (1.0 - beta2**s).sqrt()], dim=1)
        else:
            coef = torch.stack([torch.full_like(s, lr), torch.ones_like(s)], dim=1)
        track = shared and self.track_au
        au_sums = torch.empty(len(params), K, dtype=torch.float32, device=device) if track else None
        _STEP[backend](StepArgs(
            params=[p.detach() for p in params],
            grads=grads,
            exp_avgs=[st["exp_avg"].view(K, -1) for st in states] if adam else [],
            exp_avg_sqs=[st["exp_avg_sq"].view(K, -1) for st in states],
            coef=coef.contiguous(),
            steps=steps,
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            variant=_VARIANT_CODE[self.variant] if shared else _VARIANT_CODE["adam"],
            grad_scale=grad_scale,
            found_inf=found_inf,
            au_sums=au_sums,
        ))
        if au_sums is not None:
            weight = torch.full((), 1.0 - self.au_beta, dtype=torch.float32, device=device)
            if found_inf is not None:
                weight = weight * (found_inf == 0).to(torch.float32).reshape(())
            torch._foreach_lerp_([st["au"] for st in states], list(au_sums.unbind(0)), [weight] * len(states))

    # ---------------------------------------------------------------------------------------------------------- #
    def task_dominance(self, model: torch.nn.Module | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The AU diagnostic of the AdaTask paper: which tasks dominate the updates of the shared parameters.

        AU_k of a parameter is the exponential average (decay ``au_beta``) of ``sum over its elements of
        (lr * u_k)^2``, the squared update task k contributes; rAU_k = AU_k / sum_j AU_j (zeros before any step).
        Needs ``track_au=True``.

        Args:
            model: names the parameters (``model.named_parameters()``); a layer is a parameter name up to its last
                dot (``"layer1.0.conv1"``). Without it, parameters are ``"shared.{i}"`` and layers are param groups.

        Returns:
            ``{"per_parameter": {name: rAU [num_tasks] fp32}, "per_layer": {layer: rAU [num_tasks] fp32}}``.
        """
        if not self.track_au:
            raise RuntimeError("task_dominance needs AdaTask(..., track_au=True)")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        names = {p: n for n, p in model.named_parameters()} if model is not None else {}
        per_param: dict[str, torch.Tensor] = {}
        per_layer_au: dict[str, torch.Tensor] = {}
        i = 0
        for gi, group in enumerate(self.param_groups):
            if not group["shared"]:
                continue
            for p in group["params"]:
                au = self.state[p]["au"].float() if "au" in self.state[p] else torch.zeros(self.num_tasks)
                au = au.cpu()
                name = names.get(p, f"shared.{i}")
                layer = name.rsplit(".", 1)[0] if p in names else f"group{gi}"
                per_param[name] = _relative(au)
                per_layer_au[layer] = per_layer_au.get(layer, torch.zeros(self.num_tasks)) + au
                i += 1
        return {"per_parameter": per_param, "per_layer": {k: _relative(v) for k, v in per_layer_au.items()}}

    # ---------------------------------------------------------------------------------------------------------- #
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The moments keep their fp32 dtype (torch's loader would cast them to the
        parameter's dtype), so a resumed run continues bit for bit."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")
        pairs = []
        for i, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"state_dict param group {i} has {len(sg['params'])} parameters, this one {len(g['params'])}")
            if sg.get("shared", True) != g["shared"]:
                raise ValueError(f"state_dict param group {i}: shared={sg.get('shared')} but this group has shared={g['shared']}")
            pairs += [(pid, p, g["shared"]) for pid, p in zip(sg["params"], g["params"])]
        saved_state = state_dict["state"]
        for pid, p, shared in pairs:
            if pid not in saved_state:
                continue
            want = (self.num_tasks, *p.shape) if shared else tuple(p.shape)
            for key in ("exp_avg", "exp_avg_sq"):
                t = saved_state[pid].get(key)
                if t is not None and tuple(t.shape) != want:
                    raise ValueError(f"state_dict: {key} of parameter {pid} has shape {list(t.shape)}, expected {list(want)}"
                                     " (different num_tasks, or a shared/task mix-up?)")  # fmt: skip
        super().load_state_dict({**state_dict, "state": {}})
        for pid, p, shared in pairs:
            if pid in saved_state:
                st = {k: v.to(device=p.device).clone() if isinstance(v, torch.Tensor) else v
                      for k, v in saved_state[pid].items()}  # fmt: skip
                if "step" in st:
                    st["step"] = torch.as_tensor(st["step"], dtype=torch.float32, device=p.device).reshape(())
                self.state[p] = st

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults, state and param_groups; the task count and variant go along.
        extra = {k: self.__dict__[k] for k in ("num_tasks", "variant", "backend", "track_au", "au_beta")}
        return {**super().__getstate__(), **extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pending = None  # per-task gradients belong to one backward pass, not to a saved optimizer


def _relative(au: torch.Tensor) -> torch.Tensor:
    total = au.sum()
    return au / total if total > 0 else torch.zeros_like(au)
