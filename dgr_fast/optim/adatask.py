"""AdaTask: task-wise adaptive learning rates (Yang et al., AAAI 2023; docs/DESIGN.md section 7).

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

Each fused backend reads θ, the K gradients and the 2K moments once and writes θ and the moments once. A
non-contiguous parameter (a transposed view, a channels-last weight) is stepped through a contiguous copy, copied back
after the step, on every backend alike: two more passes over that θ.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from dgr_fast.backends import BACKENDS, resolve_backend
from dgr_fast.distributed import check_process_group, sync_for
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

    ``params`` T contiguous tensors; ``grads[t]`` ``[K, n_t]`` (inner stride 1, θ's dtype); moments ``[K, n_t]``
    contiguous in ``state_dtype`` (``exp_avgs`` empty unless adam); ``coef`` ``[T, 2]`` fp64 (step size lr / bc1,
    sqrt(bc2)); ``steps`` the T step counters as they are after this step (the optimizer's own counters advance once
    the backend has returned); ``variant`` the index in ``VARIANTS``; ``grad_scale`` / ``found_inf`` ``[1]`` fp32 or
    None; ``au_sums`` ``[T, K]`` fp32, written (each task's squared update share).
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
    if a.found_inf is None or not torch.compiler.is_compiling():
        if not _skip_on_host(a):
            _foreach_step(a)
        return
    # Compiled, a host read of found_inf would break the graph: step, then put back what a skipped step leaves as it
    # was (inductor fuses the select into the step's own loops).
    skip = a.found_inf.reshape(()) != 0
    written = [*a.params, *a.exp_avgs, *a.exp_avg_sqs]
    kept = [t.clone() for t in written]
    _foreach_step(a)
    for t, old in zip(written, kept):
        t.copy_(torch.where(skip, old, t))
    if a.au_sums is not None:
        a.au_sums.masked_fill_(skip, 0.0)


def _foreach_step(a: StepArgs) -> None:
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
    if math_dtype != a.params[0].dtype:  # θ was stepped in a wider copy (the buckets share one dtype)
        for p, t in zip(a.params, theta):
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


def _op_args(a: StepArgs) -> tuple[Any, ...]:
    """``a`` in the order of the ``adatask_step_`` op schema, which the extensions' ops and the Triton op share."""
    return (a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.coef, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay,
            a.variant, a.grad_scale, a.found_inf, a.au_sums)  # fmt: skip


def _extension_step(namespace: str) -> Callable[[StepArgs], None]:
    """The ``cpp``/``cuda`` step: the extension's op ``torch.ops.<namespace>.adatask_step_``."""
    def step(a: StepArgs) -> None:
        getattr(torch.ops, namespace).adatask_step_(*_op_args(a))

    return step


def _step_triton(a: StepArgs) -> None:
    from dgr_fast.kernels import adatask as kernels

    launch = kernels.adatask_step_triton_op if torch.compiler.is_compiling() else kernels.adatask_step_triton
    launch(*_op_args(a))


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
        if not 0.0 <= value < math.inf:  # also refuses NaN
            raise ValueError(f"{where}{name} must be finite and >= 0, got {value}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair of numbers, got {betas!r}")
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise TypeError(f"{where}betas[{i}] must be a real number, got {type(b).__name__}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{where}betas[{i}] must be in [0, 1), got {b}")


_HYPER = ("lr", "betas", "eps", "weight_decay")
# The step counter is an fp32 tensor, as in torch.optim.Adam: integers above 2^24 are not exact in it.
_MAX_STEP = 2**24


