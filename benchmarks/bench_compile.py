"""A training step with DGR, eager against torch.compile (inductor), per backend of the penalty.

The step: an MLP encoder on rows ``[N, 256]`` (two Linear-ReLU layers of ``--width``), three task heads (ce 7, ce 2,
mse 1), ``DummyHeads`` (``--heads linear``: the fused linear heads on ``--backends``; ``mlp``: Linear(W, 64)-ReLU-
Linear(64, C) dummy heads, the closed form of ``dgr_mlp_penalty``, the backend argument unused), DGR lambda 0.1.
``ew``: the summed losses plus the penalty, ``loss.backward()``, SGD with momentum. ``adatask``: each task's loss
plus its share of the penalty, ``AdaTask.backward``, ``AdaTask.step``.

Compiled: the loss (encoder, heads, penalty) in one ``torch.compile(fullgraph=True)`` graph whose backward inductor
compiles too, and ``opt.step`` in another (fullgraph for AdaTask; torch.optim's SGD breaks its graph around its
``no_grad`` by design); ``AdaTask.backward`` (K autograd passes through the compiled graph) is not
compiled. Eager and compiled steps take turns step by step on twin models (``interleaved_medians``), so a drifting
machine slows both alike. ``compile_s``: the first compiled step, compilation included.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dgr_fast import AdaTask, DummyHeads, DummyTask  # noqa: E402
from dgr_fast.backends import backend_status  # noqa: E402
from dgr_fast.benchmarks import bar_plot, bench_parser, interleaved_medians, malloc_mode, sync, write_csv  # noqa: E402

TASKS = (("ce", 7), ("ce", 2), ("mse", 1))


class Model(nn.Module):
    def __init__(self, width: int, heads: str, backend: str, device: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(width, c) for _, c in TASKS])
        if heads == "mlp":
            tasks = [DummyTask(loss, c, head=lambda c=c: nn.Sequential(nn.Linear(width, 64), nn.ReLU(),
                                                                         nn.Linear(64, c))) for loss, c in TASKS]
            self.dummy = DummyHeads(None, tasks, seed=0, device=device)
        else:
            self.dummy = DummyHeads(width, [DummyTask(loss, c) for loss, c in TASKS], seed=0, backend=backend,
                                    device=device)
        self.to(device)

    def losses(self, x: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """``[K]``: each task's loss plus 0.1 times its share of the DGR penalty."""
        z = self.encoder(x)
        task = [F.cross_entropy(h(z), y) if loss == "ce" else F.mse_loss(h(z), y)
                for h, y, (loss, _) in zip(self.heads, targets, TASKS)]
        return torch.stack(task) + 0.1 * self.dummy.per_task(z, targets)


def batch(n: int, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    targets = [torch.randint(0, c, (n,), generator=g) if loss == "ce" else torch.randn(n, c, generator=g)
               for loss, c in TASKS]
    return torch.randn(n, 256, generator=g).to(device), [t.to(device) for t in targets]


def step_function(method: str, heads: str, backend: str, compiled: bool, args, data):
    """One training step on a fresh model (the same initial weights for every variant)."""
    model = Model(args.width, heads, backend, args.device)
    shared, task_params = list(model.encoder.parameters()), list(model.heads.parameters())
    if method == "adatask":
        opt = AdaTask(shared, num_tasks=len(TASKS), task_params=task_params, lr=1e-4)
    else:
        opt = torch.optim.SGD(shared + task_params, lr=1e-3, momentum=0.9)
    losses, opt_step = model.losses, opt.step
    if compiled:
        # torch.optim's step breaks its graph on purpose (around its no_grad), so only AdaTask's is fullgraph
        losses = torch.compile(losses, fullgraph=True)
        if method == "adatask":  # K backward passes through one compiled graph: no buffer may be donated
            losses = torch._functorch.config.patch(donated_buffer=False)(losses)
        opt_step = torch.compile(opt.step, fullgraph=method == "adatask")

    def fn():
        values = losses(*data)
        if method == "adatask":
            opt.backward(values)
        else:
            values.sum().backward()
        opt_step()
        opt.zero_grad(set_to_none=True)

    return fn


def run(args) -> list[dict]:
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
        malloc_mode(measure_memory=False)
    data = batch(args.rows, device)
    rows = []
    print(f"{'method':>8} {'heads':>6} {'backend':>8} {'eager ms':>9} {'compiled ms':>12} {'speedup':>8} "
          f"{'compile s':>10}")
    for method in args.methods:
        for heads in args.heads:
            for backend in (args.backends if heads == "linear" else ["closed"]):
                if heads == "linear" and not backend_status(backend).available:
                    print(f"  skip {backend}: {backend_status(backend).reason}")
                    continue
                torch._dynamo.reset()  # each case compiles afresh: no cache or recompilation limit carried over
                eager = step_function(method, heads, backend, False, args, data)
                compiled = step_function(method, heads, backend, True, args, data)
                t0 = time.perf_counter()
                compiled()
                sync(device)
                compile_s = time.perf_counter() - t0
                medians = interleaved_medians({"eager": eager, "compiled": compiled}, device, args.reps)
                row = dict(method=method, heads=heads, backend=backend, rows=args.rows, width=args.width,
                           eager_ms=medians["eager"] * 1e3, compiled_ms=medians["compiled"] * 1e3,
                           speedup=medians["eager"] / medians["compiled"], compile_s=compile_s)
                rows.append(row)
                print(f"{method:>8} {heads:>6} {backend:>8} {row['eager_ms']:>9.2f} {row['compiled_ms']:>12.2f} "
                      f"{row['speedup']:>7.2f}x {compile_s:>10.1f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), measure, print the table and write the files."""
    p = bench_parser(__doc__, __file__, "ew only, linear heads, 3 repetitions")
    p.add_argument("--rows", type=int, default=256, help="N, the batch of feature rows (default 256)")
    p.add_argument("--width", type=int, default=512, help="the encoder's width, the features' D (default 512)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=["ew", "adatask"], help="ew,adatask")
    p.add_argument("--heads", type=lambda s: s.split(","), default=["linear", "mlp"], help="linear,mlp")
    p.add_argument("--backends", type=lambda s: s.split(","), default=None,
                   help="penalty backends for linear heads (default: torch and the fused one of the device)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if any(m not in ("ew", "adatask") for m in args.methods) or any(h not in ("linear", "mlp") for h in args.heads):
        p.error("--methods takes ew,adatask and --heads linear,mlp")
    if args.backends is None:
        args.backends = ["torch", {"cpu": "cpp", "cuda": "cuda"}[args.device]]
    if args.quick:
        args.methods, args.heads, args.reps = ["ew"], ["linear"], 3
    rows = run(args)
    write_csv(os.path.join(args.out, f"compile_{args.device}.csv"), rows)
    bar_plot(os.path.join(args.out, f"compile_{args.device}.png"),
             [dict(case=f"{r['method']} {r['heads']} {r['backend']}", mode=mode, ms=r[f"{mode}_ms"])
              for r in rows for mode in ("eager", "compiled")], lambda r: r["case"], "mode", "ms", "ms per step")


if __name__ == "__main__":
    main()
