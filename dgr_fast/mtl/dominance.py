"""Task dominance: each task's share of the updates of the shared parameters (the AdaTask paper's AU and rAU).

Yang et al. (AAAI 2023, arXiv 2211.15055) measure how much each task moves a shared parameter by AU, the
exponentially decaying average of the squared update that task contributes, and its relative form rAU. For a
shared element e and task k, after every optimizer step t with task k's share ``u_k(e)`` of the update:

    AU_k(e) <- beta AU_k(e) + (1 - beta) u_k(e)^2,          rAU_k(e) = AU_k(e) / sum_j AU_j(e)

``beta`` defaults to 0.99, the decay ``AdaTask(track_au=True)`` uses (its ``au_beta``); the authors' published code
has no AU measurement to take the paper's value from. AU starts at zero and has no bias correction, which the ratio
would cancel anyway. The shares, by optimizer, given task k's part ``c_k`` of the
shared gradient the optimizer stepped on (``sum_k c_k`` is ``.grad`` less what belongs to no task):

- ``AdaTask`` (adam variant): ``u_k = lr mhat_k / (sqrt(vhat_k) + eps)``, task k's own term of the published rule,
  read from the optimizer's per-task moments after the step; no gradient is needed. The rmsprop/adagrad variants
  take ``lr g_k / (sqrt(v_k) + eps)`` with ``g_k`` the per-task gradients handed to :meth:`TaskDominance.observe`.
  The per-tensor sums equal what ``AdaTask(track_au=True)`` keeps.
- ``torch.optim.Adam`` / ``AdamW`` (one first moment of the summed gradient): the first moment is linear in the
  gradients, so it splits into per-task moments ``m_k = b1 m_k + (1 - b1) c_k`` that sum to Adam's own; each is
  divided by the *shared* denominator, Adam's ``sqrt(vhat) + eps`` (``max_exp_avg_sq`` with amsgrad):
  ``u_k = lr mhat_k / (sqrt(vhat) + eps)``. This is the split the paper's argument rests on (one task's large
  gradients fill the shared denominator and shrink the others' shares); the shares sum to Adam's update less its
  weight decay.
- ``torch.optim.SGD``: per-task momentum buffers ``b_k`` that follow torch's rule (``b_k = c_k`` on the first step,
  then ``mu b_k + (1 - dampening) c_k``), ``u_k = lr b_k`` (``lr (c_k + mu b_k)`` with nesterov); the paper has no
  SGD case, this is the exact split of a linear rule.

What belongs to no task is left out of every share: weight decay, and DGR's penalty gradient in the weighting and
aggregator paths (``TaskSAM``'s included), which the DGR code adds after the method's own gradient (with ``AdaTask``
the penalty is split as ``R = sum_k R_k`` into the task losses, so it rides in the task shares). rAU is relative
among the tasks.

Levels: per *element* (the paper's "parameter": its rule is element-wise), per *tensor* and per *layer* (a
parameter's name up to its last dot, so ``encoder.0.weight`` and ``encoder.0.bias`` are layer ``encoder.0``). A tensor
or layer has two rAUs: ``"mean"``, the mean over its elements of their rAU (elements with no update yet left out),
every parameter counting once as in the paper's per-parameter measure; and ``"sum"``, rAU of the summed AU, which
weighs each element by the size of its updates. The two differ where a few elements take most of a layer's update
(a test model: 0.583 / 0.417 by ``"mean"`` against 0.618 / 0.382 by ``"sum"``); :func:`plot` shows ``"mean"``.

Cost: AU is one ``[K, n]`` state per tracked tensor (fp32; fp64 for fp64 parameters), or ``[K]`` with
``per_element=False`` (then only ``"sum"``); Adam and SGD with momentum add the per-task moment ``[K, n]``. Each
observed step is a few element-wise passes over ``[K, n]``. With ``AdaTask`` that is all. With Adam or SGD the
per-task parts ``c_k`` come from per-task gradients: an aggregator's step (``MTLStep`` or ``TaskSAM``) computes them
and hands them to :meth:`TaskDominance.step` through its ``observer``, so the split costs the aggregator's
coefficients once more (a random one's draws replayed), no backward pass; a loss weighting never computes them, so
the tracker takes them (``per_task_grads``: K more backward passes in ``grad_mode="loop"``). ``MetaMTL`` is not
covered: its shared gradient is the sum of the K outer gradients ``grad L_k(theta_k')``, which its step adds into
one buffer as it goes; no ``[K, P]`` of them exists for an observer to hand out, and keeping one would cost the
memory the step saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dgr_fast.mtl.aggregators import Aggregator, GradDrop, LinearAggregator
from dgr_fast.mtl.grads import _check_losses, per_task_grads
from dgr_fast.mtl.sam import TaskSAM
from dgr_fast.mtl.scales import aggregator_scale
from dgr_fast.mtl.step import MTLStep
from dgr_fast.optim.adatask import AdaTask, _relative, state_dtype

LEVELS = ("element", "tensor", "layer")
REDUCTIONS = ("mean", "sum")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name up to the last dot (``"encoder.0.weight"`` -> ``"encoder.0"``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


class _Tracked:
    """One tracked tensor: its AU, the per-task moment the optimizer's split needs, the last step seen."""

    def __init__(self, name: str, param: Tensor, num_tasks: int, per_element: bool) -> None:
        self.name, self.param, self.layer = name, param, layer_of(name)
        dtype = state_dtype(param.dtype)
        self.au = torch.zeros((num_tasks, param.numel()) if per_element else (num_tasks,), dtype=dtype,
                              device=param.device)
        self.moment: Tensor | None = None  # [K, n]: Adam's per-task first moments or SGD's per-task buffers
        self.step = 0.0


