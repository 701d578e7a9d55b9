"""Benchmark the DGR penalty, forward + backward, per backend, against the floor.

    python benchmarks/bench_dgr.py [--device cpu|cuda] [--quick] [--providers reference,torch,cpp] [--shapes utkface]
                                   [--module-heads mlp,deeplab] [--out DIR]

Prints a table and writes ``dgr_<device>.csv`` (and ``dgr_<device>.png`` when matplotlib is installed) to ``--out``
(default ``benchmarks/out``). Each row: median time of ``dgr_penalty(...).backward()``, the extra peak memory over
the inputs, the floor (max of bytes / measured copy bandwidth and flops / measured matmul rate, both measured in the
same run) and ``floor / time`` (the achieved fraction of it).

Bytes: two reads of z and one write of dz. Flops: about 12 D sum(C_k) per row (docs/DESIGN.md section 4). ``alloc_ms``
is the time to allocate a features-sized tensor and write it once, the price of returning dz that every backend pays
(on a CPU mostly page faults where the block is freshly mapped: glibc maps every block of 32 MiB and more afresh).

``--module-heads`` times the paper's non-linear dummy heads instead (``dgr_heads_<device>.csv``), penalty and its
gradient w.r.t. the features through ``DummyHeads``: ``mlp``, Linear(2048,64)-ReLU-Linear(64,C)-ReLU heads on
UTKFace's three tasks, the closed form (``ops/dgr_mlp_penalty.py``) against the generic double backward
(``reference.module_penalty``), the authors' finite-difference estimate and the closed form's large matrix products
alone (``gemms``: its floor on this BLAS); ``deeplab``, DeepLab heads on the DGR
authors' NYUv2 features (batch 4 of 2048 x 36 x 48: 288 x 384 crops, ResNet-50 at output stride 8) and on a small
64-channel stand-in (2 x 64 x 24 x 32), outputs upsampled 8x (normals L2-normalised): ``DummyHeads``' exact penalty
(convolutions cut to their live taps, ``ops/live_taps.py``), the generic double backward and the estimate.

CPU peak memory is the rise of the resident set, which follows live memory only when freed blocks go back to the
system, and times should see the allocator as a training loop does: ``run`` measures all memory first, then all times,
and ``malloc_mode`` switches glibc between the two with ``mallopt``, in-process, so ``main(argv)`` can be called from Python as well as run as a script. (With
``MALLOC_MMAP_THRESHOLD_`` set by the caller, both use that threshold, and the times then pay a fresh mmap and its
page faults for every large block.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import dgr_fast  # noqa: E402
from dgr_fast import DummyHeads, DummyTask, dgr_penalty  # noqa: E402
from dgr_fast.ops.dgr_mlp_penalty import _stack, _use_gram, mlp_head_of  # noqa: E402
from dgr_fast.reference import module_penalty  # noqa: E402
from dgr_fast.train.models import DeepLabHead, UnitNormal, mlp_head  # noqa: E402
from dgr_fast.benchmarks import LIBC, bar_plot, bench_parser, malloc_mode, sync, write_csv  # noqa: E402


@dataclass
class Shape:
    name: str
    features: tuple[int, ...]
    tasks: tuple[tuple[str, int], ...]  # (loss, C_k)
    dense_official: bool = False  # seg (ignore_index) + masked L1 with row_mean, as the official dense code

    @property
    def rows(self) -> int:
        n = self.features[0]
        for s in self.features[2:]:
            n *= s
        return n


SCENE = (("ce", 13), ("l1", 1), ("l1", 3))
UTKFACE = (("ce", 7), ("ce", 2), ("ce", 5))


def shapes(device: str, quick: bool) -> list[Shape]:
    if device == "cuda":
        out = [Shape("scene 8x64x288x384", (8, 64, 288, 384), SCENE, True), Shape("scene 8x2048x36x48", (8, 2048, 36, 48), SCENE, True)]
    else:
        out = [Shape("scene 4x64x96x128", (4, 64, 96, 128), SCENE, True)]
        if not quick:
            out.append(Shape("scene 2x2048x36x48", (2, 2048, 36, 48), SCENE, True))
    out += [Shape(f"utkface N={n}", (n, 2048), UTKFACE) for n in ((64, 256, 4096) if not quick else (256,))]
    sweep_n = (1024, 8192, 65536) if not quick else (8192,)
    for n in sweep_n:
        for c in ((4, 16, 64) if not quick else (16,)):
            out.append(Shape(f"sweep N={n} C={c}", (n, 256), (("ce", c),)))
    return out


def make_inputs(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, d, spatial = shape.features[0], shape.features[1], shape.features[2:]
    row_shape = (n, *spatial)
    z = torch.randn(shape.features, generator=g).to(device=device, dtype=dtype)
    weights, biases, targets, masks, losses, reductions = [], [], [], [], [], []
    bound = d**-0.5
    for loss, c in shape.tasks:
        weights.append(((torch.rand(c, d, generator=g) * 2 - 1) * bound).to(device))
        biases.append(((torch.rand(c, generator=g) * 2 - 1) * bound).to(device))
        if loss == "ce":
            y = torch.randint(0, c, row_shape, generator=g)
            if shape.dense_official:
                y[torch.rand(row_shape, generator=g) < 0.1] = -1
            targets.append(y.to(device))
            masks.append(None)
        else:
            y = torch.rand((n, c, *spatial), generator=g)
            targets.append(y.to(device))
            masks.append((torch.rand(row_shape, generator=g) < 0.8).to(device))
        losses.append(loss)
        reductions.append("row_mean" if shape.dense_official and loss != "ce" else "mean")
    return dict(features=z, weights=weights, biases=biases, targets=targets, losses=losses, masks=masks,
                ignore_index=-1, reductions=reductions)


def median_time(fn, device: str, min_time: float, max_reps: int) -> float:
    fn()  # warm-up (and compilation)
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large tensor copy (read + write), the yardstick of the byte floor."""
    src = torch.randn(64 * 2**20, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, 0.5, 20)
    return 2 * src.numel() * src.element_size() / t


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    n = 4096 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, 0.5, 20)
    return 2 * n**3 / t


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: the process's resident-set high-water mark, reset before the call (Linux /proc). malloc_mode fixes glibc's
    # mmap threshold so that large blocks go back to the system when freed and RSS follows live memory. Free heap
    # pages left resident by earlier work (a caller's, in-process) would take fn's allocations without a rise in RSS:
    # malloc_trim hands them back first.
    if hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)
    base = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return (_proc_status_kb("VmHWM") - base) * 1024


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def penalty_step(inputs: dict, provider: str):
    """One forward + backward of the penalty on fresh leaf features."""
    def step():
        z = inputs["features"].detach().requires_grad_(True)
        dgr_penalty(**{**inputs, "features": z}, backend=provider).backward()
    return step


