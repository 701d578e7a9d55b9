"""Train one method spec on a data set: the model, the optimizer, the method's step, evaluation and timings."""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from dgr_fast.data import MTLData, MTLDataset
from dgr_fast.distributed import sync_for
from dgr_fast.dummy_heads import DummyHeads, DummyTask
from dgr_fast.mtl import METHODS, MetaMTL, MTLStep, Sum, TaskSAM, Weighting, make_method
from dgr_fast.mtl.dominance import TaskDominance
from dgr_fast.ops.dgr_penalty import dgr_penalty_backend
from dgr_fast.optim.adatask import AdaTask, adatask_backend
from dgr_fast.train.metrics import Metric, task_loss, valid_mask
from dgr_fast.train.models import FEATURES, MTLModel, make_model

OPTIMIZERS = ("sgd", "adam", "adatask")
MODIFIERS = ("dgr", "sam", "meta")


class SpecError(ValueError):
    """A method spec or a combination of options the trainer cannot run; the message says why."""


@dataclass(frozen=True)
class RunConfig:
    """One method spec, resolved: ``"ew+dgr"`` is equal weighting with the DGR penalty, and so on."""

    spec: str
    method: str = "ew"
    optimizer: str = "adam"
    dgr_lambda: float = 0.0
    sam_rho: float = 0.0
    meta: bool = False


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    device: str = "cpu"
    seed: int = 0
    dgr_backend: str | None = None
    dgr_resample: str = "never"
    grad_mode: str = "loop"
    meta_alpha: float | None = None  # None: the learning rate
    eval_batch_size: int = 256
    heads: str = "linear"  # the model's heads: "linear" or "paper" (models.paper_head_factory)
    dummy_heads: str = "same"  # "same": DGR's dummy heads copy the model's head architecture; "linear"
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "cosine": CosineAnnealingLR over the epochs, stepped once per epoch


def parse_spec(spec: str, *, optimizer: str, dgr_lambda: float, sam_rho: float) -> RunConfig:
    """Read a method spec: ``+``-joined tokens, at most one method of ``METHODS`` (default ``ew``), an optimizer
    (``sgd``, ``adam``, ``adatask``; default ``optimizer``), and modifiers ``dgr``, ``sam``, ``meta``. ``dgr`` and
    ``sam`` take their weight from ``dgr_lambda``/``sam_rho`` unless written ``dgr=0.01``, ``sam=0.05``; a weight
    must be finite and > 0."""
    method, values = None, {"optimizer": optimizer, "dgr_lambda": 0.0, "sam_rho": 0.0, "meta": False}
    named_optimizer: str | None = None
    for token in spec.strip().split("+"):
        name, eq, value = token.strip().partition("=")
        if eq and name not in ("dgr", "sam"):
            raise SpecError(f"spec {spec!r}: only dgr= and sam= take a value, got {token!r}")
        if name in METHODS:
            if method is not None:
                raise SpecError(f"spec {spec!r}: two methods ({method}, {name}); give one")
            method = name
        elif name in OPTIMIZERS:
            if named_optimizer is not None:
                raise SpecError(f"spec {spec!r}: two optimizers ({named_optimizer}, {name}); give one")
            named_optimizer = values["optimizer"] = name
        elif name in ("dgr", "sam"):
            try:
                weight = float(value) if eq else (dgr_lambda if name == "dgr" else sam_rho)
            except ValueError:
                raise SpecError(f"spec {spec!r}: {name}= needs a number, got {value!r}") from None
            if not 0 < weight < float("inf"):  # also refuses nan, which float() reads as readily as inf
                raise SpecError(f"spec {spec!r}: the {name} weight must be a finite number > 0, got {weight}")
            values["dgr_lambda" if name == "dgr" else "sam_rho"] = weight
        elif name == "meta":
            values["meta"] = True
        else:
            raise SpecError(f"spec {spec!r}: unknown token {name!r}; tokens are methods {tuple(METHODS)}, "
                            f"optimizers {OPTIMIZERS} and {MODIFIERS}")
    config = RunConfig(spec=spec.strip(), method=method or "ew", **values)
    check_config(config)
    return config