class TaskDominance:
    """Each task's share of the updates of the shared parameters, as AU and rAU (see the module docstring).

    Args:
        params: the shared parameters with their names, ``(name, tensor)`` pairs or a mapping (for example
            ``model.encoder.named_parameters(prefix="encoder")``), in the order the per-task gradients follow.
        optimizer: what steps them: ``AdaTask``, ``torch.optim.Adam``/``AdamW`` or ``torch.optim.SGD``. Adam and
            SGD must not have stepped these parameters yet (their moments could not be split by task).
        num_tasks: K.
        beta: the decay of AU, in [0, 1).
        per_element: keep AU per element ``[K, n]`` (needed for the ``"element"`` level and the ``"mean"``
            reduction) or only per tensor ``[K]``.

    Use :meth:`step` in place of ``MTLStep.step`` or ``TaskSAM.step``, or call :meth:`observe` after each
    ``optimizer.step()``.
    """

    def __init__(
        self,
        params: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer,
        num_tasks: int,
        *,
        beta: float = 0.99,
        per_element: bool = True,
    ) -> None:
        pairs = list(params.items() if isinstance(params, Mapping) else params)
        if not pairs:
            raise ValueError("params is empty")
        if not isinstance(optimizer, (AdaTask, torch.optim.Adam, torch.optim.SGD)):
            raise TypeError(f"optimizer must be AdaTask, torch.optim.Adam/AdamW or torch.optim.SGD, "
                            f"got {type(optimizer).__name__}")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if isinstance(optimizer, AdaTask) and optimizer.num_tasks != num_tasks:
            raise ValueError(f"num_tasks is {num_tasks} but the AdaTask optimizer has {optimizer.num_tasks}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for name, p in pairs:
            if not isinstance(p, Tensor):
                raise TypeError(f"params[{name!r}] must be a tensor, got {type(p).__name__}")
            if id(p) not in groups:
                raise ValueError(f"params[{name!r}] is not stepped by the optimizer")
            if isinstance(optimizer, AdaTask) and not groups[id(p)]["shared"]:
                raise ValueError(f"params[{name!r}] is a task parameter of the AdaTask optimizer, not a shared one")
            if not isinstance(optimizer, AdaTask) and optimizer.state.get(p):
                raise ValueError(f"params[{name!r}] has been stepped already: attach the tracker before the "
                                 "optimizer's first step, whose moments could not be split by task afterwards")
        self.optimizer, self.num_tasks = optimizer, num_tasks
        self.beta, self.per_element = float(beta), bool(per_element)
        self._groups = groups
        self._tracked = [_Tracked(name, p, num_tasks, self.per_element) for name, p in pairs]
        self.steps = 0

    @property
    def params(self) -> list[Tensor]:
        """The tracked parameters, in the order of :meth:`observe`'s ``task_grads`` columns."""
        return [t.param for t in self._tracked]

    # ---------------------------------------------------------------------------------------------------------- #
    @torch.no_grad()
    def observe(self, task_grads: Tensor | None = None) -> None:
        """Account for the optimizer step that has just run.

        Args:
            task_grads: ``[K, P]``, P the tracked elements in order: task k's part ``c_k`` of the gradient the
                step used (for AdaTask's rmsprop/adagrad variants, its per-task gradients). None with AdaTask's
                adam variant, which needs none. A tensor that the step left unchanged (no ``.grad``, a step skipped
                by GradScaler: its step counter did not advance) is not counted.
        """
        needs_grads = not (isinstance(self.optimizer, AdaTask) and self.optimizer.variant == "adam")
        parts: list[Tensor | None] = [None] * len(self._tracked)
        if needs_grads:
            total = sum(t.param.numel() for t in self._tracked)
            if not isinstance(task_grads, Tensor) or tuple(task_grads.shape) != (self.num_tasks, total):
                got = list(task_grads.shape) if isinstance(task_grads, Tensor) else type(task_grads).__name__
                raise ValueError(f"task_grads must be [num_tasks, P] = [{self.num_tasks}, {total}] for "
                                 f"{type(self.optimizer).__name__}, got {got}")
            parts = list(task_grads.split([t.param.numel() for t in self._tracked], dim=1))
        for t, c in zip(self._tracked, parts):
            shares = self._shares(t, c)
            if shares is None:
                continue
            squared = shares.square()
            t.au.lerp_(squared if self.per_element else squared.sum(1, dtype=torch.float64).to(t.au.dtype),
                       1.0 - self.beta)
        self.steps += 1

    def _shares(self, t: _Tracked, c: Tensor | None) -> Tensor | None:
        """Task k's share of this step's update of ``t`` in row k (``[K, n]``, the state dtype), or None if the
        optimizer did not step it."""
        opt, group, K = self.optimizer, self._groups[id(t.param)], self.num_tasks
        state = opt.state.get(t.param, {})
        if isinstance(opt, torch.optim.SGD):
            if t.param.grad is None:
                return None
            c = c.to(t.au.dtype)
            lr, mu = float(group["lr"]), float(group["momentum"])
            if mu == 0.0:
                return lr * c
            if t.moment is None:  # torch's first step copies the gradient into the buffer, without dampening
                t.moment = c.clone()
            else:
                t.moment.mul_(mu).add_(c, alpha=1.0 - float(group["dampening"]))
            return lr * (c + mu * t.moment if group["nesterov"] else t.moment)
        if "step" not in state or float(state["step"]) == t.step:
            return None
        t.step = step = float(state["step"])
        lr, eps = float(group["lr"]), float(group["eps"])
        beta1, beta2 = group["betas"]
        if isinstance(opt, AdaTask):
            v = state["exp_avg_sq"].view(K, -1)
            if opt.variant != "adam":
                return lr * c.to(v.dtype) / (v.sqrt() + eps)
            m = state["exp_avg"].view(K, -1)
        else:
            if t.moment is None:
                t.moment = torch.zeros(K, t.param.numel(), dtype=t.au.dtype, device=t.param.device)
            m = t.moment.lerp_(c.to(t.au.dtype), 1.0 - beta1)
            v = state["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"].reshape(1, -1).to(m.dtype)
        # The same order of operations as torch's Adam: (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps).
        return m * (lr / (1.0 - beta1**step)) / (v.sqrt() / math.sqrt(1.0 - beta2**step) + eps)

    # ---------------------------------------------------------------------------------------------------------- #
    def step(self, runner: MTLStep | TaskSAM, losses: Sequence[Tensor] | Tensor | Callable[[], Any],
             **kwargs: Any) -> dict[str, Tensor | None]:
        """``runner.step(losses, **kwargs)`` (for ``TaskSAM``, ``losses`` is its closure), then :meth:`observe`
        with each task's part of what it stepped on.

        A loss weighting's part is ``w_k g_k``, ``w_k`` the gradient of the step's total loss w.r.t. loss k (hooks
        on the losses: the weights it used, uncertainty weighting's ``exp(-s_k)`` included), with the per-task
        gradients ``g_k`` of the tracked parameters taken first (``per_task_grads`` in ``runner``'s ``grad_mode``,
        keeping the graph for the step: a weighting never computes them). An aggregator's part comes from the
        per-task gradients the step computes itself, handed over by ``runner.observer`` (set for this call, any
        observer already there still called), so tracking adds no backward pass: a linear aggregator's
        ``s a_k g_k`` with its coefficients ``a_k`` (``weights``) and ``aggregator_scale``'s factor ``s``;
        GradDrop's the part of ``g_k`` of the sign it kept, mixed with ``leak``. ``TaskSAM`` aggregates twice, so
        task k's part is ``s (a_k g_k + a'_k h_k)``, ``a'`` the coefficients on the flat directions
        ``h_k = g_k^SAM - g_k`` (with ``Sum``, ``g_k^SAM``). Random aggregators (PCGrad, GradDrop) draw their
        numbers for the split from a copy of the random state the step then draws from, so the split is the
        step's.
        """
        if runner.optimizer is not self.optimizer:
            raise ValueError("runner steps another optimizer than this tracker watches")
        aggregator = runner.aggregator
        if isinstance(runner, TaskSAM):
            if isinstance(self.optimizer, AdaTask):
                raise ValueError("TaskSAM hands AdaTask no per-task gradients: it cannot step it")
            self._check_params(runner.shared, "task_sam's shared parameters, in its order")
            factor = aggregator_scale(aggregator, self.num_tasks, runner.aggregator_scale, "sam")

            def sam_parts(grads: Tensor, sam_grads: Tensor, values: Tensor) -> Tensor:
                # The step's order of calls, so a random aggregator's draws fall alike: the gradients, then h.
                return factor * _same_draws(aggregator, grads.device, lambda: aggregator_parts(
                    aggregator, grads, values) + aggregator_parts(aggregator, sam_grads - grads, values))

            return self._observed(runner, sam_parts, lambda: runner.step(losses, **kwargs))
        if isinstance(self.optimizer, AdaTask):
            if self.optimizer.variant != "adam":
                raise ValueError(f"AdaTask's {self.optimizer.variant} variant: call observe(task_grads) with the "
                                 "per-task gradients its step used")
            info = runner.step(losses, **kwargs)
            self.observe()
            return info
        self._check_params([p for p in runner.shared_params if p.requires_grad],
                           "mtl_step's shared parameters that require grad, in its order")
        if aggregator is not None:
            factor = aggregator_scale(aggregator, self.num_tasks, runner.aggregator_scale, "dgr")

            def parts(grads: Tensor, values: Tensor) -> Tensor:
                return factor * _same_draws(aggregator, grads.device,
                                            lambda: aggregator_parts(aggregator, grads, values))

            return self._observed(runner, parts, lambda: runner.step(losses, **kwargs))
        grads = per_task_grads(_check_losses(losses), self.params, features=kwargs.get("features"),
                               mode=runner.grad_mode, retain_graph=True, chunk_size=runner.chunk_size,
                               process_group=runner.process_group)
        weights, handles = _loss_gradients(losses)
        try:
            info = runner.step(losses, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        self.observe(weights()[:, None] * grads)
        return info

    def _check_params(self, params: Sequence[Tensor], what: str) -> None:
        if [id(p) for p in params] != [id(p) for p in self.params]:
            raise ValueError(f"the tracker must watch {what}")

    def _observed(self, runner: MTLStep | TaskSAM, parts: Callable[..., Tensor],
                  run: Callable[[], dict[str, Tensor | None]]) -> dict[str, Tensor | None]:
        """``run()`` with ``runner.observer`` keeping ``parts(*what it is handed)``, then :meth:`observe` of that
        ``[K, P]``: the parts must wait for the optimizer's step, whose moments the split reads."""
        previous, kept = runner.observer, []

        def observer(*args: Tensor) -> None:
            if previous is not None:
                previous(*args)
            kept.append(parts(*args))

        runner.observer = observer
        try:
            info = run()
        finally:
            runner.observer = previous
        if len(kept) != 1:
            raise RuntimeError(f"{type(runner).__name__}.step called its observer {len(kept)} times (once expected): "
                               "nothing was tracked for this step")
        self.observe(kept[0])
        return info

    # ---------------------------------------------------------------------------------------------------------- #
    def au(self) -> dict[str, Tensor]:
        """AU of every tracked tensor by name: ``[K, *shape]`` with ``per_element``, else ``[K]`` (a copy)."""
        return {t.name: t.au.view(self.num_tasks, *t.param.shape).clone() if self.per_element else t.au.clone()
                for t in self._tracked}

    def rau(self, level: str = "layer", reduction: str = "mean") -> dict[str, Tensor]:
        """rAU by name: ``"element"`` ``{tensor: [K, *shape]}``; ``"tensor"`` ``{tensor: [K]}``; ``"layer"``
        ``{layer: [K]}``, with ``reduction`` ``"mean"`` (mean of the elements' rAU over those with an update) or
        ``"sum"`` (rAU of the summed AU). Rows sum to 1, or are all zero where nothing has been updated."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if (level == "element" or reduction == "mean") and not self.per_element:
            raise ValueError(f"level={level!r}, reduction={reduction!r} needs TaskDominance(per_element=True)")
        if level == "element":
            return {t.name: _relative_rows(t.au).T.reshape(self.num_tasks, *t.param.shape).cpu()
                    for t in self._tracked}
        key = (lambda t: t.name) if level == "tensor" else (lambda t: t.layer)
        sums: dict[str, Tensor] = {}  # "sum": summed AU; "mean": summed rAU, then the count of updated elements
        counts: dict[str, float] = {}
        for t in self._tracked:
            au = t.au.double().reshape(self.num_tasks, -1)
            name = key(t)
            if reduction == "sum":
                part = au.sum(1)
            else:
                rel = _relative_rows(au)
                part = rel.sum(0)
                counts[name] = counts.get(name, 0.0) + float((au.sum(0) > 0).sum())
            sums[name] = sums.get(name, 0) + part.cpu()
        if reduction == "sum":
            return {name: _relative(s).float() for name, s in sums.items()}
        return {name: (s / counts[name] if counts[name] else s).float() for name, s in sums.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the decay, the steps observed, and per layer (in the order of the parameters) each task's
        rAU by both reductions (``"sum"`` only without ``per_element``)."""
        reductions = REDUCTIONS if self.per_element else ("sum",)
        by = {r: self.rau("layer", r) for r in reductions}
        return {"decay": self.beta, "steps": self.steps, "layers": list(by["sum"]),
                "rau": {r: {layer: v.tolist() for layer, v in by[r].items()} for r in reductions}}


def _relative_rows(au: Tensor) -> Tensor:
    """Per element: ``au [K, n]`` -> rAU ``[n, K]`` (rows of zeros where no task has an update)."""
    total = au.sum(0)
    return torch.where(total > 0, au / torch.where(total > 0, total, 1), 0).T


def aggregator_parts(aggregator: Aggregator, grads: Tensor, losses: Tensor | None = None) -> Tensor:
    """Each task's part of ``aggregator(grads, losses)``: ``[K, P]`` rows that sum to it (before any scale).

    A ``LinearAggregator``'s rows are ``a_k g_k`` with its coefficients ``a = weights(grads, losses)``; GradDrop's
    are ``leak g_k + (1 - leak)`` (the part of ``g_k`` of the sign it kept in each element), ``/ K`` with
    ``reduction="mean"``. Random aggregators draw as a call of their own would."""
    if isinstance(aggregator, LinearAggregator):
        w = aggregator.weights(grads, losses)
        return w[:, None] * grads.to(w.dtype)
    if isinstance(aggregator, GradDrop):
        out = aggregator(grads, losses).double()
        g = grads.double()
        pos, neg = g.clamp(min=0), g.clamp(max=0)
        K = g.shape[0]
        unit = K if aggregator.reduction == "mean" else 1.0
        keep = 1.0 - aggregator.leak
        kept = out * unit - aggregator.leak * g.sum(0)  # keep times the kept sum: the positive or the negative one
        took_pos = (kept - keep * pos.sum(0)).abs() <= (kept - keep * neg.sum(0)).abs()
        parts = aggregator.leak * g + keep * torch.where(took_pos, pos, neg)
        return (parts / unit).to(grads.dtype)
    raise TypeError(f"no per-task split is known for {type(aggregator).__name__}: it is neither a "
                    "LinearAggregator nor GradDrop")


def _same_draws(aggregator: Aggregator, device: torch.device, fn):
    """``fn()`` with the random state put back afterwards, so that the aggregator's next call draws the same
    numbers: its own generator, else the global one of the CPU and of ``device``."""
    generator = getattr(aggregator, "generator", None)
    if generator is not None:
        saved = generator.get_state()
        try:
            return fn()
        finally:
            generator.set_state(saved)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return fn()


def _loss_gradients(losses: Sequence[Tensor] | Tensor):
    """Hooks that record the gradient reaching each loss in the next backward pass: the weights a weighting
    applied. Returns a function giving them as ``[K]`` (zero for a loss that did not require grad) and the hooks'
    handles."""
    if isinstance(losses, Tensor):
        seen: list[Tensor] = [torch.zeros_like(losses.detach())]
        handles = [losses.register_hook(lambda g: seen.__setitem__(0, g.detach()))] if losses.requires_grad else []
        return (lambda: seen[0].reshape(-1)), handles
    got = [torch.zeros((), dtype=loss.dtype, device=loss.device) for loss in losses]
    handles = [loss.register_hook(lambda g, k=k: got.__setitem__(k, g.detach().reshape(())))
               for k, loss in enumerate(losses) if loss.requires_grad]
    return (lambda: torch.stack(got)), handles


# -------------------------------------------------------------------------------------------------------------- #
def plot(panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]], task_names: Sequence[str],
         path: str | Path) -> None:
    """The dominance picture: one panel per ``(title, {layer: rAU [K]})``, each shared layer a bar stacked by task
    (each task's share of that layer's updates; an equal split puts every boundary at a multiple of 1/K).

    Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(3.5, 0.55 * max(len(layers) for _, layers in panels) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.6), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10").colors
    for ax, (title, layers) in zip(axes[0], panels):
        names = list(layers)
        bottom = [0.0] * len(names)
        for k, task in enumerate(task_names):
            share = [layers[n][k] for n in names]
            ax.bar(range(len(names)), share, bottom=bottom, color=colors[k % len(colors)], label=task)
            bottom = [b + s for b, s in zip(bottom, share)]
        for k in range(1, len(task_names)):
            ax.axhline(k / len(task_names), color="black", linewidth=0.6, linestyle=":")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set(title=title, ylim=(0, 1), xlabel="shared layer (input to output)")
    axes[0][0].set_ylabel("rAU: task's share of the layer's updates")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