def run(args: argparse.Namespace) -> list[dict]:
    """Measure every provider on every shape; a row per (shape, provider) with the floor and the speedups."""
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.set_num_threads(args.threads) if device == "cpu" else None
    bandwidth, rate = copy_bandwidth(device), matmul_rate(device, torch.float32)
    print(f"# {device}: copy bandwidth {bandwidth / 1e9:.1f} GB/s, fp32 matmul {rate / 1e9:.1f} GFLOP/s, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    status = dgr_fast.available_backends()
    runs = [(shape, provider) for shape in args.shapes for provider in args.providers
            if status[provider].available
            # autograd double backward of the largest shapes takes minutes on a CPU
            and not (provider == "reference" and shape.rows * shape.features[1] > args.max_reference_elements)]
    for provider in args.providers:
        if not status[provider].available:
            print(f"  skip {provider}: {status[provider].reason}")
    # Every memory measurement first, then every timing: once a timing has left freed blocks on the heap, the resident
    # set no longer rises by exactly what a step allocates.
    memory = {}
    if device == "cpu":
        malloc_mode(measure_memory=True)
    for shape, provider in runs:
        step = penalty_step(make_inputs(shape, device, dtype), provider)
        try:
            step()  # compiles, loads, starts threads: none of that is the step's memory
            memory[shape.name, provider] = peak_extra_bytes(step, device)
        except RuntimeError as exc:
            print(f"  skip {provider} on {shape.name}: {exc}")
    if device == "cpu":
        malloc_mode(measure_memory=False)
    rows = []
    for shape, provider in runs:
        if (shape.name, provider) not in memory:
            continue
        inputs = make_inputs(shape, device, dtype)
        z = inputs["features"]
        c = sum(k for _, k in shape.tasks)
        floor_bytes = 3 * z.numel() * z.element_size()
        flops = 12 * shape.features[1] * c * shape.rows
        floor = max(floor_bytes / bandwidth, flops / rate)
        t = median_time(penalty_step(inputs, provider), device, args.min_time, args.max_reps)
        # What returning dz costs before any arithmetic: a fresh features-sized tensor written once. On a CPU it pays a
        # page fault per 4 KiB wherever the allocator maps the block afresh (glibc: every block of 32 MiB and more).
        alloc = median_time(lambda: torch.empty_like(z).fill_(0), device, args.min_time / 4, args.max_reps)
        rows.append(dict(shape=shape.name, provider=provider, ms=t * 1e3, floor_ms=floor * 1e3, of_floor=floor / t,
                         alloc_ms=alloc * 1e3,
                         peak_extra_mb=memory[shape.name, provider] / 2**20, z_mb=z.numel() * z.element_size() / 2**20))
    by_shape: dict[str, dict] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["provider"]] = r["ms"]
    for r in rows:
        ref = by_shape[r["shape"]].get("reference")
        r["speedup_vs_reference"] = ref / r["ms"] if ref else float("nan")
        tor = by_shape[r["shape"]].get("torch")
        r["speedup_vs_torch"] = tor / r["ms"] if tor else float("nan")
    return rows