def check_config(config: RunConfig, batch_size: int | None = None) -> None:
    """Refuse combinations that the library's steps do not define, and weights that are negative or not finite,
    before any training."""
    for name, weight in (("dgr", config.dgr_lambda), ("sam", config.sam_rho)):
        # A RunConfig can be made without parse_spec; an inf or nan weight trains to NaN or fails mid-run.
        if not 0 <= weight < float("inf"):
            raise SpecError(f"spec {config.spec!r}: the {name} weight must be a finite number >= 0, got {weight}")
    weighting = isinstance(make_method(config.method, 2), Weighting)
    if config.meta and (config.sam_rho or config.dgr_lambda or config.method != "ew"):
        raise SpecError(f"spec {config.spec!r}: meta is its own gradient rule; it combines with no method, sam or dgr")
    if config.optimizer == "adatask" and (config.meta or config.sam_rho):
        raise SpecError(f"spec {config.spec!r}: adatask needs per-task gradients, which the sam and meta steps do not hand it")
    if config.optimizer == "adatask" and not weighting:
        raise SpecError(f"spec {config.spec!r}: adatask balances tasks itself; it takes a loss weighting, not {config.method}")
    if config.optimizer == "adatask" and config.method == "uw":
        raise SpecError(f"spec {config.spec!r}: uw learns its weights by gradient, which adatask's per-task step does not give")
    if config.meta and batch_size is not None and batch_size < 2:
        raise SpecError(f"spec {config.spec!r}: meta splits each batch into an inner and an outer half: batch size >= 2")
    if config.sam_rho and weighting and config.method != "ew":
        raise SpecError(f"spec {config.spec!r}: sam combines with ew or a gradient aggregator, not {config.method}")


def check_dominance(config: RunConfig) -> None:
    """Refuse the specs whose task shares the dominance tracker cannot split (``dgr_fast.mtl.dominance``)."""
    if config.meta:
        raise SpecError(f"spec {config.spec!r}: the dominance tracker splits MTLStep's and TaskSAM's updates; meta "
                        "sums its per-task gradients inside its step")


def _dummy_heads(data: MTLDataset, model: MTLModel, settings: TrainSettings, device: torch.device) -> DummyHeads:
    """The paper's dummy heads have the model's head architecture ("same"); a model's linear heads give linear
    dummy heads, which take the fused path. Module heads run in train mode, as the authors' dummy heads do (their
    BatchNorm layers normalise with the batch's statistics)."""
    factories = model.head_factories if settings.dummy_heads == "same" else [None] * len(data.tasks)
    tasks = {t.name: DummyTask(t.loss, t.out_features, reduction=t.reduction, ignore_index=t.ignore_index, head=f)
             for t, f in zip(data.tasks, factories)}
    linear = all(f is None for f in factories)
    return DummyHeads(FEATURES if linear else None, tasks, resample=settings.dgr_resample, seed=settings.seed,
                      backend=settings.dgr_backend, device=device, head_mode="eval" if linear else "train")


