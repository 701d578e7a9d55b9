"""Distributed training (torch.distributed, gloo, 2 CPU processes spawned by the tests): every training object keeps
the ranks bitwise equal, and W ranks on equal local batches equal one process on the concatenated batch.

Every method of ``dgr_fast.mtl.methods`` x {sgd, adam, adatask} where defined, with and without DGR, on row and
dense features, ``grad_mode`` loop and batched, with and without a DDP-wrapped model; task-SAM, meta MTL, and a
plain DDP loop with the penalty in the loss. Each rank seeds torch's global RNG differently (as a data-augmenting
user would), so nothing random in the library may rely on equal streams: the one-process run is rank 0's stream.
The whole matrix runs in one spawned group (module fixture); each case is its own test.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dgr_fast import AdaTask, DummyHeads, DummyTask
from dgr_fast.distributed import run_local
from dgr_fast.mtl import DWA, METHODS, MTLStep, MetaMTL, TaskSAM, Weighting, make_method, per_task_grads
from dgr_fast.mtl.aggregators import GradDrop, PCGrad, Sum

STEPS, GLOBAL_ROWS, GLOBAL_IMAGES, LAMBDA = 20, 8, 4, 0.3
TASKS = [DummyTask("ce", 3), DummyTask("mse", 1), DummyTask("bce", 2)]


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "step" (MTLStep), "sam", "meta", "plain" (a DDP loop with the penalty in the loss), "recipe"
    method: str = "ew"
    optimizer: str = "sgd"
    dgr: bool = False
    dense: bool = False
    grad_mode: str = "loop"
    ddp: bool = False
    dtype: torch.dtype = torch.float64
    resample: str = "never"
    heads: str = "linear"  # the dummy heads: "linear", or module heads of the rows' MLP / the maps' conv kind

    @property
    def name(self) -> str:
        parts = [self.kind, self.method, self.optimizer, "dgr" if self.dgr else "plain",
                 "dense" if self.dense else "rows", self.grad_mode]
        parts += ["ddp"] * self.ddp + ["fp32"] * (self.dtype == torch.float32) + [f"resample_{self.resample}"] * (
            self.resample != "never") + [f"{self.heads}_heads"] * (self.heads != "linear")
        return "-".join(parts)


def _cases() -> list[Case]:
    cases = []
    for method, optimizer, dgr, dense in itertools.product(METHODS, ("sgd", "adam", "adatask"), (False, True),
                                                           (False, True)):
        weighting = isinstance(make_method(method, 3), Weighting)
        if optimizer == "adatask" and (not weighting or method == "uw"):
            continue  # combinations the library does not define
        modes = ("loop", "batched") if optimizer == "adatask" or not weighting else ("loop",)
        cases += [Case("step", method, optimizer, dgr, dense, mode) for mode in modes]
    cases += [Case("step", "ew", "adam", True, True, ddp=True), Case("step", "pcgrad", "sgd", True, False, ddp=True),
              Case("step", "ew", "adatask", True, False, "batched", ddp=True),
              Case("step", "cagrad", "adam", True, True, "batched", dtype=torch.float32),
              Case("step", "rlw", "adatask", True, True, dtype=torch.float32),
              Case("step", "ew", "sgd", True, False, resample="step"),
              Case("step", "ew", "sgd", True, False, heads="module"), Case("step", "pcgrad", "adam", True, True, heads="module"),
              Case("step", "ew", "adatask", True, True, heads="module"), Case("plain", optimizer="sgd", dgr=True, ddp=True,
                                                                              heads="module")]
    for method, dgr in itertools.product(("ew", "pcgrad", "cagrad"), (False, True)):
        cases.append(Case("sam", method, "adam", dgr, dense=dgr))
    cases += [Case("sam", "mgda", "adam", True, ddp=True)]
    cases += [Case("meta", optimizer="adam"), Case("meta", optimizer="sgd", grad_mode="second_order"),
              Case("meta", optimizer="adam", ddp=True)]
    cases += [Case("plain", optimizer="sgd", dgr=True, ddp=True), Case("plain", optimizer="adam", dgr=True, dense=True,
                                                                        ddp=True)]
    cases += [Case("recipe", "pcgrad", "sgd", True), Case("recipe", "graddrop", "adam", True, True),
              Case("recipe", "ew", "adatask", True)]
    return cases


CASES = _cases()


class Net(nn.Module):
    def __init__(self, dense: bool) -> None:
        super().__init__()
        if dense:
            self.encoder = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh())
            self.heads = nn.ModuleList(nn.Conv2d(6, t.out_features, 1) for t in TASKS)
        else:
            self.encoder = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
            self.heads = nn.ModuleList(nn.Linear(6, t.out_features) for t in TASKS)

    def forward(self, x):
        z = self.encoder(x)
        return z, [h(z) for h in self.heads]


def _dummy_tasks(case: Case) -> list[DummyTask]:
    if case.heads == "linear":
        return TASKS

    def factory(c):  # rows: the UTKFace kind of MLP; maps: conv - BatchNorm - ReLU - 1x1 conv
        if case.dense:
            return lambda: nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, c, 1))
        return lambda: nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, c), nn.ReLU())
    return [DummyTask(t.loss, t.out_features, head=factory(t.out_features)) for t in TASKS]


def _batch(case: Case, step: int, rank: int, world: int, half: int | None = None):
    """This rank's share of the global batch of ``step`` (``half``: 0 / 1, meta's inner and outer batches)."""
    g = torch.Generator().manual_seed(7919 * step + 13 * (half or 0) + 1)
    n = GLOBAL_IMAGES if case.dense else GLOBAL_ROWS
    x = torch.randn((n, 2, 3, 4) if case.dense else (n, 5), generator=g, dtype=case.dtype)
    row = (n, 3, 4) if case.dense else (n,)
    per_pixel = (lambda c: (n, c, 3, 4)) if case.dense else (lambda c: (n, c))
    ys = [torch.randint(0, 3, row, generator=g), torch.randn(per_pixel(1), generator=g, dtype=case.dtype),
          torch.rand(per_pixel(2), generator=g, dtype=case.dtype)]
    share = slice(rank * n // world, (rank + 1) * n // world)
    return x[share], [y[share] for y in ys]


def _losses(outs, ys):
    return [F.cross_entropy(outs[0], ys[0]), F.mse_loss(outs[1], ys[1]), F.binary_cross_entropy_with_logits(outs[2], ys[2])]


def _dgr_inputs(ys):
    return {"dgr_targets": ys, "dgr_masks": [None, ys[1][:, 0] > 0, None]}  # per-rank valid counts differ


def _optimizer(case: Case, model: Net, extra, group):
    shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    if case.optimizer == "adatask":
        return AdaTask(shared, num_tasks=3, lr=1e-2, task_params=heads, backend="torch", process_group=group)
    params = shared + heads + extra
    return torch.optim.SGD(params, lr=0.1, momentum=0.9) if case.optimizer == "sgd" else torch.optim.Adam(params, lr=1e-2)


def train(case: Case, rank: int, world: int, group) -> torch.Tensor:
    """``STEPS`` steps of ``case`` on this rank's shards (``world`` = 1: the whole batches); the parameters after."""
    torch.manual_seed(0)
    model = Net(case.dense).to(case.dtype)
    torch.manual_seed(1000 + rank)  # per-rank streams, as a data-augmenting user would have
    module = nn.parallel.DistributedDataParallel(model) if case.ddp and group is None else model
    method = make_method(case.method, 3)
    if isinstance(method, DWA):
        method = DWA(process_group=group)
    if isinstance(method, nn.Module):
        method = method.to(case.dtype)  # uncertainty weighting's log-variances: fp32 unless moved
    extra = list(method.parameters()) if isinstance(method, nn.Module) else []
    opt = _optimizer(case, model, extra, group)
    dummy = DummyHeads(6, _dummy_tasks(case), dtype=case.dtype, backend="torch", resample=case.resample,
                       process_group=group) if case.dgr else None
    weighting = method if isinstance(method, Weighting) else None
    aggregator = None if weighting is not None else method
    shared, heads = list(model.encoder.parameters()), [list(h.parameters()) for h in model.heads]
    for step in range(STEPS):
        x, ys = _batch(case, step, rank, world)
        dgr = _dgr_inputs(ys) if case.dgr else {}
        if case.kind == "step":
            runner = MTLStep(shared, [p for h in heads for p in h], opt, weighting=weighting, aggregator=aggregator,
                             dummy_heads=dummy, dgr_lambda=LAMBDA if case.dgr else 0.0, grad_mode=case.grad_mode,
                             process_group=group)
            z, outs = module(x)
            runner.step(_losses(outs, ys), features=z, **dgr)
        elif case.kind == "sam":
            sam = TaskSAM(model, shared, heads, opt, aggregator=aggregator or Sum(), rho=0.05, dummy_heads=dummy,
                          dgr_lambda=LAMBDA if case.dgr else 0.0, process_group=group)

            def closure():
                z, outs = module(x)
                return (_losses(outs, ys), z) if case.dgr else _losses(outs, ys)
            sam.step(closure, **dgr)
        elif case.kind == "meta":
            meta = MetaMTL(module, shared, lambda out, y: _losses(out[1], y), opt, alpha=0.05,
                           second_order=case.grad_mode == "second_order", process_group=group)
            meta.step(_batch(case, step, rank, world, 0), _batch(case, step, rank, world, 1))
        elif case.kind == "plain":  # the README's loop: the penalty in the loss, DDP averages the gradients
            opt.zero_grad()
            z, outs = module(x)
            (sum(_losses(outs, ys)) + LAMBDA * dummy(z, dgr["dgr_targets"], masks=dgr["dgr_masks"])).backward()
            opt.step()
        elif case.optimizer == "adatask":  # "recipe": this rank's per-task gradients handed to AdaTask.step
            opt.zero_grad()
            z, outs = module(x)
            losses = torch.stack(_losses(outs, ys)) + LAMBDA * dummy.per_task(z, dgr["dgr_targets"],
                                                                             masks=dgr["dgr_masks"])
            G = per_task_grads(losses, shared, retain_graph=True)  # local: AdaTask.step averages what it is given
            sum(losses).backward(inputs=[p for h in heads for p in h])
            opt.step(task_grads=G)
        else:  # "recipe": per_task_grads and an aggregator called directly, as the README's distributed section says
            opt.zero_grad()
            z, outs = module(x)
            losses = _losses(outs, ys) + [LAMBDA * dummy(z, dgr["dgr_targets"], masks=dgr["dgr_masks"])]
            G = per_task_grads(losses, shared + [p for h in heads for p in h], process_group=group)
            width = sum(p.numel() for p in shared)
            seeded = {"pcgrad": PCGrad, "graddrop": GradDrop}[case.method](generator=torch.Generator().manual_seed(step))
            update = seeded(G[:3, :width]) + G[3, :width]
            for p, g in zip(shared, update.split([p.numel() for p in shared])):
                p.grad = g.view_as(p)
            for p, g in zip([p for h in heads for p in h], G[:3, width:].sum(0).split([p.numel() for h in heads for p in h])):
                p.grad = g.view_as(p)
            opt.step()
        if isinstance(method, DWA) and step % 5 == 4:
            method.end_epoch()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _matrix(rank: int, world: int, cases: list[Case]) -> dict[str, tuple[bool, float]]:
    out = {}
    for case in cases:
        mine = train(case, rank, world, None)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            one = train(case, 0, 1, "local")
            equal = all(torch.equal(g, gathered[0]) for g in gathered)
            out[case.name] = (equal, float((mine - one).abs().max() / one.abs().max()))
    return out