def upsample_to(s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The head output at the target's size (the DGR authors' bilinear upsampling): a dense task's transform."""
    return torch.nn.functional.interpolate(s, size=target.shape[-2:], mode="bilinear", align_corners=True)


def module_head_cases(device: str, quick: bool, which: list[str]) -> list[tuple[str, dict, dict]]:
    """(name, DummyHeads tasks, inputs) per shape: the features and each task's targets/masks."""
    g = torch.Generator().manual_seed(0)
    cases = []
    if "mlp" in which:
        tasks = {f"t{k}": DummyTask("ce", c, head=lambda c=c: mlp_head(2048, c)) for k, (_, c) in enumerate(UTKFACE)}
        for n in (64,) if quick else (64, 256):
            ys = {name: torch.randint(0, t.out_features, (n,), generator=g).to(device) for name, t in tasks.items()}
            cases.append((f"mlp heads N={n} D=2048 H=64", tasks,
                          dict(features=torch.randn(n, 2048, generator=g).to(device), targets=ys, masks={})))
    if "deeplab" in which:
        for n, c, h, w in [(1, 64, 6, 8)] if quick else [(4, 2048, 36, 48), (2, 64, 24, 32)]:
            cases.append(deeplab_case(g, device, n, c, h, w))
    return cases


def deeplab_case(g: torch.Generator, device: str, n: int, c: int, h: int, w: int) -> tuple[str, dict, dict]:
    """The DGR authors' NYUv2 tasks on DeepLab heads reading ``[n, c, h, w]`` features, targets 8x larger."""
    up = upsample_to
    tasks = {"seg": DummyTask("ce", 13, ignore_index=-1, head=lambda: DeepLabHead(c, 13), transform=up),
             "depth": DummyTask("l1", 1, reduction="row_mean", head=lambda: DeepLabHead(c, 1), transform=up),
             "normal": DummyTask("l1", 3, reduction="row_mean", transform=up,
                                 head=lambda: torch.nn.Sequential(DeepLabHead(c, 3), UnitNormal()))}
    H, W = 8 * h, 8 * w
    depth = torch.rand(n, 1, H, W, generator=g)
    normal = torch.nn.functional.normalize(torch.randn(n, 3, H, W, generator=g), dim=1)
    targets = {"seg": torch.randint(-1, 13, (n, H, W), generator=g), "depth": depth, "normal": normal}
    masks = {"depth": depth.sum(1) != 0, "normal": normal.sum(1) != 0}
    return (f"deeplab heads {n}x{c}x{h}x{w} -> {H}x{W}", tasks,
            dict(features=torch.randn(n, c, h, w, generator=g).to(device),
                 targets={k: v.to(device) for k, v in targets.items()},
                 masks={k: v.to(device) for k, v in masks.items()}))


