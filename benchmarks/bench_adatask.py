"""Benchmark the AdaTask step and per-task gradients.

Step: time per step (median of ``--reps``) and achieved bandwidth (the bytes the step must move: θ read and written,
K gradients read, 2K fp32 moments read and written, over the time) for each provider, against the floor: the best time
of ``floor_pass``, which moves exactly those bytes with the step's own mix, the K gradients read once and θ and the 2K
moments each read and written in place (no read-for-ownership on the writes, which a ``copy_`` into a fresh buffer pays
and the step does not), timed next to each case. ``floor GB/s`` is its bandwidth, ``of floor`` the achieved bandwidth
as a fraction of it, ``x floor`` the inverse (step time / floor time), ``x inpl`` the step time against the bandwidth
of a single in-place ``mul_`` stream:

- ``loop``: the authors'-style step, task by task and tensor by tensor with in-place torch ops (as their code does);
- ``torch``: the foreach backend; ``cpp``, ``triton``, ``cuda``: the fused backends available here.

Shapes: P from 1M up (split into 8 tensors), K in 2, 3, 8, 40; and the parameter shapes of a ResNet-18 trunk
(11.2M parameters in 60 tensors) with K = 4. Per-task gradients: loop vs batched on a small conv encoder.

    python benchmarks/bench_adatask.py [--device cpu|cuda] [--quick] [--max-gib 6] [--parts synthetic,resnet,grads]
                                       [--sizes 1,4] [--tasks 2,8] [--out DIR]

Prints a table per part and writes ``adatask_step_<device>_<time>.csv`` with its plot (``.png``, time / floor, when
matplotlib is installed) and ``adatask_grads_<device>_<time>.csv`` to ``--out`` (default ``benchmarks/out``); the
time stamp keeps earlier runs, whose figures moved with the load of a shared machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dgr_fast  # noqa: E402
from dgr_fast import AdaTask  # noqa: E402
from dgr_fast.backends import backend_status  # noqa: E402
from dgr_fast.benchmarks import bar_plot, bench_parser, write_csv  # noqa: E402
from dgr_fast.mtl import per_task_grads  # noqa: E402

PARTS = ("synthetic", "resnet", "grads")


def resnet18_trunk_shapes() -> list[tuple[int, ...]]:
    """conv1, bn1 and layer1..layer4 of torchvision's resnet18 (no fc): 60 tensors, 11,176,512 parameters."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            ci = cin if block == 0 else cout
            shapes += [(cout, ci, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and (stride != 1 or ci != cout):
                shapes += [(cout, ci, 1, 1), (cout,), (cout,)]
        cin = cout
    return shapes


def synthetic_shapes(total: int, pieces: int = 8) -> list[tuple[int, ...]]:
    base = total // pieces
    return [(base,)] * (pieces - 1) + [(total - base * (pieces - 1),)]


def timer(device: torch.device):
    """``run(fn, reps, stat=statistics.median)``: ``stat`` of the seconds of ``reps`` calls of ``fn``."""
    if device.type == "cuda":
        def run(fn, reps, stat=statistics.median):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return stat(times)
    else:
        def run(fn, reps, stat=statistics.median):
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return stat(times)
    return run


def inplace_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Bytes per second of an in-place ``mul_`` over a large buffer (one read and one write). Unlike ``copy_`` it
    pays no read-for-ownership on the destination, like the AdaTask step, whose writes all go to data it just read."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    run = timer(device)
    x.mul_(1.0)
    return 2 * nbytes / run(lambda: x.mul_(1.0), reps)


class AuthorsLoop:
    """The per-task step as the authors' code writes it: for each parameter, for each task, in-place Adam ops."""

    def __init__(self, params, K, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.K, self.lr, self.betas, self.eps = params, K, lr, betas, eps
        self.m = [torch.zeros(K, *p.shape, device=p.device) for p in params]
        self.v = [torch.zeros(K, *p.shape, device=p.device) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, task_grads):
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1**self.t)
        bc2_sqrt = (1 - b2**self.t) ** 0.5
        for p, g, m, v in zip(self.params, task_grads, self.m, self.v):
            for k in range(self.K):
                m[k].mul_(b1).add_(g[k], alpha=1 - b1)
                v[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                denom = (v[k].sqrt() / bc2_sqrt).add_(self.eps)
                p.addcdiv_(m[k], denom, value=-step_size)


def providers(device: torch.device) -> list[str]:
    names = ["loop", "torch"]
    for b in ("cpp", "triton", "cuda"):
        if backend_status(b).available and (b != "triton" or device.type == "cuda") and (b == "cpp") == (device.type == "cpu"):
            names.append(b)
    return names


def bench_step(shapes, K, provider, device, reps):
    params = [torch.randn(s, device=device) for s in shapes]
    P = sum(p.numel() for p in params)
    flat = torch.randn(K, P, device=device) * 1e-2
    if provider == "loop":
        views, off = [], 0
        for p in params:
            views.append(flat[:, off : off + p.numel()].view(K, *p.shape))
            off += p.numel()
        opt = AuthorsLoop(params, K)
        fn = lambda: opt.step(views)  # noqa: E731
    else:
        opt = AdaTask(params, K, lr=1e-3, backend=provider)
        fn = lambda: opt.step(task_grads=flat)  # noqa: E731
    fn()
    seconds = timer(device)(fn, reps)
    del opt, flat, params
    return seconds, P


def step_bytes(P: int, K: int, param_bytes: int = 4, grad_bytes: int = 4) -> int:
    # θ read + written, K gradients read, 2K fp32 moments read + written.
    return P * (2 * param_bytes + K * grad_bytes + 2 * 2 * K * 4)


def floor_tensors(P: int, K: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers of the sizes one adam step over P fp32 parameters touches: the K gradients ``[K, P]``, the first
    moments ``[K, P]``, and the second moments with θ after them in one ``[K * P + P]`` buffer (all fp32)."""
    grads = torch.randn(K, P, device=device) * 1e-2
    exp_avgs = torch.zeros(K, P, device=device)
    exp_avg_sqs_and_theta = torch.zeros(K * P + P, device=device)
    return grads, exp_avgs, exp_avg_sqs_and_theta


def floor_pass(grads: torch.Tensor, exp_avgs: torch.Tensor, exp_avg_sqs_and_theta: torch.Tensor) -> None:
    """Move the step's bytes with the step's mix and nothing else: the gradients read once (the operand of the first
    moments' in-place add), θ and every moment read and written once, in place. Two ops over flat buffers, not one per
    tensor: per-op thread barriers are overhead the fused step does not pay, and on a loaded machine they made a
    per-tensor floor slower than the step."""
    exp_avgs.add_(grads)
    exp_avg_sqs_and_theta.mul_(1.0)


def floor_seconds(P: int, K: int, device: torch.device, reps: int) -> float:
    """The floor of a step over P parameters and K tasks: the best of ``reps`` timed ``floor_pass`` calls (the best,
    as a floor is what the machine can do; at least 10 of them, cheap next to the providers, so that a busy moment of
    a shared machine does not make the floor the slower)."""
    tensors = floor_tensors(P, K, device)
    floor_pass(*tensors)
    return timer(device)(lambda: floor_pass(*tensors), max(reps, 10), stat=min)


def bench_grads(device, K, mode, reps, batch=32):
    torch.manual_seed(0)
    enc = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.BatchNorm2d(128), torch.nn.ReLU(),
    ).to(device)  # fmt: skip
    heads = torch.nn.ModuleList([torch.nn.Conv2d(128, 4, 1) for _ in range(K)]).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    params = list(enc.parameters())

    def fn():
        z = enc(x)
        losses = [h(z).square().mean() for h in heads]
        per_task_grads(losses, params, features=z if mode == "batched" else None, mode=mode)

    fn()
    return timer(device)(fn, reps), sum(p.numel() for p in params)


def int_list(text: str) -> list[int]:
    """Comma-separated integers (an argparse type)."""
    return [int(x) for x in text.split(",")]


def float_list(text: str) -> list[float]:
    """Comma-separated numbers (an argparse type)."""
    return [float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), measure, print the tables and write the files."""
    ap = bench_parser(__doc__, __file__, "P = 1M only, K = 2 and 8, fewer repetitions")
    ap.add_argument("--max-gib", type=float, default=6.0, help="skip shapes whose tensors exceed this many GiB")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated parts to run: synthetic (the P x K step grid), resnet (the ResNet-18 trunk "
                         "step), grads (per-task gradients); default all")
    ap.add_argument("--resnet-only", action="store_true", help="only the ResNet-18 trunk step (same as --parts resnet)")
    ap.add_argument("--sizes", type=float_list, default=None, metavar="MI",
                    help="synthetic P, in Mi parameters, comma-separated (default 1,4,16, on CUDA also 64,100; --quick: 1)")
    ap.add_argument("--tasks", type=int_list, default=None, metavar="K",
                    help="synthetic K, comma-separated (default 2,3,8,40; --quick: 2,8)")
    args = ap.parse_args(argv)
    parts = {"resnet"} if args.resnet_only else set(args.parts.split(","))
    if not parts <= set(PARTS):
        ap.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))}; choose from {', '.join(PARTS)}")
    device = torch.device(args.device)
    reps = args.reps or (3 if args.quick else 7)
    sizes = [1] if args.quick else [1, 4, 16]
    if device.type == "cuda":
        sizes += [] if args.quick else [64, 100]
    sizes = args.sizes or sizes
    tasks = args.tasks or ([2, 8] if args.quick else [2, 3, 8, 40])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

    inplace_size = 256 << 20 if device.type == "cpu" else 2 << 30
    print(f"# dgr_fast {dgr_fast.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"device {device}, threads {torch.get_num_threads()}, {datetime.date.today()}")  # fmt: skip
    print("# floor: the step's bytes moved with its own read/write mix (floor_pass, best of the repetitions), timed "
          f"before each case's providers; x inpl: against one in-place mul_ stream of {inplace_size >> 20} MiB")  # fmt: skip
    rows = []
    cases = [(f"P={m:g}M", synthetic_shapes(int(m * 2**20)), K) for m in sizes for K in tasks] if "synthetic" in parts else []
    cases += [("resnet18-trunk", resnet18_trunk_shapes(), 4)] if "resnet" in parts else []
    header = (f"{'case':>16} {'K':>3} {'provider':>8} {'ms/step':>10} {'GB/s':>7} {'floor GB/s':>10} {'floor ms':>9} "
              f"{'of floor':>8} {'x floor':>8} {'x inpl':>7} {'vs loop':>8}")  # fmt: skip
    print(header)
    for name, shapes, K in cases:
        P = sum(torch.Size(s).numel() for s in shapes)
        nbytes = step_bytes(P, K)
        if P * (1 + 3 * K) * 4 > args.max_gib * 2**30:
            print(f"{name:>16} {K:>3}  skipped: needs more than {args.max_gib} GiB")
            continue
        # Measured next to each case: on a shared machine the bandwidth drifts over a run.
        floor = floor_seconds(P, K, device, reps)
        bw_inplace = inplace_bandwidth(device, inplace_size, reps)
        loop_s = None
        for prov in providers(device):
            s, _ = bench_step(shapes, K, prov, device, reps)
            loop_s = s if prov == "loop" else loop_s
            row = dict(case=name, P=P, K=K, provider=prov, ms=s * 1e3, gbps=nbytes / s / 1e9,
                       floor_gbps=nbytes / floor / 1e9, floor_ms=floor * 1e3, of_floor=floor / s, x_floor=s / floor,
                       inplace_gbps=bw_inplace / 1e9, x_inplace_floor=s * bw_inplace / nbytes,
                       speedup_vs_loop=loop_s / s if loop_s else float("nan"))  # fmt: skip
            rows.append(row)
            print(f"{name:>16} {K:>3} {prov:>8} {row['ms']:>10.2f} {row['gbps']:>7.2f} {row['floor_gbps']:>10.2f} "
                  f"{row['floor_ms']:>9.2f} {row['of_floor']:>8.2f} {row['x_floor']:>8.2f} {row['x_inplace_floor']:>7.2f} "
                  f"{row['speedup_vs_loop']:>8.2f}")  # fmt: skip
    path = os.path.join(args.out, f"adatask_step_{device.type}_{stamp}")
    write_csv(path + ".csv", rows)
    bar_plot(path + ".png", rows, lambda r: f"{r['case']} K={r['K']}", "provider", "x_floor",
             "time / floor (1 = at the floor)", log=True)
    if "grads" not in parts:
        return

    print("\n# per-task gradients of a 4-conv encoder (batch 32, 32x32), forward included")
    grows = []
    print(f"{'K':>3} {'mode':>8} {'ms':>10} {'vs loop':>8}")
    for K in ([4] if args.quick else [2, 4, 8]):
        loop_s = None
        for mode in ("loop", "batched"):
            s, P = bench_grads(device, K, mode, reps)
            loop_s = s if mode == "loop" else loop_s
            grows.append(dict(K=K, mode=mode, P=P, ms=s * 1e3, speedup_vs_loop=loop_s / s))
            print(f"{K:>3} {mode:>8} {s * 1e3:>10.2f} {loop_s / s:>8.2f}")
    write_csv(os.path.join(args.out, f"adatask_grads_{device.type}_{stamp}.csv"), grows)


if __name__ == "__main__":
    main()