def _optimizer(name: str, shared: list[Tensor], heads: list[Tensor], extra: list[Tensor], lr: float,
               num_tasks: int, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adatask":
        return AdaTask(shared, num_tasks=num_tasks, lr=lr, task_params=heads, weight_decay=weight_decay)
    params = shared + heads + extra
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


class _Step:
    """Runs one training step of a config on a batch; hides which of MTLStep / TaskSAM / MetaMTL does it."""

    def __init__(self, config: RunConfig, model: MTLModel, data: MTLDataset, settings: TrainSettings,
                 device: torch.device, dominance: bool = False) -> None:
        self.tasks, self.model = data.tasks, model
        K = len(self.tasks)
        method = make_method(config.method, K)
        self.method = method.to(device) if isinstance(method, torch.nn.Module) else method
        shared = list(model.encoder.parameters())
        heads = [list(h.parameters()) for h in model.heads]
        extra = list(self.method.parameters()) if isinstance(self.method, torch.nn.Module) else []
        optimizer = _optimizer(config.optimizer, shared, [p for h in heads for p in h], extra, settings.lr, K,
                               settings.weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.epochs)
                          if settings.schedule == "cosine" else None)
        self.dummy = _dummy_heads(data, model, settings, device) if config.dgr_lambda else None
        weighting = self.method if isinstance(self.method, Weighting) else None
        aggregator = None if weighting is not None else self.method
        if config.meta:
            alpha = settings.lr if settings.meta_alpha is None else settings.meta_alpha
            self.runner: Any = MetaMTL(model, shared, self._criterion, optimizer, alpha=alpha)
        elif config.sam_rho:
            self.runner = TaskSAM(model, shared, heads, optimizer, aggregator=aggregator or Sum(), rho=config.sam_rho,
                                  dummy_heads=self.dummy, dgr_lambda=config.dgr_lambda)
        else:
            self.runner = MTLStep(shared, [p for h in heads for p in h], optimizer, weighting=weighting,
                                  aggregator=aggregator, dummy_heads=self.dummy, dgr_lambda=config.dgr_lambda,
                                  grad_mode=settings.grad_mode)
        self.tracker = (TaskDominance(model.encoder.named_parameters(prefix="encoder"), optimizer, K)
                        if dominance else None)

    def _criterion(self, outputs: tuple[Tensor, list[Tensor]], ys: list[Tensor]) -> list[Tensor]:
        return [task_loss(t, out, y) for t, out, y in zip(self.tasks, outputs[1], ys)]

    def dgr_inputs(self, ys: list[Tensor]) -> dict[str, dict[str, Tensor | None]]:
        return {"dgr_targets": {t.name: y for t, y in zip(self.tasks, ys)},
                "dgr_masks": {t.name: valid_mask(t, y) for t, y in zip(self.tasks, ys)}}

    def __call__(self, x: Tensor, ys: list[Tensor]) -> Tensor:
        """Returns the K task losses at the start of the step (detached)."""
        if isinstance(self.runner, MetaMTL):
            half = len(x) // 2  # the inner and outer loops see disjoint halves of the batch
            out = self.runner.step((x[:half], [y[:half] for y in ys]), (x[half:], [y[half:] for y in ys]))
            return out["inner_losses"]
        dgr = self.dgr_inputs(ys) if self.dummy is not None else {}
        run = self.runner.step if self.tracker is None else functools.partial(self.tracker.step, self.runner)
        if isinstance(self.runner, TaskSAM):
            def closure():
                z, outs = self.model(x)
                losses = self._criterion((z, outs), ys)
                return (losses, z) if self.dummy is not None else losses
            return run(closure, **dgr)["losses"]
        z, outs = self.model(x)
        features = z if (self.dummy is not None or self.runner.grad_mode == "batched") else None
        return run(self._criterion((z, outs), ys), features=features, **dgr)["losses"]

    def end_epoch(self) -> None:
        if isinstance(self.method, Weighting):
            self.method.end_epoch()
        if self.dummy is not None:
            self.dummy.new_epoch()
        if self.scheduler is not None:
            self.scheduler.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: MTLModel, data: MTLDataset, device: torch.device, batch_size: int) -> dict[str, float]:
    """Each task's metric on ``data`` (model in eval mode, no gradients)."""
    metrics = [Metric(t) for t in data.tasks]
    model.eval()
    with torch.no_grad():
        for idx in torch.arange(len(data)).split(batch_size):
            x, ys = data.batch(idx)
            _, outs = model(x.to(device))
            for metric, out, y in zip(metrics, outs, ys):
                metric.update(out, y)
    model.train()
    return {t.name: m.compute() for t, m in zip(data.tasks, metrics)}