def _dummy(tasks: dict, provider: str, device: str, fd_step: float, in_features: int) -> DummyHeads:
    if provider == "linear":  # the same tasks with linear dummy heads: the penalty's scale the paper's lambda meets
        linear = {k: DummyTask(t.loss, t.out_features, reduction=t.reduction, ignore_index=t.ignore_index)
                  for k, t in tasks.items()}
        return DummyHeads(in_features, linear, seed=0, device=device)
    estimator = "finite_difference" if provider == "fd" else "exact"
    return DummyHeads(None, tasks, seed=0, estimator=estimator, fd_step=fd_step, device=device)


def module_head_step(tasks: dict, inputs: dict, provider: str, device: str, fd_step: float = 1e-3):
    """Penalty + its gradient w.r.t. the features: ``closed``/``exact`` (DummyHeads' default estimator, which takes
    the closed form for MLP heads), ``generic`` (module_penalty's double backward on the same heads), ``fd`` (the
    authors' estimate), ``linear`` (linear dummy heads on the same features), ``gemms`` (MLP heads: the closed form's
    large products alone, ``closed_form_gemms``). Returns the step and a function giving ``(penalty, gradient)``."""
    dummy = _dummy(tasks, provider, device, fd_step, inputs["features"].shape[1])
    if provider == "gemms":
        return closed_form_gemms(dummy, inputs["features"])
    heads = [dummy.modules_[f"set0_task{k}"] for k in range(len(tasks))] if provider == "generic" else []
    fns = [dummy._loss_fn(k, inputs["targets"][name], inputs["masks"].get(name)) for k, name in enumerate(tasks)]

    def penalty_and_grad():
        z = inputs["features"].detach().requires_grad_(True)
        if provider == "generic":
            penalty = module_penalty(z, heads, fns)
        else:
            # linear heads have no transform: on dense tasks they read the features upsampled to the targets' size
            read = z if provider != "linear" or z.dim() == 2 else upsample_to(z, inputs["targets"]["seg"])
            penalty = dummy(read, inputs["targets"], masks=inputs["masks"])
        return penalty.detach(), torch.autograd.grad(penalty, z)[0]
    return penalty_and_grad


def closed_form_gemms(dummy: DummyHeads, z: torch.Tensor):
    """The large matrix products of the MLP closed form (ops/dgr_mlp_penalty.py, the route its ``_use_gram``
    picks), on the same shapes and nothing else: the floor of any kernel of that closed form on this BLAS.
    Returns a step giving ``(nan, zeros)``: no penalty is computed."""
    st = _stack([mlp_head_of(dummy.modules_[f"set0_task{k}"]) for k in range(len(dummy.tasks))], z.dtype)
    e = torch.randn(z.shape[0], st.w1.shape[0], dtype=z.dtype, device=z.device)  # [N, sum H], as the hidden rows

    def products():
        torch.addmm(st.b1, z, st.w1.T)  # the forward
        e @ st.w1  # the chain back through W1
        if _use_gram(z, st):
            (z @ z.T) @ e  # G_W1 z through the Gram matrix
            (e @ e.T) @ z  # 2 e Gt_W1
        else:
            g_w1 = e.T @ z
            z @ g_w1.T, e @ g_w1  # u = 2 z Gt_W1^T, 2 e Gt_W1

    def step():
        products()
        return torch.tensor(float("nan")), torch.zeros_like(z)
    return step