def _step_value(where: str, step: Any) -> float:
    """The value of a saved step counter, which must be an integer in [0, 2^24], as a number or 1-element tensor."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype == torch.bool or step.is_complex() or step.layout != torch.strided:
            raise TypeError(f"{where}: step must be a number or a 1-element real tensor, got a {step.dtype} tensor "
                            f"of shape {list(step.shape)}")  # fmt: skip
        value = float(step.reshape(()).item())
    elif isinstance(step, numbers.Real) and not isinstance(step, bool):
        value = float(step)
    else:
        raise TypeError(f"{where}: step must be a number or a 1-element real tensor, got {type(step).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= _MAX_STEP and value == math.floor(value)):
        raise ValueError(f"{where}: step must be an integer in [0, 2^24], got {value}")
    return value


def _check_state_entry(
    where: str,
    entry: Any,
    keys: tuple[str, ...],
    what: str,
    moment_shape: tuple[int, ...],
    num_tasks: int,
    dtype: torch.dtype,
    device: torch.device | None,
) -> None:
    """Raise ValueError/TypeError (naming ``where`` and the key) unless ``entry`` is a state a step can take.

    An empty dict is a parameter that never stepped. Otherwise: exactly ``keys`` (``what`` says whose they are),
    dense moments of ``moment_shape`` in ``dtype``, ``au`` ``[num_tasks]`` fp32. ``device`` None checks a state being
    loaded (tensors anywhere, any step representation: ``_step_value`` checks its value); a device checks a state
    about to be stepped there: every tensor on it and contiguous, and the step the fp32 0-dim counter the optimizer
    keeps (its value is not read, which on a GPU would cost a sync).
    """
    if not isinstance(entry, dict):
        raise TypeError(f"{where}: a state must be a dict, got {type(entry).__name__}")
    if not entry:
        return
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; {what} keeps {list(keys)}")
    extra = [k for k in entry if k not in keys]
    if extra:
        raise ValueError(f"{where}: unexpected key(s) {extra}; {what} keeps {list(keys)}")
    for key in keys:
        t = entry[key]
        if key == "step":
            if device is None:
                _step_value(where, t)
            elif not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 0 and t.device == device):
                raise TypeError(f"{where}: step must be a 0-dim float32 tensor on {device}")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {key} must be a tensor, got {type(t).__name__}")
        want_shape, want_dtype = ((num_tasks,), torch.float32) if key == "au" else (moment_shape, dtype)
        if t.layout != torch.strided:
            raise TypeError(f"{where}: {key} must be a dense tensor, got layout {t.layout}")
        if tuple(t.shape) != want_shape:
            raise ValueError(f"{where}: {key} has shape {list(t.shape)}, expected {list(want_shape)}"
                             " (different num_tasks, or a shared/task mix-up?)")  # fmt: skip
        if t.dtype != want_dtype:
            raise TypeError(f"{where}: {key} has dtype {t.dtype}, expected {want_dtype}")
        if device is not None and (t.device != device or not t.is_contiguous()):
            raise ValueError(f"{where}: {key} must be a contiguous tensor on {device}, got one on {t.device}"
                             f"{'' if t.is_contiguous() else ' (non-contiguous)'}")  # fmt: skip


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


class _TaskGrads:
    """The per-task gradients of the shared parameters between :meth:`AdaTask.backward` and :meth:`AdaTask.step`.

    One object for the optimizer's life, changed in place and never rebound: a wrapper that forwards attribute
    reads to the optimizer (Lightning's ``LightningOptimizer``, whose own ``__dict__`` takes the writes) reaches the
    same gradients, so ``wrapper.backward(...)`` feeds the step that Lightning runs on the optimizer itself.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.flat: torch.Tensor | None = None  # [K, P] over the shared parameters that require grad
        self.views: dict[torch.Tensor, torch.Tensor] = {}
        self.unscaled = False  # AdaTask.unscale_ has divided them by a GradScaler's scale
        # step() has used the task parameters' .grad and zero_grad() has not run since: another backward() would
        # add the next batch to them.
        self.stepped = False


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
        process_group: under ``torch.distributed``, ``None`` (the default group) or a group: :meth:`backward`'s
            per-task gradients and the task parameters' gradients are averaged over the ranks (one flat buffer), and
            so are ``task_grads`` handed to :meth:`step` together with the task parameters' ``.grad`` (averaging
            gradients a caller has already averaged leaves them as they are, at the cost of the all-reduce);
            ``"local"``: no synchronisation.

    Gradients: ``step(task_grads=...)`` takes one ``[num_tasks, *θ.shape]`` tensor (or ``None``: θ is not updated)
    per shared parameter in order, or one ``[num_tasks, P]`` tensor over all P shared elements (split into views,
    no copy); ``step()`` uses what :meth:`backward` computed. Gradients are cast to θ's dtype when they differ.

    Mixed precision: fp32/bf16/fp16 (and fp64) parameters with fp32 (fp64) moments. With ``torch.amp.GradScaler``,
    ``scaler.step(opt)`` hands the scale and the found-inf flag to ``step``, or pass ``grad_scale``/``found_inf``
    (1-element fp32 tensors on the parameters' device) yourself: gradients are unscaled inside the step and the whole
    step (moments, θ, step counter, AU) is skipped when ``found_inf`` is non-zero. The ``cpp``/``triton``/``cuda``
    backends do this without a host sync; ``torch``/``reference`` read the flag on the host. While a scale is active
    the per-task gradients are also checked for inf/NaN (one extra read of them), because GradScaler only inspects
    ``.grad``; a skip caused by them alone does not lower the scaler's scale. A ``grad_scale`` that is zero, negative,
    inf or NaN would turn every parameter into NaN: on the CPU the step refuses it (``ValueError``, read on the host
    at no cost); on a GPU reading it would cost a host sync, so there such a scale sets ``found_inf`` instead and the
    step is skipped. To clip or read the gradients first, call :meth:`unscale_` (not ``scaler.unscale_(opt)``, which
    cannot reach the per-task gradients; a step after it raises) and then ``scaler.step(opt)``: an inf in the
    per-task gradients then lowers the scale too.

    Without task parameters GradScaler finds no ``.grad`` in the param groups, and hands ``found_inf`` as the sum of
    no inf checks (the int 0): the step then relies on its own check of the per-task gradients. torch's
    ``scaler.update()`` needs at least one recorded inf check, so it works when the same scaler also steps an
    optimizer whose parameters have a ``.grad`` (the heads' Adam, say); with AdaTask alone it raises "No inf checks
    were recorded prior to update".

    A step that raises leaves the parameters and the whole state (counters, moments, AU) as they were: everything
    that could fail is checked before anything changes.

    ``torch.compile(opt.step, fullgraph=True)`` traces the step without a graph break on the ``torch``, ``cpp``,
    ``triton`` and ``cuda`` backends (the fused ones as opaque in-place ops); ``reference`` reads values on the host
    and breaks the graph. Compiled, ``found_inf`` is read on the device on every backend, and a CPU ``grad_scale``
    that is not positive and finite skips the step rather than raising.

    Wrappers: methods called on an object that forwards attribute reads to this optimizer (Lightning's
    ``LightningOptimizer``, which ``self.optimizers()`` returns) act on this optimizer's gradients, so
    ``backward``/``clip_grad_norm_``/``zero_grad`` on the wrapper and its ``step()`` fit together.
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
        process_group: object = None,
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
        check_process_group(process_group)
        self.process_group = process_group
        groups = _as_groups(params, "params", shared=True)
        if task_params is not None:
            groups += _as_groups(task_params, "task_params", shared=False)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, shared=True)
        self._task_grads = _TaskGrads()
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

    def _state_layout(self, p: torch.Tensor, shared: bool) -> tuple[tuple[str, ...], str, tuple[int, ...]]:
        """The keys of ``p``'s state, whose they are (for messages), and the shape of its moments."""
        keys = ("step",) + (("exp_avg",) if self.variant == "adam" or not shared else ()) + ("exp_avg_sq",)
        if shared:
            keys += ("au",) if self.track_au else ()
            what = f"a shared parameter of variant {self.variant!r}{', track_au=True' if self.track_au else ''}"
            return keys, what, (self.num_tasks, *p.shape)
        return keys, "a task parameter (Adam)", tuple(p.shape)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` of every parameter and the per-task gradients :meth:`backward` accumulated."""
        super().zero_grad(set_to_none)
        self._task_grads.clear()

    def backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        features: torch.Tensor | None = None,
        mode: str = "loop",
        retain_graph: bool = False,
        chunk_size: int | None = None,
        accumulate: bool = False,
    ) -> None:
        """Compute per-task gradients of the shared parameters (kept for :meth:`step`, which uses them up) and the
        gradient of the sum of ``losses`` w.r.t. ``task_params`` (added to ``.grad``); :meth:`zero_grad` clears both.

        Gradients never add up across steps silently: with ``accumulate=False`` (the default) a call raises
        ``RuntimeError`` while the per-task gradients of an earlier call are neither stepped nor cleared, or while
        the task parameters' ``.grad`` still hold the gradients a step has used. ``accumulate=True`` adds to what is
        there, as ``Tensor.backward`` does: micro-batches before one step (scale each loss by 1 / micro-batches for
        the mean). Under ``torch.distributed`` every call averages over the ranks: the sum of the averages is the
        average of the sums.

        Args:
            losses: ``num_tasks`` scalar losses (a sequence, or a ``[num_tasks]`` tensor).
            features, mode, retain_graph, chunk_size: as :func:`dgr_fast.mtl.per_task_grads`. ``mode="loop"`` takes
                K backward passes through the whole graph, the task parameters included (the authors' code takes
                K + 1); ``mode="batched"`` one batched pass through the encoder plus K small ones above ``features``.
            accumulate: add to the gradients already there instead of refusing them.
        """
        from dgr_fast.mtl.grads import _check_losses, _per_task_grads

        loss_list = _check_losses(losses)
        if len(loss_list) != self.num_tasks:
            raise ValueError(f"losses: expected {self.num_tasks} losses (num_tasks), got {len(loss_list)}")
        shared = [p for p in self.shared_params() if p.requires_grad]
        heads = [p for g in self.param_groups if not g["shared"] for p in g["params"] if p.requires_grad]
        if not shared:
            raise ValueError("params: no shared parameter requires grad")
        held = self._task_grads
        if not accumulate:
            if held.flat is not None:
                raise RuntimeError("backward: the per-task gradients of an earlier backward() were neither used by "
                                   "step() nor cleared by zero_grad(); call one of them first, or pass "
                                   "accumulate=True to add to them (micro-batches)")
            if held.stepped and any(p.grad is not None for p in heads):
                raise RuntimeError("backward: the task parameters' .grad still hold the gradients the last step() "
                                   "used; call zero_grad() first, or pass accumulate=True to add to them")
        elif held.unscaled:
            raise RuntimeError("backward: the per-task gradients held are unscaled (unscale_) and these would be "
                               "scaled: step() first")
        flat, head_grads = _per_task_grads(loss_list, shared, features, mode, retain_graph, chunk_size, heads,
                                           sync_for(self.process_group))
        for p, g in zip(heads, head_grads):
            if p.grad is None:
                p.grad = g.to(p.dtype, copy=True)  # a view of the per-task buffer, which .grad must not keep alive
            else:
                p.grad.add_(g)
        if held.flat is not None and held.views.keys() == set(shared):
            held.flat.add_(flat)
            return
        if held.flat is not None:
            raise RuntimeError("backward: accumulate=True, but the shared parameters that require grad changed since "
                               "the gradients held were computed")
        offset = 0
        for p in shared:
            held.views[p] = flat[:, offset : offset + p.numel()].view(self.num_tasks, *p.shape)
            offset += p.numel()
        held.flat = flat

    def _task_param_grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.param_groups if not g["shared"] for p in g["params"] if p.grad is not None]

    def unscale_(self, scaler: torch.amp.GradScaler) -> None:
        """``scaler.unscale_(self)`` for the per-task gradients too (GradScaler sees only ``.grad``): call it
        instead, before :meth:`clip_grad_norm_` or reading the gradients, then ``scaler.step(opt)`` as usual.

        An inf/NaN in the per-task gradients is recorded where ``scaler.update()`` finds it, so it lowers the scale
        and a model with no task parameters needs no other optimizer's inf checks.
        """
        scaler.unscale_(self)
        held = self._task_grads
        if not scaler.is_enabled() or held.flat is None:
            return
        # GradScaler keeps its scale and its per-optimizer inf records private; this is what its unscale_ does to a
        # .grad: the inverse in fp64 rounded to fp32, and an inf check that writes into the device's record.
        inv_scale = scaler._scale.double().reciprocal().float().to(held.flat.device)
        found = scaler._per_optimizer_states[id(self)]["found_inf_per_device"]
        flag = found.setdefault(held.flat.device, torch.zeros((), dtype=torch.float32, device=held.flat.device))
        torch._amp_foreach_non_finite_check_and_unscale_([held.flat], flag, inv_scale)
        held.unscaled = True

    @torch.no_grad()
    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        per_task: bool = False,
        error_if_nonfinite: bool = False,
    ) -> torch.Tensor:
        """Clip the gradients :meth:`step` will use, as ``torch.nn.utils.clip_grad_norm_`` does: the per-task
        gradients of the shared parameters that :meth:`backward` holds and the task parameters' ``.grad``.

        ``per_task=False``: one norm over all of them (every task's gradient of every shared parameter and every
        task parameter's gradient), each multiplied by ``min(1, max_norm / (norm + 1e-6))``; returns that norm
        (0-dim). ``per_task=True``: task k's gradients of the shared parameters are clipped by their own norm; the
        task parameters' ``.grad`` (the gradient of the sum of the losses, which is no one task's) by theirs;
        returns ``[num_tasks + 1]``: the tasks' norms, then the task parameters' (0 without any).

        Call it after the last :meth:`backward` (under ``torch.distributed`` those gradients are already the ranks'
        average, so every rank clips alike) and, with a GradScaler, after :meth:`unscale_`. Gradients handed to
        ``step(task_grads=...)`` are not held here: clip them yourself (and, under ``torch.distributed``, average
        them first: step averages them after any clipping).
        """
        if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not max_norm >= 0.0:
            raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}")
        if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real) or not norm_type > 0.0:
            raise ValueError(f"norm_type must be a number > 0 (or inf), got {norm_type!r}")
        flat = self._task_grads.flat
        heads = self._task_param_grads()
        device = flat.device if flat is not None else heads[0].device if heads else self.shared_params()[0].device

        def norm_of(tensors: list[torch.Tensor]) -> torch.Tensor:
            if not tensors:
                return torch.zeros((), dtype=torch.float32, device=device)
            norms = [torch.linalg.vector_norm(t, norm_type).to(device) for t in tensors]
            return torch.linalg.vector_norm(torch.stack(norms), norm_type)

        if per_task:
            task_norms = (torch.linalg.vector_norm(flat, norm_type, dim=1) if flat is not None
                          else torch.zeros(self.num_tasks, dtype=torch.float32, device=device))  # fmt: skip
            norms = torch.cat([task_norms.to(device), norm_of(heads).reshape(1)])
        else:
            norms = norm_of(([flat] if flat is not None else []) + heads)
        if error_if_nonfinite and not bool(torch.isfinite(norms).all()):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite, so they cannot "
                               "be clipped; error_if_nonfinite=False to go on")
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        if per_task:
            if flat is not None:
                flat.mul_(coef[: self.num_tasks, None].to(flat.device))
            for g in heads:
                g.mul_(coef[-1].to(g.device))
        else:
            for g in ([flat] if flat is not None else []) + heads:
                g.mul_(coef.to(g.device))
        return norms

    # ---------------------------------------------------------------------------------------------------------- #
    def _resolve_task_grads(self, task_grads: Any) -> list[torch.Tensor | None]:
        shared = self.shared_params()
        K = self.num_tasks
        if task_grads is None:
            # No backward() since the last step: shared parameters without gradients skip, as torch.optim's do.
            return [self._task_grads.views.get(p) for p in shared]
        if isinstance(task_grads, torch.Tensor):
            if task_grads.layout != torch.strided:
                raise TypeError(f"task_grads must be dense (AdaTask takes no sparse gradients), not {task_grads.layout}")
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
            if g.layout != torch.strided:
                raise TypeError(f"task_grads[{i}] must be dense (AdaTask takes no sparse gradients), not {g.layout}")
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
            task_grads: see the class docstring; ``None`` uses up what :meth:`backward` computed (without it the
                shared parameters are skipped, as torch.optim skips parameters whose ``.grad`` is None).
            grad_scale: the AMP loss scale (gradients are divided by it inside the step), 1-element fp32, > 0 and
                finite: a CPU one that is not raises ``ValueError``, one on another device skips the step (no sync).
            found_inf: non-zero skips the whole step, without a host sync on the fused backends.

        Raises ``ValueError``/``TypeError`` (bad gradients, parameters or state) with nothing changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
            # GradScaler sets found_inf to the sum of its per-device inf checks of the param groups' .grad; with no
            # .grad anywhere (no task parameters) that is sum([]), the int 0: nothing found, the per-task gradients
            # are checked below.
            if isinstance(found_inf, numbers.Real) and not isinstance(found_inf, bool) and found_inf == 0:
                found_inf = None
        self._check_amp_tensor("grad_scale", grad_scale)
        self._check_amp_tensor("found_inf", found_inf)
        # Compiled, the host read would break the graph: a bad scale then skips the step, as on a GPU.
        if grad_scale is not None and grad_scale.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(grad_scale.reshape(()))
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"grad_scale must be positive and finite, got {value}")
        held = self._task_grads
        if task_grads is None and held.flat is not None:
            if held.unscaled and grad_scale is not None:
                raise ValueError("grad_scale: the per-task gradients are unscaled already (unscale_)")
            # GradScaler.step after scaler.unscale_(opt) hands no scale: it unscaled the .grad it can see, not these.
            if not held.unscaled and grad_scale is None and "found_inf" in vars(self):
                raise RuntimeError("scaler.unscale_(opt) unscaled the task parameters' .grad only; call "
                                   "opt.unscale_(scaler) instead, which unscales the per-task gradients too")
        grads = self._resolve_task_grads(task_grads)  # checked before any collective: ranks must agree on shapes
        sync = sync_for(self.process_group)
        if sync is not None and task_grads is not None:
            # Gradients computed outside backward() are this rank's (per_task_grads is local by default): averaged
            # in a copy (one [K, P] buffer stays one buffer), the caller's tensors left as they are.
            task_grads = task_grads.clone() if isinstance(task_grads, torch.Tensor) else [
                None if g is None else g.clone() if isinstance(g, torch.Tensor) else g for g in task_grads]
            head_grads = self._task_param_grads()
            shared_grads = [task_grads] if isinstance(task_grads, torch.Tensor) else [
                g for g in task_grads if isinstance(g, torch.Tensor)]
            sync.all_reduce_mean_(shared_grads + head_grads)
            grads = self._resolve_task_grads(task_grads)
        # Check every parameter that steps and its state, bucket by (device, dtype) and pick every bucket's backend
        # before anything changes, so that a step that raises leaves the optimizer and the parameters untouched.
        work = []
        shared_iter = iter(grads)
        for gi, group in enumerate(self.param_groups):
            shared = group["shared"]
            buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
            for j, p in enumerate(group["params"]):
                where = f"param group {gi} parameter {j}"
                if shared:
                    g = next(shared_iter)
                    if g is None:
                        continue
                    g2 = g.reshape(self.num_tasks, -1)
                else:
                    if p.grad is None:
                        continue
                    if p.grad.layout != torch.strided:
                        raise TypeError(f"{where}: AdaTask does not take sparse gradients, got a {p.grad.layout} .grad")
                    g2 = p.grad.reshape(1, -1)
                if not p.is_floating_point():
                    raise TypeError(f"{where}: AdaTask steps floating-point parameters, got {p.dtype}")
                st = self.state.get(p)  # .get: the defaultdict would add an entry
                if st:
                    keys, what, shape = self._state_layout(p, shared)
                    _check_state_entry(f"state of {where}", st, keys, what, shape, self.num_tasks, state_dtype(p.dtype),
                                       p.device)  # fmt: skip
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
            found_inf = self._fold_nonfinite(grads, found_inf, grad_scale)
        for group, ps, gs, device, dtype, backend in work:
            self._bucket_step(group, ps, gs, device, dtype, backend, grad_scale, found_inf)
        if task_grads is None:
            held.clear()
        held.stepped = True
        return loss

    def _fold_nonfinite(
        self, grads: list[torch.Tensor | None], found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None
    ) -> torch.Tensor:
        """``found_inf``, plus 1 for an inf/NaN in a per-task gradient or a ``grad_scale`` that is not > 0 and
        finite: device ops, no host sync."""
        present = [g for g in grads if g is not None]
        device = present[0].device if present else self.shared_params()[0].device
        flag = torch.zeros((), dtype=torch.float32, device=device)
        if present:
            flag = flag + (~torch.stack([torch.isfinite(g).all() for g in present]).all()).float()
        if found_inf is not None:
            flag = flag + found_inf.to(device=device, dtype=torch.float32).reshape(())
        if grad_scale is not None:
            s = grad_scale.to(device=device, dtype=torch.float32).reshape(())
            flag = flag + (~(torch.isfinite(s) & (s > 0))).float()
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
            advance: float | torch.Tensor = 1.0
        else:
            advance = (found_inf == 0).to(torch.float32).reshape(())
        new_steps = torch.stack(steps) + advance
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        s = new_steps.double()
        if adam:
            coef = torch.stack([lr / (1.0 - beta1**s), (1.0 - beta2**s).sqrt()], dim=1)
        else:
            coef = torch.stack([torch.full_like(s, lr), torch.ones_like(s)], dim=1)
        track = shared and self.track_au
        au_sums = torch.empty(len(params), K, dtype=torch.float32, device=device) if track else None
        # Every backend takes θ as one flat run of memory in the moments' (row-major) element order.
        thetas = [p.detach() if p.is_contiguous() else p.detach().contiguous() for p in params]
        _STEP[backend](StepArgs(
            params=thetas,
            grads=grads,
            exp_avgs=[st["exp_avg"].view(K, -1) for st in states] if adam else [],
            exp_avg_sqs=[st["exp_avg_sq"].view(K, -1) for st in states],
            coef=coef.contiguous(),
            steps=list(new_steps.unbind()),
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
        for p, theta in zip(params, thetas):
            if not p.is_contiguous():
                p.detach().copy_(theta)
        torch._foreach_add_(steps, advance)
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
        """Restore a :meth:`state_dict`, all of it checked first: one that fails a check raises ``ValueError`` or
        ``TypeError`` naming the param group or parameter and the key, with the optimizer unchanged.

        Checked: the param groups (their count and sizes, ``shared``, and ``lr``/``betas``/``eps``/``weight_decay``
        by the constructor's rules), that the state belongs to parameters the groups list, and every state entry:
        exactly the keys this optimizer's variant keeps for a shared (``au`` too with ``track_au``) or a task
        parameter, moments of shape ``[num_tasks, *θ.shape]`` (shared) or ``θ.shape`` (task) in ``state_dtype``,
        ``au`` ``[num_tasks]`` fp32, ``step`` an integer in [0, 2^24]. The tensors are copied to their parameter's
        device; the moments keep their fp32 dtype (torch's loader would cast them to the parameter's dtype), so a
        resumed run continues bit for bit. Load-state-dict hooks run as in torch: pre-hooks before the checks.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        for key, kind in (("state", dict), ("param_groups", (list, tuple))):
            if key not in state_dict:
                raise ValueError(f"state_dict: missing key {key!r}")
            if not isinstance(state_dict[key], kind):
                raise TypeError(f"state_dict: {key} must be a {'dict' if kind is dict else 'list'}, "
                                f"got {type(state_dict[key]).__name__}")  # fmt: skip
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")
        pairs = []
        for i, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict param group {i}"
            if not isinstance(sg, dict):
                raise TypeError(f"{where} must be a dict, got {type(sg).__name__}")
            missing = [k for k in ("params", "shared") + _HYPER if k not in sg]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}")
            if not isinstance(sg["params"], (list, tuple)):
                raise TypeError(f"{where}: params must be a list of parameter ids, got {type(sg['params']).__name__}")
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"{where} has {len(sg['params'])} parameters, this one {len(g['params'])}")
            if sg["shared"] is not g["shared"]:
                raise ValueError(f"{where}: shared={sg['shared']!r} but this group has shared={g['shared']}")
            _check_hyper(f"{where}: ", sg["lr"], sg["betas"], sg["eps"], sg["weight_decay"])
            pairs += [(pid, p, g["shared"], i) for pid, p in zip(sg["params"], g["params"])]
        ids = [pid for pid, _, _, _ in pairs]
        if not all(isinstance(pid, Hashable) for pid in ids):
            raise TypeError("state_dict: param_groups list an unhashable parameter id")
        if len(set(ids)) != len(ids):
            raise ValueError("state_dict: param_groups list a parameter id more than once")
        listed = set(ids)
        unknown = [pid for pid in saved_state if pid not in listed]
        if unknown:
            raise ValueError(f"state_dict: state of parameter id(s) {unknown[:5]} that no param group lists")
        for pid, p, shared, gi in pairs:
            if pid in saved_state:
                keys, what, shape = self._state_layout(p, shared)
                _check_state_entry(f"state_dict: state of parameter {pid!r} (param group {gi})", saved_state[pid], keys,
                                   what, shape, self.num_tasks, state_dtype(p.dtype), None)  # fmt: skip
        # Everything checked: build the new state and groups aside, then swap them in as torch's loader does.
        state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for pid, p, _, _ in pairs:
            if pid not in saved_state:
                continue
            state[p] = {
                k: torch.tensor(_step_value("", v), dtype=torch.float32, device=p.device) if k == "step"
                else v.to(device=p.device, memory_format=torch.contiguous_format, copy=True)
                for k, v in saved_state[pid].items()
            }  # fmt: skip
        groups = []
        for sg, g in zip(saved_groups, self.param_groups):
            ng = copy.deepcopy({k: v for k, v in sg.items() if k != "params"})
            ng["params"] = g["params"]
            if "param_names" in g and "param_names" not in ng:
                ng["param_names"] = g["param_names"]
            groups.append(ng)
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        # torch's repr lists each group's hyper-parameters; the optimizer-wide options go on its first line.
        options = (f"num_tasks={self.num_tasks}, variant={self.variant!r}, backend={self.backend!r}, "
                   f"track_au={self.track_au}, au_beta={self.au_beta}, process_group={self.process_group!r}")
        groups = super().__repr__().partition("\n")[2]
        return f"{type(self).__name__} ({options}\n{groups}"

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults, state and param_groups; the task count and variant go along.
        extra = {k: self.__dict__[k] for k in ("num_tasks", "variant", "backend", "track_au", "au_beta",
                                               "process_group")}
        return {**super().__getstate__(), **extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Per-task gradients belong to a backward pass, not to a saved optimizer. Cleared in place when the object
        # exists (load_state_dict comes here): a wrapper may hold it.
        if "_task_grads" in self.__dict__:
            self._task_grads.clear()
        else:
            self._task_grads = _TaskGrads()
        self.__dict__.setdefault("process_group", None)  # pickled before the option existed


def _relative(au: torch.Tensor) -> torch.Tensor:
    total = au.sum()
    return au / total if total > 0 else torch.zeros_like(au)