@pytest.fixture(scope="module")
def matrix():
    return run_local(_matrix, CASES, timeout=600)[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ranks_equal_and_match_one_process(matrix, case):
    equal, rel = matrix[case.name]
    assert equal, f"{case.name}: the ranks' parameters differ after {STEPS} steps"
    tol = 1e-10 if case.dtype == torch.float64 else 1e-5
    assert rel <= tol, f"{case.name}: {rel:.3g} from one process on the global batch (tolerance {tol:g})"


def _cli(rank: int, world: int, argv: list[str]) -> int:
    from dgr_fast.cli import main

    return main(argv)


def test_train_command_on_two_ranks_matches_one_process(tmp_path):
    """`dgr-fast train` under a 2-rank group (as torchrun runs it): one JSON, from rank 0, whose metrics equal the
    one-process run's of the same seed to fp32 rounding."""
    import json

    from dgr_fast.cli import main

    argv = ["train", "--dataset", "synthetic", "--train-size", "256", "--test-size", "128", "--epochs", "1",
            "--compare", "ew+dgr,pcgrad+dgr,adatask+dgr", "--no-plot"]
    assert run_local(_cli, argv + ["--json", str(tmp_path / "two.json")], timeout=300) == [0, 0]
    assert main(argv + ["--json", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_process": 64}
    assert one["distributed"] is None
    for a, b in zip(two["runs"], one["runs"]):
        assert a["spec"] == b["spec"]
        for task, value in b["final"].items():
            assert abs(a["final"][task] - value) <= 1e-5 * abs(value), (a["spec"], task)
