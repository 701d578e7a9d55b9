"""`DummyHeads`: the fixed random dummy heads of DGR, as a module for a training loop.

Linear heads (the default, and any ``nn.Linear`` / 1x1 ``nn.Conv2d`` a head factory builds) take the fused
``dgr_penalty``; two-layer MLP heads on row features take the closed form of ``dgr_mlp_penalty``; any other module
(a DeepLab head, a head with a ``transform`` such as an upsampling) takes the exact penalty by autograd double
backward, its convolutions cut to the kernel taps that read the input (``ops.live_taps``: a DeepLab head's dilated
ASPP taps that fall in the padding), or the authors' finite-difference estimate when asked for.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from dgr_fast.distributed import Sync, check_process_group, same_random_draws, sync_for
from dgr_fast.ops.dgr_mlp_penalty import mlp_head_of, mlp_penalty_per_task
from dgr_fast.ops.dgr_penalty import LOSS_CODES, NORMS, apply_norm, dgr_penalty_per_task, weighted_sum
from dgr_fast.ops.live_taps import skip_dead_taps
from dgr_fast.reference.dgr import (REDUCTIONS, finite_difference_features_grad, head_penalties, linear_head,
                                   module_head_fns, task_loss, task_loss_sum)

RESAMPLE = ("never", "step", "epoch")
ESTIMATORS = ("exact", "finite_difference")
HEAD_MODES = ("eval", "train")


@dataclass(frozen=True)
class DummyTask:
    """One task's dummy head: its loss, its output width, how the loss is reduced, and (optionally) the head itself.

    ``loss``: ``"ce"``, ``"bce"``, ``"mse"`` or ``"l1"``; ``out_features``: ``C_k`` (classes or channels);
    ``reduction``: ``"mean"`` or ``"row_mean"`` (see ``dgr_penalty``); ``ignore_index``: for ``"ce"``.
    ``head``: ``None`` (a linear / 1x1-convolution head drawn by ``DummyHeads``) or a function with no arguments that
    builds a fresh head module, e.g. ``lambda: DeepLabHead(2048, 13)`` or the model's own head class; it is called
    under a random state drawn from ``DummyHeads``' generator, so the module initialises itself as PyTorch does.
    ``transform``: ``None`` or ``transform(output, target) -> output`` applied before the loss (an upsampling to the
    target's size, an L2 normalisation of surface normals).
    """

    loss: str
    out_features: int
    reduction: str = "mean"
    ignore_index: int = -100
    head: Callable[[], nn.Module] | None = None
    transform: Callable[[Tensor, Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSS_CODES:
            raise ValueError(f"DummyTask.loss must be one of {tuple(LOSS_CODES)}, got {self.loss!r}")
        if isinstance(self.out_features, bool) or not isinstance(self.out_features, int) or self.out_features < 1:
            raise ValueError(f"DummyTask.out_features must be a positive int, got {self.out_features!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"DummyTask.reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"DummyTask.ignore_index must be an int, got {self.ignore_index!r}")
        if isinstance(self.head, nn.Module):
            raise TypeError("DummyTask.head must be callable and build a fresh head (e.g. lambda: nn.Linear(D, C)), "
                            "not a module: every dummy set and every redraw needs its own")
        for name in ("head", "transform"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"DummyTask.{name} must be callable or None, got {getattr(self, name)!r}")


def _linear_weights(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight [C, D], bias)`` of a head ``dgr_penalty`` fuses: ``nn.Linear``, or a plain 1x1 ``nn.Conv2d``."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1)):
        return module.weight.flatten(1), module.bias
    return None


def _freeze(module: nn.Module) -> nn.Module:
    """The module with every parameter turned into a buffer of the same name: ``state_dict`` keeps it, ``.to()``
    moves it, ``functional_call`` substitutes it, and no ``parameters()`` call (no optimizer) ever sees it. Their
    dotted names are kept in ``module.dummy_parameter_names``: the penalty differentiates w.r.t. those."""
    names = [n for n, _ in module.named_parameters()]
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, None if p is None else p.detach())
    module.dummy_parameter_names = names
    return module.eval()


class DummyHeads(nn.Module):
    """Fixed random dummy heads, one per task (and per dummy set), and their DGR penalty.

    The heads are buffers, not parameters: an optimizer never sees them, and they are saved in ``state_dict`` (with
    the generator state, so a resumed run resamples identically). A task without a ``head`` factory gets a linear
    (1x1-convolution) head drawn as PyTorch initialises ``nn.Linear``: weight and bias uniform in
    ``[-1/sqrt(D), 1/sqrt(D)]``. A factory's module is built under a random state drawn from the generator (so it
    initialises itself as PyTorch does, reproducibly), its parameters frozen into buffers. What computes a task's
    penalty:

    - a linear head (no factory, or a factory building ``nn.Linear`` or a plain 1x1 ``nn.Conv2d``), no transform:
      the fused ``dgr_penalty`` (every such task of a set in one call per features tensor);
    - ``Linear - ReLU - Linear [- ReLU]`` on ``[N, D]`` features, no transform: the closed form of
      ``dgr_mlp_penalty``;
    - any other module: the exact penalty by autograd double backward (``reference.head_penalties``).

    ``estimator="finite_difference"`` takes the authors' estimate of the penalty's gradient instead, for every task
    at once (``reference.finite_difference_features_grad``, step ``fd_step``): the value is the exact ``|d|^2``, its
    gradient w.r.t. the features the estimate (O(h) away from the exact one only below the nearest ReLU / L1 kink;
    README has the measured error). It has no per-task split and runs on one process.

    Args:
        in_features: ``D``, the feature width, for the linear heads drawn here (None when every task has a factory).
        tasks: one ``DummyTask`` per task (a sequence, or a mapping from task name).
        num_sets: independent dummy sets; the penalty is their mean.
        resample: ``"never"`` (fixed for the run, the paper's default), ``"step"`` (redrawn before every forward in
            training mode, the Auto-Lambda variant), or ``"epoch"`` (redrawn by ``new_epoch()``).
        bias: whether the linear heads drawn here have a bias (its gradient is part of the penalty).
        seed / generator: where the draws come from (default: a generator seeded from torch's global RNG).
        norm: ``"squared"`` or ``"l2"`` (see ``dgr_penalty``); backend: the linear heads' (as ``dgr_penalty``).
        estimator: ``"exact"`` or ``"finite_difference"`` (see above); fd_step: its ``h`` (the authors': 1e-3 on
            NYUv2 / Cityscapes, 1e-4 on UTKFace).
        head_mode: ``"eval"`` (default: BatchNorm normalises with the running statistics a fresh head starts with,
            dropout is off: the penalty is a deterministic function of the features) or ``"train"`` (the authors' code,
            whose dummy heads run in the model's training mode: BatchNorm on the batch's statistics, dropout on; the
            running statistics are put back after every forward, so they never move).
        process_group: under ``torch.distributed``, ``None`` (the default group) or a group: the penalty is the
            global batch's (see ``dgr_penalty``; for module heads the head gradient ``d`` is all-reduced), every
            draw of the heads is rank 0's (its generator state is broadcast before each draw, and the heads
            themselves before the first forward, in case they were drawn before the group existed); ``"local"``:
            each rank's own penalty and draws.
    Buffers: ``weight [num_sets, C, D]``, ``bias [num_sets, C]`` with ``C`` the linear tasks' stacked widths (fp32
    unless ``dtype``); the module heads under ``modules_`` as ``set{s}_task{k}``.
    """

    def __init__(
        self,
        in_features: int | None,
        tasks: Sequence[DummyTask] | Mapping[str, DummyTask],
        *,
        num_sets: int = 1,
        resample: str = "never",
        bias: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        norm: str = "squared",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        estimator: str = "exact",
        fd_step: float = 1e-3,
        head_mode: str = "eval",
        process_group: object = None,
    ) -> None:
        super().__init__()
        check_process_group(process_group)
        self.task_names = list(tasks) if isinstance(tasks, Mapping) else None
        self.tasks = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
        if not self.tasks or not all(isinstance(t, DummyTask) for t in self.tasks):
            raise TypeError("tasks must be a non-empty sequence (or mapping) of DummyTask")
        drawn_here = any(t.head is None for t in self.tasks)
        if in_features is not None or drawn_here:
            if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
                raise ValueError(f"in_features must be a positive int, got {in_features!r}"
                                 + (" (tasks without a head factory need it)" if in_features is None else ""))
        if isinstance(num_sets, bool) or not isinstance(num_sets, int) or num_sets < 1:
            raise ValueError(f"num_sets must be a positive int, got {num_sets!r}")
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if isinstance(fd_step, bool) or not isinstance(fd_step, (int, float)) or not (math.isfinite(fd_step) and fd_step > 0):
            raise ValueError(f"fd_step must be a finite number > 0, got {fd_step!r}")
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if generator is None:
            seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
            generator = torch.Generator().manual_seed(seed)
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator (draws are made on the CPU and copied), got {generator.device}")
        self.in_features, self.num_sets, self.resample_mode = in_features, num_sets, resample
        self.has_bias, self.norm, self.backend, self.generator = bias, norm, backend, generator
        self.estimator, self.fd_step, self.head_mode = estimator, float(fd_step), head_mode
        self.process_group = process_group
        self._drawn_in_sync = False  # whether the heads now held are rank 0's on every rank
        # One instance per task tells its kind and the linear heads' shapes; every draw builds fresh ones.
        probes = [None if t.head is None else self._build(t) for t in self.tasks]
        self.kinds = [self._kind(t, probe) for t, probe in zip(self.tasks, probes)]
        linear = [k for k, kind in enumerate(self.kinds) if kind == "linear"]
        widths = {k: (self.in_features if probes[k] is None else _linear_weights(probes[k])[0].shape[1]) for k in linear}
        if len(set(widths.values())) > 1:
            raise ValueError(f"the linear dummy heads read features of different widths {sorted(set(widths.values()))}; "
                             "give every task of one width, or module heads")
        self.linear_width = next(iter(widths.values()), None)
        self.linear_bias = [probes[k] is None and bias or probes[k] is not None and _linear_weights(probes[k])[1] is not None
                            for k in linear]
        self.offsets = {k: (0, 0) for k in linear}
        column = 0
        for k in linear:
            self.offsets[k] = (column, column + self.tasks[k].out_features)
            column += self.tasks[k].out_features
        kw = dict(device=device, dtype=dtype)
        self.register_buffer("weight", torch.empty(num_sets, column, self.linear_width or 0, **kw) if linear else None)
        self.register_buffer("bias", torch.zeros(num_sets, column, **kw) if linear and any(self.linear_bias) else None)
        self.modules_ = nn.ModuleDict({
            f"set{s}_task{k}": _freeze(probes[k] if s == 0 else self._build(self.tasks[k])).to(**kw)
            for s in range(num_sets) for k, kind in enumerate(self.kinds) if kind != "linear"})
        self.resample()

    def _build(self, task: DummyTask) -> nn.Module:
        """A fresh head from the task's factory, under a random state drawn from the generator."""
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = task.head()
        if not isinstance(module, nn.Module):
            raise TypeError(f"DummyTask.head must build an nn.Module, got {type(module).__name__}")
        return module

    @staticmethod
    def _kind(task: DummyTask, probe: nn.Module | None) -> str:
        if task.transform is not None:
            return "module"
        if probe is None or _linear_weights(probe) is not None:
            return "linear"
        return "mlp" if mlp_head_of(probe) is not None else "module"

    @torch.no_grad()
    def resample(self) -> None:
        """Draw every head afresh (PyTorch's default initialisation); under ``torch.distributed``, rank 0's draw on
        every rank (a collective: every rank must call it)."""
        sync = sync_for(self.process_group)
        with same_random_draws(sync, self.generator):
            for k, kind in enumerate(self.kinds):
                for s in range(self.num_sets):
                    if kind != "linear":
                        fresh = self._build(self.tasks[k])
                        values = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
                        for name, buf in self.modules_[f"set{s}_task{k}"].named_buffers():
                            buf.copy_(values[name])
                    else:
                        self._draw_linear(s, k)
        self._drawn_in_sync = sync is not None

    def _draw_linear(self, s: int, k: int) -> None:
        c0, c1 = self.offsets[k]
        task = self.tasks[k]
        if task.head is None:
            bound = 1.0 / math.sqrt(self.linear_width)
            for buf, shape in ((self.weight, (c1 - c0, self.linear_width)), (self.bias, (c1 - c0,))):
                if buf is not None and (buf is self.weight or self.has_bias):
                    draw = torch.rand(shape, generator=self.generator, dtype=torch.float32)
                    buf[s, c0:c1].copy_(draw.mul_(2 * bound).sub_(bound))
            return
        weight, bias = _linear_weights(self._build(task))
        self.weight[s, c0:c1].copy_(weight.detach().reshape(c1 - c0, -1))
        if self.bias is not None:
            self.bias[s, c0:c1].copy_(torch.zeros(c1 - c0) if bias is None else bias.detach())

    @torch.no_grad()
    def _sync_heads(self, sync: Sync | None) -> None:
        """Before a distributed forward: heads drawn before the group existed (or loaded per rank) become rank 0's."""
        if sync is not None and not self._drawn_in_sync:
            sync.broadcast_([b for b in self.buffers() if b is not None and b.is_floating_point()])
            self._drawn_in_sync = True

    def train(self, mode: bool = True) -> DummyHeads:
        super().train(mode)
        self.modules_.eval()  # the heads' own mode is head_mode's, applied in each forward
        return self

    def new_epoch(self) -> None:
        """Call at the end of each epoch: redraws the heads when ``resample="epoch"``."""
        if self.resample_mode == "epoch":
            self.resample()

    def _per_task(self, values: Sequence[Any] | Mapping[str, Any] | None, name: str) -> list:
        if values is None:
            return [None] * len(self.tasks)
        if isinstance(values, Mapping):
            if self.task_names is None:
                raise TypeError(f"{name} is a mapping but the tasks were given as a sequence")
            unknown = [n for n in values if n not in self.task_names]
            if unknown:
                raise ValueError(f"{name} names tasks {unknown} that are not among {self.task_names}")
            missing = [n for n in self.task_names if n not in values]
            if missing and name in ("targets", "features"):  # a task without a mask entry simply has no mask
                raise ValueError(f"{name} has no entry for tasks {missing}")
            return [values.get(n) for n in self.task_names]
        if isinstance(values, Tensor):
            raise TypeError(f"{name} must be a sequence or mapping with one entry per task, got a tensor")
        values = list(values)
        if len(values) != len(self.tasks):
            raise ValueError(f"{name} has {len(values)} entries but there are {len(self.tasks)} tasks")
        return values

    def forward(
        self,
        features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
        targets: Sequence[Tensor] | Mapping[str, Tensor],
        *,
        masks: Sequence[Tensor | None] | Mapping[str, Tensor] | None = None,
        task_weights: Sequence[float] | Tensor | None = None,
    ) -> Tensor:
        """The DGR penalty of the features, averaged over the dummy sets.

        Args:
            features: ``[N, D]`` or ``[B, D, *spatial]`` every head reads, or one such tensor per task (a sequence
                in task order or a mapping by name: MTAN-style models, where each head reads its task's features).
            targets: per task (a sequence in task order, or a mapping by task name), as ``dgr_penalty`` takes them
                (after the task's ``transform``, for a module head: e.g. at the image's size).
            masks: per task ``None`` or a bool row/pixel mask (the targets' rows/pixels).
            task_weights: ``[K]`` weights of the task losses (the penalty scales with their squares).
        Returns:
            0-dim, differentiable w.r.t. the features.
        """
        with self._step_draw():
            if self.estimator == "finite_difference":
                per_set = self._finite_difference(features, targets, masks, task_weights)
                return apply_norm(per_set, self.norm).mean()
            per_set_task = self._penalties(features, targets, masks)
            return apply_norm(weighted_sum(per_set_task, task_weights), self.norm).mean()

    def per_task(
        self,
        features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
        targets: Sequence[Tensor] | Mapping[str, Tensor],
        *,
        masks: Sequence[Tensor | None] | Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Unweighted per-task penalties ``[K]`` (mean over the sets). Their sum is ``forward``'s value when
        ``norm="squared"``: the penalty splits over tasks, so a method that keeps per-task gradients (AdaTask) can
        give task k its own share ``R_k``."""
        if self.norm != "squared":
            raise ValueError("per_task needs norm='squared': sqrt(sum_k R_k) does not split over tasks")
        if self.estimator != "exact":
            raise ValueError("per_task needs estimator='exact': the finite-difference estimate perturbs every head "
                             "at once and has no per-task split")
        with self._step_draw():
            return self._penalties(features, targets, masks).mean(0)

    @contextlib.contextmanager
    def _step_draw(self) -> Iterator[None]:
        """``resample="step"`` in training mode: redraw the heads before the forward, and undo the draw (heads and
        generator) if the forward raises, so that a refused input changes nothing. The inputs are checked where the
        heads are applied, after the draw, hence the copy of the heads this keeps for the step."""
        if not (self.training and self.resample_mode == "step"):
            yield
            return
        with self._all_or_nothing():
            self.resample()
            yield

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Put the heads (the buffers' values and objects), the generator state and the sync flag back if the body
        raises: a refused forward or checkpoint leaves the module as it was."""
        owners = [(module, name, buf) for module in self.modules() for name, buf in module._buffers.items()
                  if buf is not None]
        saved = [buf.clone() for _, _, buf in owners], self.generator.get_state(), self._drawn_in_sync
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for (module, name, buf), value in zip(owners, saved[0]):
                    module._buffers[name] = buf  # load_state_dict(assign=True) may have swapped the object
                    buf.copy_(value)
            self.generator.set_state(saved[1])
            self._drawn_in_sync = saved[2]
            raise

    def _inputs(self, features, targets, masks):
        sync = sync_for(self.process_group)
        self._sync_heads(sync)
        per_task_features = self._per_task(features, "features") if not isinstance(features, Tensor) \
            else [features] * len(self.tasks)
        for k, f in enumerate(per_task_features):
            if not isinstance(f, Tensor):
                raise TypeError(f"features[{k}] must be a tensor, got {type(f).__name__}")
        return per_task_features, self._per_task(targets, "targets"), self._per_task(masks, "masks"), sync

    def _loss_fn(self, k: int, target: Tensor, mask: Tensor | None, scale: Tensor | None = None):
        """Task k's loss on its head's output (``transform`` first); ``scale``: the sum over the global count
        (distributed) instead of this batch's mean."""
        task = self.tasks[k]

        def loss(out: Tensor) -> Tensor:
            out = task.transform(out, target) if task.transform is not None else out
            if scale is None:
                return task_loss(out, target, task.loss, mask=mask, ignore_index=task.ignore_index,
                                 reduction=task.reduction)
            return task_loss_sum(out, target, task.loss, mask=mask, ignore_index=task.ignore_index,
                                 reduction=task.reduction)[0] * scale
        return loss

    def _head_mode(self):
        if self.head_mode == "eval":
            return contextlib.nullcontext()

        # BatchNorm without running statistics: it normalises with the batch's and touches no buffer. Updating the
        # statistics and restoring them on exit (frozen_batchnorm_stats) would bump the versions of tensors the
        # penalty's graph saved, and its backward, which runs after the block, would refuse them.
        norms = [m for m in self.modules_.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

        @contextlib.contextmanager
        def training():
            tracked = [m.track_running_stats for m in norms]
            self.modules_.train()
            for m in norms:
                m.track_running_stats = False
            try:
                yield
            finally:
                for m, flag in zip(norms, tracked):
                    m.track_running_stats = flag
                self.modules_.eval()
        return training()

    def _penalties(self, features, targets, masks) -> Tensor:
        """``[num_sets, K]`` unweighted penalties (redrawing the heads first when ``resample="step"``)."""
        feats, targets, masks, sync = self._inputs(features, targets, masks)
        K = len(self.tasks)
        out: list[list[Tensor | None]] = [[None] * K for _ in range(self.num_sets)]
        linear = [k for k, kind in enumerate(self.kinds) if kind == "linear"]
        # Linear tasks: one fused call for every set and every task that reads the same features tensor.
        for group in _by_features(linear, feats):
            pieces = [(s, k) for s in range(self.num_sets) for k in group]
            values = dgr_penalty_per_task(
                feats[group[0]], [self.weight[s, slice(*self.offsets[k])] for s, k in pieces],
                [self.bias[s, slice(*self.offsets[k])] if self.linear_bias[linear.index(k)] else None
                 for s, k in pieces],
                [targets[k] for _, k in pieces], [self.tasks[k].loss for _, k in pieces],
                masks=[masks[k] for _, k in pieces], ignore_index=[self.tasks[k].ignore_index for _, k in pieces],
                reductions=[self.tasks[k].reduction for _, k in pieces], backend=self.backend,
                process_group=self.process_group)
            for (s, k), value in zip(pieces, values.unbind()):
                out[s][k] = value
        # MLP tasks on row features: the closed form, per set and features tensor (one process: its closed form
        # has no distributed reduction; under distributed they take the module path's).
        mlp = [k for k, kind in enumerate(self.kinds) if kind == "mlp" and feats[k].dim() == 2 and sync is None]
        for group in _by_features(mlp, feats):
            for s in range(self.num_sets):
                values = mlp_penalty_per_task(
                    feats[group[0]], [mlp_head_of(self.modules_[f"set{s}_task{k}"]) for k in group],
                    [targets[k] for k in group], [self.tasks[k].loss for k in group],
                    masks=[masks[k] for k in group], ignore_index=[self.tasks[k].ignore_index for k in group],
                    reductions=[self.tasks[k].reduction for k in group])
                for k, value in zip(group, values.unbind()):
                    out[s][k] = value
        generic = [k for k in range(K) if out[0][k] is None]
        if generic:
            # exact: the heads' convolutions may drop their dead taps (the estimate, _finite_difference, keeps
            # whole kernels to reproduce the authors' convolutions)
            with self._head_mode(), skip_dead_taps():
                for s in range(self.num_sets):
                    values = self._module_penalties(s, generic, feats, targets, masks, sync)
                    for k, value in zip(generic, values.unbind()):
                        out[s][k] = value
        return torch.stack([torch.stack([v.to(out[0][0].dtype) for v in row]) for row in out])

    def _module_penalties(self, s, tasks, feats, targets, masks, sync: Sync | None) -> Tensor:
        """Exact penalties of set ``s``'s module heads of ``tasks``: autograd double backward, or under
        distributed the global batch's (each rank's head gradient of its share of the global loss, all-reduced)."""
        heads = [self.modules_[f"set{s}_task{k}"] for k in tasks]
        if sync is None:
            fns, params = module_head_fns([feats[k] for k in tasks], heads)
            return head_penalties(fns, params, [self._loss_fn(k, targets[k], masks[k]) for k in tasks])
        counts = torch.stack([_valid_count(self.tasks[k], targets[k], masks[k]) for k in tasks]).to(feats[tasks[0]].dtype)
        sync.all_reduce_sum_([counts])
        fns, params = module_head_fns([feats[k] for k in tasks], heads)
        leaves = [[p.detach().requires_grad_(True) for p in ps] for ps in params]
        total = sum(self._loss_fn(k, targets[k], masks[k], 1 / counts[i].clamp_min(1))(fn(ps))
                    for i, (k, fn, ps) in enumerate(zip(tasks, fns, leaves)))
        flat = [p for ps in leaves for p in ps]
        local = torch.autograd.grad(total, flat, create_graph=True, allow_unused=True)
        local = [torch.zeros_like(p) if g is None else g for g, p in zip(local, flat)]
        summed = [g.detach().clone() for g in local]
        sync.all_reduce_sum_(summed)
        penalties, i = [], 0
        for ps in leaves:
            mine, whole = local[i : i + len(ps)], summed[i : i + len(ps)]
            i += len(ps)
            value = sum((g * g).sum() for g in whole)
            # value: the global |d|^2; gradient w.r.t. this rank's features: 2 (dd_r/dz)^T d times W, so that the
            # averaging of parameter gradients that follows gives the global penalty's exact gradient.
            surrogate = 2 * sync.world_size * sum((g * w).sum() for g, w in zip(mine, whole))
            penalties.append(value + surrogate - surrogate.detach())
        return torch.stack(penalties)

    def _finite_difference(self, features, targets, masks, task_weights) -> Tensor:
        """``[num_sets]``: per set the exact ``|d|^2`` whose gradient is the authors' estimate."""
        feats, targets, masks, sync = self._inputs(features, targets, masks)
        if sync is not None:
            raise ValueError("estimator='finite_difference' reproduces the authors' one-process estimate; under "
                             "torch.distributed use estimator='exact', or process_group='local'")
        K = len(self.tasks)
        weights = [1.0] * K if task_weights is None else list(torch.as_tensor(task_weights, dtype=torch.float64).tolist())
        if len(weights) != K:
            raise ValueError(f"task_weights must have one entry per task ({K}), got {len(weights)}")
        distinct = _distinct(feats)
        with self._head_mode():
            return torch.stack([_FiniteDifference.apply(self, s, feats, targets, masks, weights, *distinct)
                                for s in range(self.num_sets)])

    def set_heads(self) -> list[list[nn.Module]]:
        """Per set, per task, the head as a module (a linear head as ``nn.Linear`` sharing the buffers' values):
        what the finite-difference estimate perturbs."""
        out = []
        for s in range(self.num_sets):
            row = []
            for k, kind in enumerate(self.kinds):
                if kind != "linear":
                    row.append(self.modules_[f"set{s}_task{k}"])
                    continue
                c0, c1 = self.offsets[k]
                has_bias = self.linear_bias[[j for j, kd in enumerate(self.kinds) if kd == "linear"].index(k)]
                row.append(_LinearHead(self.weight[s, c0:c1], self.bias[s, c0:c1] if has_bias else None))
            out.append(row)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # torch loads the buffers and then the generator state, collecting shape errors to raise at the end: a
        # checkpoint of other head sizes would replace the generator before failing. Check the shapes first and
        # load nothing of this module when one differs.
        wrong = [f"{prefix}{name}: {tuple(state_dict[prefix + name].shape)} in the checkpoint, {tuple(buf.shape)} here"
                 for name, buf in self.state_dict(keep_vars=True).items()
                 if isinstance(buf, Tensor) and prefix + name in state_dict
                 and isinstance(state_dict[prefix + name], Tensor) and state_dict[prefix + name].shape != buf.shape]
        if wrong:
            error_msgs.append("DummyHeads: the checkpoint's heads have other sizes (" + "; ".join(wrong) + "); "
                              "nothing of this module was loaded")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: torch copies what it can (buffers, the generator state)
        before raising for a missing or unexpected key or a bad value, so on any failure the heads, the generator
        and the buffers' identities are put back before the error propagates."""
        if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
            raise TypeError("DummyHeads.load_state_dict: expected a mapping with str keys (a state_dict)")
        with self._all_or_nothing():
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        value = state.get("generator_state") if isinstance(state, dict) else None
        if not (isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
            raise ValueError("DummyHeads checkpoint: _extra_state must be {'generator_state': a uint8 tensor from "
                             f"torch.Generator.get_state()}}, got {state!r:.80}")
        try:
            self.generator.set_state(value)
        except RuntimeError as err:
            raise ValueError(f"DummyHeads checkpoint: the generator state does not load: {err}") from None
        self._drawn_in_sync = False  # loaded heads: rank 0's are broadcast before the next distributed forward

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, tasks={self.tasks}, kinds={self.kinds}, num_sets={self.num_sets}, "
            f"resample={self.resample_mode!r}, bias={self.has_bias}, norm={self.norm!r}, backend={self.backend!r}, "
            f"estimator={self.estimator!r}, fd_step={self.fd_step}, head_mode={self.head_mode!r}, "
            f"process_group={self.process_group!r}"
        )


class _LinearHead(nn.Module):
    """A linear head on rows or (1x1) on feature maps of any dimension, as ``reference.linear_head``."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, z: Tensor) -> Tensor:
        return linear_head(z, self.weight, self.bias)


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, forwards in training mode still normalise with batch statistics, but every BatchNorm
    layer's running mean, running variance and batch counter are restored on exit (the effect of the Task-SAM
    authors' momentum = 0, also for ``momentum=None``; the dummy heads' ``head_mode="train"``)."""
    buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        if buffers:
            torch._foreach_copy_(buffers, saved)


def _by_features(tasks: list[int], feats: list[Tensor]) -> list[list[int]]:
    """``tasks`` grouped by the features tensor they read (the same object), in first-seen order."""
    groups: list[list[int]] = []
    for k in tasks:
        for group in groups:
            if feats[group[0]] is feats[k]:
                group.append(k)
                break
        else:
            groups.append([k])
    return groups


def _distinct(feats: list[Tensor]) -> list[Tensor]:
    return [feats[group[0]] for group in _by_features(list(range(len(feats))), feats)]


def _valid_count(task: DummyTask, target: Tensor, mask: Tensor | None) -> Tensor:
    """The count ``task_loss`` divides task ``task``'s sum by (before its clamp to 1)."""
    row_shape = target.shape if task.loss == "ce" else target.shape[:1] + target.shape[2:]
    valid = torch.ones(row_shape, dtype=torch.bool, device=target.device) if mask is None else mask
    if task.loss == "ce":
        return (valid & (target != task.ignore_index)).sum()
    return valid.sum() * (target.shape[1] if task.reduction == "mean" else 1)


class _FiniteDifference(torch.autograd.Function):
    """Value: the exact |d|^2 of one dummy set; gradient w.r.t. the features: the authors' estimate."""

    @staticmethod
    def forward(ctx, dummy, s, feats, targets, masks, weights, *distinct):
        heads = dummy.set_heads()[s]
        fns = [(lambda out, k=k, w=w: w * dummy._loss_fn(k, targets[k], masks[k])(out))
               for k, w in enumerate(weights)]
        with torch.enable_grad():
            value, estimate = finite_difference_features_grad(list(feats), heads, fns, h=dummy.fd_step)
        ctx.estimate = estimate
        return value

    @staticmethod
    def backward(ctx, grad):
        return (None,) * 6 + tuple(grad * e for e in ctx.estimate)
