"""Benchmark distributed training steps: each method at world size 1 and 2, and the bytes its collectives carry.

    python benchmarks/bench_distributed.py [--quick] [--device cpu|cuda] [--world N] [--steps N] [--out DIR]

An MLP encoder (in 128 -> 512 -> 512 -> 256 features, ReLU; 0.46M parameters) with three row tasks (10-class ce,
regression, 5-label bce), K = 3, a global batch of 256 rows split over the ranks. Every method runs through the
library's own steps (``MTLStep``; AdaTask through it), which synchronise over the default process group; "ddp" is
the baseline: the same model wrapped in ``DistributedDataParallel``, ``sum(losses).backward()`` and SGD, DDP's
bucketed all-reduce overlapping the backward. For each method: the median step time at world size 1 (one process,
no collectives) and at ``--world`` ranks (CPU: gloo on 127.0.0.1, one torch thread per process; CUDA: NCCL, one GPU
per process), and the bytes handed to collectives per step on one rank (the payload; a ring all-reduce moves about
2 (W - 1) / W times it over each link), counted by wrapping ``torch.distributed.all_reduce`` / ``broadcast`` (the
baseline's DDP runs its all-reduce through the equivalent Python communication hook so that it is counted too). Per-task methods send the K per-task gradients (plus the heads'
gradients), about K times DDP's bytes; loss weightings send one gradient, DDP's bytes. Prints a table and writes
``distributed_<device>.csv`` and ``distributed_<device>.png`` (when matplotlib is installed) to ``--out``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# The ranks are spawned processes that import this file by its module name (in-process callers load it as
# "bench_distributed"): its folder must be on their path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dgr_fast import AdaTask, DummyHeads, DummyTask  # noqa: E402
from dgr_fast.benchmarks import bar_plot, bench_parser, write_csv  # noqa: E402
from dgr_fast.distributed import run_local  # noqa: E402
from dgr_fast.mtl import MTLStep, make_method  # noqa: E402

TASKS = [DummyTask("ce", 10), DummyTask("mse", 1), DummyTask("bce", 5)]
METHODS = ("ddp", "ew", "ew+dgr", "pcgrad", "pcgrad+dgr", "cagrad+dgr", "adatask", "adatask+dgr")
GLOBAL_BATCH, LAMBDA = 256, 0.1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                     nn.Linear(512, 256), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(256, t.out_features) for t in TASKS)

    def forward(self, x):
        z = self.encoder(x)
        return z, [h(z) for h in self.heads]


def _losses(outs, ys):
    return [F.cross_entropy(outs[0], ys[0]), F.mse_loss(outs[1], ys[1]), F.binary_cross_entropy_with_logits(outs[2], ys[2])]


class Counter:
    """Bytes handed to ``all_reduce`` and ``broadcast``: the library's collectives and DDP's hook's."""

    def __init__(self) -> None:
        self.bytes = 0
        self._all_reduce, self._broadcast = dist.all_reduce, dist.broadcast

    def install(self) -> None:
        def all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._all_reduce(tensor, *args, **kwargs)

        def broadcast(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._broadcast(tensor, *args, **kwargs)

        dist.all_reduce, dist.broadcast = all_reduce, broadcast



def _runner(method: str, model: Net, counter: Counter | None, device: torch.device):
    """A function of (x, ys) that takes one training step of ``method``."""
    shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    if method == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
        if counter is not None and dist.is_initialized():
            # DDP's default all-reduce in Python (the C++ reducer's own call bypasses torch.distributed.all_reduce):
            # the same collective, so the counter sees its buckets.
            ddp.register_comm_hook(None, allreduce_hook)
        opt = torch.optim.SGD(shared + heads, lr=1e-3)

        def step(x, ys):
            opt.zero_grad()
            sum(_losses(ddp(x)[1], ys)).backward()
            opt.step()
        return step
    name, _, dgr = method.partition("+")
    dummy = DummyHeads(256, TASKS, seed=0, device=device) if dgr else None
    if name == "adatask":
        opt = AdaTask(shared, num_tasks=3, lr=1e-3, task_params=heads)
        mtl = MTLStep(shared, heads, opt, dummy_heads=dummy, dgr_lambda=LAMBDA if dgr else 0.0)
    else:
        opt = torch.optim.SGD(shared + heads, lr=1e-3)
        method_obj = make_method(name, 3)
        kind = {"aggregator": method_obj} if not isinstance(method_obj, nn.Module) else {"weighting": method_obj}
        mtl = MTLStep(shared, heads, opt, dummy_heads=dummy, dgr_lambda=LAMBDA if dgr else 0.0, **kind)

    def step(x, ys):
        z, outs = model(x)
        mtl.step(_losses(outs, ys), features=z, dgr_targets=ys)
    return step


def _measure(rank: int, world: int, methods: list[str], steps: int, device_type: str) -> list[dict]:
    """Per method ``{"method", "world", "step_ms", "bytes_per_step"}`` on this rank (world 1: no group)."""
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    counter = Counter() if world > 1 else None
    if counter is not None:
        counter.install()
    g = torch.Generator().manual_seed(0)
    local = GLOBAL_BATCH // world
    x = torch.randn(local, 128, generator=g).to(device)
    ys = [torch.randint(0, 10, (local,), generator=g).to(device), torch.randn(local, 1, generator=g).to(device),
          torch.rand(local, 5, generator=g).to(device)]
    rows = []
    for method in methods:
        torch.manual_seed(0)
        model = Net().to(device)
        step = _runner(method, model, counter, device)
        times, sent = [], []
        for i in range(steps + 3):  # three warm-up steps
            if counter is not None:
                counter.bytes = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            step(x, ys)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
                sent.append(counter.bytes if counter is not None else 0)
        rows.append({"method": method, "world": world, "step_ms": 1e3 * statistics.median(times),
                     "bytes_per_step": statistics.median(sent)})
    return rows


def main(argv=None) -> int:
    p = bench_parser(__doc__, __file__, "10 steps per method instead of 30")
    p.add_argument("--world", type=int, default=2, help="ranks of the distributed runs (default 2)")
    p.add_argument("--steps", type=int, help="timed steps per method (default 30, --quick 10)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the world-size-1 run (default 1, as each "
                                                          "rank of the distributed runs)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.world < 2:
        p.error(f"unknown methods {unknown}" if unknown else "--world must be at least 2")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        # Not an error: `dgr-fast bench all --device cuda` on a one-GPU machine runs the other benchmarks.
        print(f"# skipped: --device cuda --world {args.world} needs {args.world} GPUs (one per rank); this machine "
              f"has {torch.cuda.device_count()}")
        return 0
    steps = args.steps or (10 if args.quick else 30)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        single = _measure(0, 1, methods, steps, args.device)
    finally:
        torch.set_num_threads(threads)
    multi = run_local(_measure, methods, steps, args.device, world=args.world,
                      backend="nccl" if args.device == "cuda" else "gloo", timeout=1800)[0]
    ddp_bytes = next((r["bytes_per_step"] for r in multi if r["method"] == "ddp"), None)
    rows = []
    print(f"# global batch {GLOBAL_BATCH}, {steps} steps per method, device {args.device}, "
          f"torch {torch.__version__}, {args.world} ranks ({'nccl' if args.device == 'cuda' else 'gloo'})")
    print(f"{'method':>12} {'ms, 1 rank':>11} {f'ms, {args.world} ranks':>12} {'bytes/step':>12} {'x DDP bytes':>11}")
    for one, many in zip(single, multi):
        ratio = many["bytes_per_step"] / ddp_bytes if ddp_bytes else float("nan")
        rows.append({"method": one["method"], "step_ms_1": one["step_ms"], f"step_ms_{args.world}": many["step_ms"],
                     "bytes_per_step": many["bytes_per_step"], "bytes_vs_ddp": ratio})
        print(f"{one['method']:>12} {one['step_ms']:11.2f} {many['step_ms']:12.2f} {many['bytes_per_step']:12.0f} "
              f"{ratio:11.2f}")
    write_csv(os.path.join(args.out, f"distributed_{args.device}.csv"), rows)
    plot_rows = [{"method": r["method"], "ranks": f"{w} rank{'s' * (w > 1)}", "ms": r[f"step_ms_{w}"]}
                 for r in rows for w in (1, args.world)]
    bar_plot(os.path.join(args.out, f"distributed_{args.device}.png"), plot_rows, lambda r: r["method"], "ranks", "ms",
             "ms per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