def run_module_heads(args: argparse.Namespace) -> list[dict]:
    """A row per (shape, provider) of the module-head penalty: its time, with its ratio to the estimate and to the
    generic double backward measured in the same run, its value (the scale lambda multiplies), and for the
    estimate its error against the exact gradient."""
    torch.set_num_threads(args.threads) if args.device == "cpu" else None
    rows = []
    for name, tasks, inputs in module_head_cases(args.device, args.quick, args.module_heads):
        providers = ["closed", "gemms"] if name.startswith("mlp") else ["exact"]
        providers += ["generic", "fd", "linear"]
        z = inputs["features"]
        if z.dim() == 4 and z.numel() * z.element_size() * 64 > 2**30:
            providers.remove("linear")  # linear heads read the features upsampled 8x: 3.6 GB at the authors' shape
        steps = {p: module_head_step(tasks, inputs, p, args.device, args.fd_step) for p in providers}
        times = {p: median_time(step, args.device, args.min_time, args.max_reps) for p, step in steps.items()}
        results = {p: step() for p, step in steps.items()}
        exact_grad = results[providers[0]][1].double()
        for p, t in times.items():
            penalty, grad = results[p]
            err = cosine = float("nan")
            if p == "fd":
                err = ((grad.double() - exact_grad).norm() / exact_grad.norm()).item()
                cosine = torch.nn.functional.cosine_similarity(grad.double().flatten(), exact_grad.flatten(),
                                                               dim=0).item()
            rows.append(dict(shape=name, provider=p, ms=t * 1e3, fd_over_this=times["fd"] / t,
                             generic_over_this=times["generic"] / t if "generic" in times else float("nan"),
                             penalty=penalty.item(), grad_rel_err=err, grad_cosine=cosine))
    return rows


def report_module_heads(rows: list[dict], out: str, device: str) -> None:
    cols = ["shape", "provider", "ms", "fd_over_this", "generic_over_this", "penalty", "grad_rel_err", "grad_cosine"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    write_csv(os.path.join(out, f"dgr_heads_{device}.csv"), rows, cols)


def report(rows: list[dict], out: str, device: str) -> None:
    """Print the table; write ``dgr_<device>.csv`` and a plot of floor / time to ``out``."""
    cols = ["shape", "provider", "ms", "floor_ms", "of_floor", "alloc_ms", "speedup_vs_reference", "speedup_vs_torch", "peak_extra_mb", "z_mb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    write_csv(os.path.join(out, f"dgr_{device}.csv"), rows, cols)
    bar_plot(os.path.join(out, f"dgr_{device}.png"), rows, lambda r: r["shape"], "provider", "of_floor",
             "floor / time (1 = at the floor)", log=True)


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), measure, print the table and write the files."""
    p = bench_parser(__doc__, __file__, "fewer shapes and repetitions")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--providers", default=None, help="comma-separated backends (default: all that run on the device)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of repetitions per measurement")
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--max-reference-elements", type=float, default=1e8, help="skip the reference above this many feature elements")
    p.add_argument("--shapes", default=None, metavar="NAMES",
                   help="comma-separated parts of shape names: only the shapes whose name contains one (e.g. utkface,C=16)")
    p.add_argument("--module-heads", default=None, metavar="KINDS",
                   help="comma-separated from mlp,deeplab: time the paper's non-linear dummy heads instead")
    p.add_argument("--fd-step", type=float, default=1e-3, help="--module-heads: the estimate's h (the authors' 1e-3)")
    args = p.parse_args(argv)
    if args.module_heads is not None:
        args.module_heads = args.module_heads.split(",")
        if not set(args.module_heads) <= {"mlp", "deeplab"}:
            p.error(f"--module-heads takes mlp,deeplab, got {','.join(args.module_heads)}")
        if args.quick:
            args.min_time, args.max_reps = 0.2, 5
        report_module_heads(run_module_heads(args), args.out, args.device)
        return
    args.shapes = [s for s in shapes(args.device, args.quick)
                   if args.shapes is None or any(part in s.name for part in args.shapes.split(","))]
    if not args.shapes:
        p.error("--shapes matches none of: " + ", ".join(s.name for s in shapes(args.device, args.quick)))
    default = ["reference", "torch", "cpp"] if args.device == "cpu" else ["reference", "torch", "triton", "cuda"]
    args.providers = args.providers.split(",") if args.providers else default
    if args.quick:
        args.min_time, args.max_reps = 0.2, 5
    report(run(args), args.out, args.device)


if __name__ == "__main__":
    main()