def _penalty_ms(step: _Step, x: Tensor, ys: list[Tensor], device: torch.device, reps: int = 10) -> float:
    """Median time of the DGR penalty alone, forward and its gradient w.r.t. the features, on one training batch."""
    with torch.no_grad():
        z = step.model.encoder(x)
    z.requires_grad_(True)
    dgr = step.dgr_inputs(ys)
    times = []
    for _ in range(reps + 1):  # the first one warms up
        _sync(device)
        t0 = time.perf_counter()
        torch.autograd.grad(step.dummy(z, dgr["dgr_targets"], masks=dgr["dgr_masks"]), z)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: the per-epoch lines carry the same information
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=None)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, world: int, rank: int) -> list[Tensor]:
    """This rank's index batches of one epoch: a ``DistributedSampler`` shuffle (seed + epoch) cut into batches of
    ``batch_size // world``. Rank r's batch j is every ``world``-th index of the global batch j, so the global
    batches are the same at any world size (for ``n`` divisible by ``world``; otherwise the sampler pads the last
    one with repeated samples)."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(torch.tensor(list(sampler), dtype=torch.long).split(batch_size // world))


def train(data: MTLData, config: RunConfig, settings: TrainSettings,
          log: Callable[[str], None] = print, dominance: bool = False) -> tuple[MTLModel, dict[str, Any]]:
    """Train ``config`` on ``data.train``, evaluating on ``data.test`` after every epoch.

    Returns the model and a JSON-ready record: the config, the backends used, per-epoch train losses and test
    metrics, the median step time (forward + the method's backward and optimizer step, no data loading), and with
    DGR the median time of the penalty alone and its share of the step. With ``dominance``, ``"dominance"`` holds
    each task's rAU per shared layer of the encoder (``TaskDominance.summary``; not for meta).

    Under ``torch.distributed`` (``torchrun``), every rank trains on its share of each global batch of
    ``settings.batch_size`` (``epoch_batches``) and the library's steps keep the ranks equal; rank 0 alone
    evaluates and logs (the other ranks' records hold no metrics), the train losses are averaged over the ranks.
    """
    check_config(config, settings.batch_size)
    if dominance:
        check_dominance(config)
    device = torch.device(settings.device)
    sync = sync_for(None)
    if dominance and sync is not None:
        raise ValueError("the dominance tracker runs in one process: its per-task gradients and random draws are "
                         "this process's")
    world, rank = (1, 0) if sync is None else (sync.world_size, sync.rank)
    if settings.batch_size % world:
        raise ValueError(f"batch size {settings.batch_size} is the global batch: it must be divisible by the "
                         f"{world} ranks")
    # meta splits each batch into an inner and an outer half; the DeepLab head's image-pooling BatchNorm sees one
    # value per channel and sample, which training mode refuses for a single sample
    min_batch = 2 if config.meta or (settings.heads == "paper" and data.train.dense) else 1
    if settings.batch_size // world < min_batch:
        raise ValueError(f"batch size {settings.batch_size // world} per process: {config.spec} with "
                         f"{settings.heads} heads needs >= {min_batch}")
    torch.manual_seed(settings.seed)
    model = make_model(data.train, heads=settings.heads).to(device)
    backends = {  # resolved first: a backend that cannot run here fails before any training
        "dgr_penalty": dgr_penalty_backend(device, torch.float32, settings.dgr_backend) if config.dgr_lambda else None,
        "adatask": adatask_backend(device) if config.optimizer == "adatask" else None,
    }
    step = _Step(config, model, data.train, settings, device, dominance=dominance)
    if step.dummy is not None and "linear" not in step.dummy.kinds:  # no fused kernel reads module heads
        backends["dgr_penalty"] = "torch (" + ", ".join(sorted(set(step.dummy.kinds))) + " heads)"
    names = [t.name for t in data.tasks]
    history, step_times = [], []
    for epoch in range(1, settings.epochs + 1):
        t_epoch = time.perf_counter()
        loss_sum = torch.zeros(len(names), dtype=torch.float64)
        batches = epoch_batches(len(data.train), settings.batch_size, epoch, settings.seed, world, rank)
        if len(batches[-1]) < min_batch:
            batches = batches[:-1]
        bar = _progress(len(batches), f"{config.spec} epoch {epoch}/{settings.epochs}") if rank == 0 else None
        for idx in batches:
            x, ys = data.train.batch(idx)
            x, ys = x.to(device), [y.to(device) for y in ys]
            _sync(device)
            t0 = time.perf_counter()
            losses = step(x, ys)
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            loss_sum += losses.double().cpu()
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        step.end_epoch()
        if sync is not None:
            sync.all_reduce_mean_([loss_sum])
        metrics = evaluate(model, data.test, device, settings.eval_batch_size) if rank == 0 else {}
        train_loss = dict(zip(names, (loss_sum / len(batches)).tolist()))
        history.append({"epoch": epoch, "train_loss": train_loss, "metrics": metrics,
                        "seconds": time.perf_counter() - t_epoch})
        if rank == 0:
            log(f"  [{config.spec}] epoch {epoch}/{settings.epochs}  "
                + "  ".join(f"{t.name} {metrics[t.name]:.4g}" for t in data.tasks)
                + f"  ({history[-1]['seconds']:.1f} s)")
    record: dict[str, Any] = {
        "spec": config.spec, "config": asdict(config),
        "backends": backends,
        "epochs": history, "final": history[-1]["metrics"] if history else {},
        "step_ms": 1e3 * statistics.median(step_times) if step_times else None,
        "dgr_penalty_ms": None, "dgr_share": None,
    }
    if step.dummy is not None and step_times:  # on every rank: the penalty is a collective under distributed
        x, ys = data.train.batch(torch.arange(min(settings.batch_size // world, len(data.train))))
        record["dgr_penalty_ms"] = _penalty_ms(step, x.to(device), [y.to(device) for y in ys], device)
        record["dgr_share"] = record["dgr_penalty_ms"] / record["step_ms"]
    if step.tracker is not None:
        record["dominance"] = step.tracker.summary()
    return model, record
