"""Benchmark one training step per MTL method, with and without DGR.

    python benchmarks/bench_step.py [--device cpu|cuda] [--quick] [--blocks N] [--methods ew,pcgrad]
                                    [--variants none,cpp] [--out DIR]

A small convolutional encoder (Conv(3,32,3)-ReLU-Conv(32,64,3)-ReLU, then ``--blocks`` more Conv(64,64,3)-ReLU;
features [B, 64, H, W]) with three dense tasks (segmentation 13 classes with ignore_index, depth and normals with
masked L1), K = 3. The penalty's cost depends on the features only, so ``--blocks`` shows how its share of the step
falls as the encoder does more work per pixel. For every method: the median step time without DGR, and
with DGR computed by the fused backend (`cpp` on CPU, `cuda`/`triton` on GPU), by the `torch` closed form, by
autograd double backward (`reference`), and, for equal weighting, by the authors' finite-difference estimate. The
DGR overhead is the extra median step time over the same method without it; a method's variants take turns step
by step, so that the machine's drift slows them alike. On CPU, glibc keeps freed blocks of up to 32 MiB (as
``bench_dgr.py`` times): with its defaults, which variant's steps paid page faults for the encoder's large buffers
depended on how the variants' allocations interleaved (40 ms a step, the overhead of DGR reading -8% to +12% for the
same code). The ``dominance`` variant has no DGR and a ``TaskDominance`` tracker on the encoder (its overhead: for
AdaTask it reads the per-task moments; with the other methods it also takes the per-task gradients again). Prints a
table and writes ``step_<device>.csv`` and
``step_<device>.png`` (time per step, when matplotlib is installed) to ``--out`` (default ``benchmarks/out``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dgr_fast  # noqa: E402
from dgr_fast import AdaTask, DummyHeads, DummyTask  # noqa: E402
from dgr_fast.benchmarks import bar_plot, bench_parser, interleaved_medians, malloc_mode, write_csv  # noqa: E402
from dgr_fast.mtl.aggregators import Aggregator  # noqa: E402
from dgr_fast.mtl.methods import METHODS, make_method  # noqa: E402
from dgr_fast.mtl.dominance import TaskDominance  # noqa: E402
from dgr_fast.mtl.step import MTLStep  # noqa: E402

TASKS = {"seg": DummyTask("ce", 13, ignore_index=-1), "depth": DummyTask("l1", 1, reduction="row_mean"),
         "normal": DummyTask("l1", 3, reduction="row_mean")}


class Model(nn.Module):
    def __init__(self, width: int = 64, blocks: int = 0):
        super().__init__()
        layers = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, width, 3, padding=1), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Conv2d(width, t.out_features, 1) for name, t in TASKS.items()})

    def forward(self, x, seg, depth, normal, valid):
        z = self.encoder(x)
        out = {name: head(z) for name, head in self.heads.items()}
        losses = [F.cross_entropy(out["seg"], seg, ignore_index=-1),
                  (out["depth"] - depth).abs().sum(1)[valid].mean(),
                  (out["normal"] - normal).abs().sum(1)[valid].mean()]
        return z, losses


def batch(b, h, w, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=g)
    seg = torch.randint(-1, 13, (b, h, w), generator=g)
    depth, normal = torch.rand(b, 1, h, w, generator=g), torch.randn(b, 3, h, w, generator=g)
    valid = depth[:, 0] > 0.1
    return [t.to(device) for t in (x, seg, depth, normal, valid)]


def build(method: str, dgr: str | None, device: str, lam: float, grad_mode: str, blocks: int):
    torch.manual_seed(0)
    model = Model(blocks=blocks).to(device)
    shared, heads = list(model.encoder.parameters()), list(model.heads.parameters())
    if dgr in (None, "dominance"):
        dummy = None
    elif dgr == "fd":  # the authors' estimate: the heads' own conv layers, perturbed along their gradient
        heads_fd = {k: DummyTask(t.loss, t.out_features, ignore_index=t.ignore_index, reduction=t.reduction,
                                 head=lambda c=t.out_features: nn.Conv2d(64, c, 1)) for k, t in TASKS.items()}
        dummy = DummyHeads(None, heads_fd, seed=0, estimator="finite_difference", device=device)
    else:
        dummy = DummyHeads(64, TASKS, seed=0, backend=dgr, device=device)
    if method == "adatask":
        opt = AdaTask(shared, num_tasks=3, task_params=heads, lr=1e-4)
        return model, MTLStep(shared, heads, opt, dummy_heads=dummy, dgr_lambda=lam, grad_mode=grad_mode)
    m = make_method(method, 3)
    extra = []
    if isinstance(m, nn.Module):  # a weighting: it may have parameters (uncertainty weighting's log-variances)
        m = m.to(device)
        extra = list(m.parameters())
    opt = torch.optim.SGD(shared + heads + extra, lr=1e-3, momentum=0.9)
    kind = {"aggregator": m} if isinstance(m, Aggregator) else {"weighting": m}
    return model, MTLStep(shared, heads, opt, dummy_heads=dummy, dgr_lambda=lam, grad_mode=grad_mode, **kind)


def step_function(method: str, dgr: str | None, device: str, args: argparse.Namespace, data: list):
    """One training step of ``method`` with the DGR variant ``dgr`` (None: without DGR; ``"dominance"``: without
    DGR, with the task-dominance tracker), on its own model."""
    model, step = build(method, dgr, device, args.dgr_lambda, args.grad_mode, args.blocks)
    run = step.step
    if dgr == "dominance":
        tracker = TaskDominance(model.encoder.named_parameters(prefix="encoder"), step.optimizer, 3)
        run, dgr = functools.partial(tracker.step, step), None
    targets = {"seg": data[1], "depth": data[2], "normal": data[3]}
    masks = {"depth": data[4], "normal": data[4]}

    def fn():
        z, losses = model(*data)
        run(losses, features=z, dgr_targets=targets if dgr else None, dgr_masks=masks if dgr else None)

    return fn


def run(args: argparse.Namespace) -> list[dict]:
    """Time a step of every method with each DGR variant; a row per (method, variant) with the overhead."""
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
        malloc_mode(measure_memory=False)
    fused = {"cpu": "cpp", "cuda": "cuda"}[device]
    status = dgr_fast.available_backends()
    data = batch(args.batch, args.height, args.width, device)
    methods = args.methods or (["ew", "pcgrad", "adatask"] if args.quick else list(METHODS) + ["adatask"])
    variants = [None if v == "none" else {"fused": fused}.get(v, v) for v in args.variants]
    if variants[0] is not None:
        raise SystemExit("--variants must start with none: the overhead is measured against it")
    rows = []
    print(f"{'method':>9} {'dgr':>9} {'ms/step':>9} {'overhead':>9}")
    for method in methods:
        fns = {}
        for dgr in variants:
            if dgr == "fd" and method != "ew":
                continue
            if dgr in ("cpp", "cuda", "triton") and not status[dgr].available:
                print(f"  skip {dgr}: {status[dgr].reason}")
                continue
            fns[dgr] = step_function(method, dgr, device, args, data)
        medians = interleaved_medians(fns, device, args.reps)
        base = medians[None]
        for dgr, t in medians.items():
            rows.append(dict(method=method, dgr=dgr or "none", blocks=args.blocks, ms=t * 1e3, overhead_pct=100 * (t / base - 1)))
            print(f"{method:>9} {dgr or 'none':>9} {t * 1e3:>9.1f} {100 * (t / base - 1):>+8.1f}%", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), measure, print the table and write the files."""
    p = bench_parser(__doc__, __file__, "three methods (ew, pcgrad, adatask), 2 repetitions")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dgr-lambda", type=float, default=0.1)
    p.add_argument("--blocks", type=int, default=0, help="extra Conv(64,64,3)-ReLU layers in the encoder (default 0)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated, from {','.join(list(METHODS) + ['adatask'])} (default: all)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=["none", "fused", "torch", "reference", "fd",
                                                                          "dominance"],
                   help="DGR variants, first none: none,fused,torch,reference,fd,dominance (fused: cpp on CPU, cuda "
                        "on GPU; fd only with ew; dominance: no DGR, the task-dominance tracker on)")
    p.add_argument("--grad-mode", choices=("loop", "batched"), default="loop",
                   help="how aggregators and AdaTask take per-task gradients (dgr_fast.mtl.per_task_grads)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 2
    rows = run(args)
    write_csv(os.path.join(args.out, f"step_{args.device}.csv"), rows)
    bar_plot(os.path.join(args.out, f"step_{args.device}.png"), rows, lambda r: r["method"], "dgr", "ms",
             "ms per step", log=True)


if __name__ == "__main__":
    main()
