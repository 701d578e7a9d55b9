"""AdaTask: every backend against the per-task-loop reference, torch.optim.Adam at K = 1, resume, AMP, bad input."""

from __future__ import annotations

import copy
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dgr_fast
from dgr_fast import AdaTask
from dgr_fast.backends import backend_status, triton_interpreting
from dgr_fast.optim.adatask import _STEP, StepArgs, _load_extension
from dgr_fast.reference.adatask import VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSED = ("cpp", "triton", "cuda")
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-6), torch.float16: (1e-2, 1e-3), torch.bfloat16: (2e-2, 1e-2)}


def _device_for(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu")


def _need(backend: str, dtype: torch.dtype = torch.float32) -> torch.device:
    status = backend_status(backend)
    if not status.available:
        pytest.skip(f"backend {backend!r} unavailable: {status.reason}")
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("cuda backend needs a CUDA device")
    if backend == "triton" and dtype == torch.bfloat16 and triton_interpreting():
        pytest.skip("bf16 arithmetic is unreliable in the Triton interpreter (TOOLCHAIN.md); tested on GPU")
    if backend in ("triton", "cuda") and dtype == torch.float64:
        pytest.skip(f"{backend} takes no float64")
    return _device_for(backend)


def _problem(seed: int, dtype: torch.dtype, device: torch.device):
    """Odd shapes in three groups: two shared groups with their own hyper-parameters, and task parameters."""
    g = torch.Generator().manual_seed(seed)
    shapes = [[(7, 3, 3, 3), (7,), (1,)], [(33, 5), (2049,)]]  # 2049 > one C++ chunk and two Triton blocks
    head_shapes = [(5, 3), (3,)]
    mk = lambda s: torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    shared = [[mk(s) for s in grp] for grp in shapes]
    heads = [mk(s) for s in head_shapes]
    return shared, heads


def _make(backend, shared, heads, K, variant, track_au=True):
    groups = [
        {"params": shared[0]},
        {"params": shared[1], "lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    ]
    return AdaTask(groups, K, lr=1e-2, variant=variant, task_params=heads, backend=backend, track_au=track_au)


def _grads(g: torch.Generator, shared, heads, K, scale=1.0):
    task = [torch.randn(K, *p.shape, generator=g).to(p) * scale for grp in shared for p in grp]
    for h in heads:
        h.grad = torch.randn(h.shape, generator=g).to(h) * scale
    return task


def _run(backend, variant, dtype, steps, K=3, seed=0, device=torch.device("cpu")):
    shared, heads = _problem(seed, dtype, device)
    opt = _make(backend, shared, heads, K, variant)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(steps):
        if i == steps // 2:
            opt.param_groups[0]["lr"] *= 0.5  # a scheduler-style change mid-run
        opt.step(task_grads=_grads(g, shared, heads, K))
    return shared, heads, opt


def _assert_close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.detach().cpu().to(torch.float64), b.detach().cpu().to(torch.float64), rtol=rtol, atol=atol)


def _assert_same_run(run_a, run_b, dtype):
    (sa, ha, oa), (sb, hb, ob) = run_a, run_b
    for pa, pb in zip([p for grp in sa for p in grp] + ha, [p for grp in sb for p in grp] + hb):
        _assert_close(pa, pb, dtype)
        for key in ("exp_avg", "exp_avg_sq", "au"):
            if key in ob.state[pb]:
                _assert_close(oa.state[pa][key], ob.state[pb][key], torch.float32 if dtype != torch.float64 else dtype)
        assert float(oa.state[pa]["step"]) == float(ob.state[pb]["step"])


# -------------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ("torch",) + FUSED)
def test_backend_matches_reference(backend, variant):
    device = _need(backend)
    got = _run(backend, variant, torch.float32, steps=12, device=device)
    ref = _run("reference", variant, torch.float32, steps=12, device=device)
    _assert_same_run(got, ref, torch.float32)


@pytest.mark.parametrize(
    "backend,dtype",
    [("cpp", torch.float64), ("cpp", torch.bfloat16), ("cpp", torch.float16), ("torch", torch.bfloat16),
     ("triton", torch.float16), ("triton", torch.bfloat16), ("cuda", torch.float16), ("cuda", torch.bfloat16)],
)  # fmt: skip
def test_precisions_match_reference(backend, dtype):
    device = _need(backend, dtype)
    got = _run(backend, "adam", dtype, steps=8, device=device)
    ref = _run("reference", "adam", dtype, steps=8, device=device)
    _assert_same_run(got, ref, dtype)
    # Moments stay fp32 whatever the parameter dtype (fp64 for fp64).
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[2].state[got[0][0][0]]["exp_avg_sq"].dtype == want


@pytest.mark.parametrize("backend", ("torch", "cpp", "triton", "cuda"))
@pytest.mark.parametrize("weight_decay", (0.0, 0.05))
def test_one_task_is_torch_adam(backend, weight_decay):
    """K = 1 is torch.optim.Adam (AdamW with decoupled weight decay), shared and task parameters alike."""
    device = _need(backend)
    g = torch.Generator().manual_seed(3)
    p0 = [torch.randn(37, 11, generator=g).to(device), torch.randn(129, generator=g).to(device)]
    ours = [p.clone().requires_grad_() for p in p0]
    theirs = [p.clone().requires_grad_() for p in p0]
    opt = AdaTask([ours[0]], 1, lr=2e-3, weight_decay=weight_decay, task_params=[ours[1]], backend=backend)
    ref_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref = ref_cls(theirs, lr=2e-3, weight_decay=weight_decay)
    for _ in range(60):
        grads = [torch.randn(p.shape, generator=g).to(device) for p in p0]
        ours[1].grad = grads[1].clone()
        opt.step(task_grads=[grads[0][None]])
        for p, gr in zip(theirs, grads):
            p.grad = gr.clone()
        ref.step()
    for a, b in zip(ours, theirs):
        if backend == "torch":
            # Same ATen ops in the same order: bit for bit.
            assert torch.equal(a, b)
        else:
            # Correctly rounded sqrt here; ATen's vectorised sqrt is not, so the last bit may differ.
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ("torch", "cpp", "triton"))
def test_resume_is_bitwise(backend):
    device = _need(backend)
    K, steps, cut = 3, 10, 4
    dtype = torch.bfloat16 if backend == "cpp" else torch.float32  # bf16: the loader must keep fp32 moments
    shared, heads = _problem(5, dtype, device)
    shared_b = [[p.detach().clone().requires_grad_() for p in grp] for grp in shared]
    heads_b = [p.detach().clone().requires_grad_() for p in heads]
    opt = _make(backend, shared, heads, K, "adam")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(6)
    grads = []
    for _ in range(steps):
        task = [torch.randn(K, *p.shape, generator=g).to(p) for grp in shared for p in grp]
        hg = [torch.randn(h.shape, generator=g).to(h) for h in heads]
        grads.append((task, hg))

    def one(o, s, hs, i):
        for h, x in zip(hs, grads[i][1]):
            h.grad = x.clone()
        o.step(task_grads=grads[i][0])
        s.step()

    for i in range(cut):
        one(opt, sched, heads, i)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach().clone() for grp in shared for p in grp] + [h.detach().clone() for h in heads]}, buf)
    for i in range(cut, steps):
        one(opt, sched, heads, i)

    buf.seek(0)
    saved = torch.load(buf)
    for p, v in zip([p for grp in shared_b for p in grp] + heads_b, saved["params"]):
        p.data.copy_(v)
    opt_b = _make(backend, shared_b, heads_b, K, "adam")
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=3, gamma=0.5)
    opt_b.load_state_dict(saved["opt"])
    sched_b.load_state_dict(saved["sched"])
    assert opt_b.state[shared_b[0][0]]["exp_avg"].dtype == torch.float32
    for i in range(cut, steps):
        one(opt_b, sched_b, heads_b, i)
    for a, b in zip([p for grp in shared for p in grp] + heads, [p for grp in shared_b for p in grp] + heads_b):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "au", "step"):
            assert torch.equal(opt.state[a][key], opt_b.state[b][key]) if key in opt.state[a] else True


def test_pickle_keeps_configuration():
    shared, heads = _problem(0, torch.float32, torch.device("cpu"))
    opt = _make("torch", shared, heads, 3, "rmsprop")
    opt.step(task_grads=_grads(torch.Generator().manual_seed(0), shared, heads, 3))
    clone = copy.deepcopy(opt)
    assert (clone.num_tasks, clone.variant, clone.track_au) == (3, "rmsprop", True)
    assert torch.equal(clone.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])


def test_load_state_dict_refuses_other_num_tasks():
    shared, heads = _problem(0, torch.float32, torch.device("cpu"))
    opt = _make("torch", shared, heads, 3, "adam")
    opt.step(task_grads=_grads(torch.Generator().manual_seed(0), shared, heads, 3))
    other = _make("torch", shared, heads, 2, "adam")
    with pytest.raises(ValueError, match="num_tasks"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


# -------------------------------------------------------------------------------------------------------------- #
def _snapshot(opt, params):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def _assert_unchanged(opt, params, snap):
    values, states = snap
    for p, v, st in zip(params, values, states):
        assert torch.equal(p.detach(), v)
        assert set(opt.state[p]) == set(st)
        for k, t in st.items():
            assert torch.equal(opt.state[p][k], t)


@pytest.mark.parametrize("backend", ("torch", "reference", "cpp", "triton", "cuda"))
def test_amp_scale_and_skip(backend):
    device = _need(backend)
    K = 2
    shared, heads = _problem(7, torch.float32, device)
    twin = [[p.detach().clone().requires_grad_() for p in grp] for grp in shared], [h.detach().clone().requires_grad_() for h in heads]
    opt, opt_b = _make(backend, shared, heads, K, "adam"), _make(backend, *twin, K, "adam")
    allp = [p for grp in shared for p in grp] + heads
    g = torch.Generator().manual_seed(8)
    scale = torch.full((1,), 1024.0, device=device)
    for _ in range(3):
        gs = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        gs_b = copy.deepcopy(gs)
        opt.step(task_grads=_grads(gs, shared, heads, K, scale=1024.0), grad_scale=scale, found_inf=torch.zeros(1, device=device))
        opt_b.step(task_grads=_grads(gs_b, *twin, K))
    for a, b in zip(allp, [p for grp in twin[0] for p in grp] + twin[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # found_inf set: nothing moves, not even the step counters or AU.
    snap = _snapshot(opt, allp)
    opt.step(task_grads=_grads(g, shared, heads, K), grad_scale=scale, found_inf=torch.ones(1, device=device))
    _assert_unchanged(opt, allp, snap)
    # An inf in a per-task gradient alone also skips while a scale is active (GradScaler only sees .grad).
    bad = _grads(g, shared, heads, K)
    bad[1][0, 0] = float("inf")
    opt.step(task_grads=bad, grad_scale=scale, found_inf=torch.zeros(1, device=device))
    _assert_unchanged(opt, allp, snap)


def test_grad_scaler_end_to_end():
    """torch.amp.GradScaler drives AdaTask through the grad_scale/found_inf attributes."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 8)
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(2)])
    opt = AdaTask(trunk.parameters(), 2, lr=1e-2, task_params=heads.parameters(), backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 6)
    for poison in (False, True, False):
        opt.zero_grad()
        z = trunk(x)
        losses = [h(z).pow(2).mean() for h in heads]
        opt.backward([scaler.scale(loss) for loss in losses])
        if poison:
            heads[0].bias.grad.fill_(float("inf"))
        before = [p.detach().clone() for p in trunk.parameters()]
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(b, p) for b, p in zip(before, trunk.parameters()))
        assert moved != poison
    assert scaler.get_scale() == 2.0**9  # backed off once


# -------------------------------------------------------------------------------------------------------------- #
def test_bad_input_raises_before_state_changes():
    shared, heads = _problem(9, torch.float32, torch.device("cpu"))
    flat = [p for grp in shared for p in grp]
    for kwargs, exc, word in [
        (dict(num_tasks=0), ValueError, "num_tasks"),
        (dict(num_tasks=2.0), TypeError, "num_tasks"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
        (dict(betas=(1.0, 0.9)), ValueError, "betas"),
        (dict(betas=(0.9, -0.1)), ValueError, "betas"),
        (dict(betas=(0.9,)), TypeError, "betas"),
        (dict(variant="sgd"), ValueError, "variant"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(au_beta=1.0), ValueError, "au_beta"),
    ]:
        args = {"num_tasks": 3, **kwargs}
        with pytest.raises(exc, match=word):
            AdaTask(flat, **args)
    with pytest.raises(ValueError, match="lr"):
        AdaTask([{"params": flat[:1], "lr": -1.0}], 3)

    opt = _make("cpp" if backend_status("cpp").available else "torch", shared, heads, 3, "adam")
    allp = flat + heads
    g = torch.Generator().manual_seed(1)
    opt.step(task_grads=_grads(g, shared, heads, 3))
    snap = _snapshot(opt, allp)
    good = _grads(g, shared, heads, 3)
    wrong_shape = list(good)
    wrong_shape[2] = torch.zeros(3, 2)
    wrong_k = list(good)
    wrong_k[0] = good[0][:2]
    other_device = list(good)
    other_device[1] = good[1].to("meta")
    not_tensor = list(good)
    not_tensor[0] = "grad"
    for bad, exc, word in [
        (good[:-1], ValueError, "one entry per shared parameter"),
        (wrong_shape, ValueError, r"task_grads\[2\]"),
        (wrong_k, ValueError, r"task_grads\[0\]"),
        (other_device, ValueError, "meta"),
        (not_tensor, TypeError, r"task_grads\[0\]"),
        (torch.zeros(3, 5), ValueError, r"\[num_tasks, P\]"),
    ]:
        with pytest.raises(exc, match=word):
            opt.step(task_grads=bad)
        _assert_unchanged(opt, allp, snap)
    with pytest.raises(ValueError, match="no per-task gradients"):
        opt.step()
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(task_grads=good, grad_scale=torch.ones(2))
    # A backend asked for by name that cannot take a bucket raises before any bucket moved.
    if backend_status("triton").available and not torch.cuda.is_available():
        opt.backend = "triton"
        opt.param_groups[1]["params"][0].data = opt.param_groups[1]["params"][0].data.double()
        with pytest.raises(RuntimeError, match="float64"):
            opt.step(task_grads=good)
    _assert_unchanged(opt, allp[:3], (snap[0][:3], snap[1][:3]))


def test_named_backend_that_cannot_run_raises():
    p = torch.zeros(3, requires_grad=True)
    opt = AdaTask([p], 2, backend="cuda")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="cuda"):
        opt.step(task_grads=[torch.zeros(2, 3)])
    assert not opt.state[p] and torch.equal(p, torch.zeros(3))


# -------------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_flat_buffer_views_and_strided_grads(backend):
    """One [K, P] buffer (per-parameter views, no copy) and oddly strided gradients give the per-tensor result."""
    device = _need(backend)
    K = 3
    runs = []
    for form in ("list", "flat", "strided"):
        shared, heads = _problem(11, torch.float32, device)
        opt = _make(backend, shared, heads, K, "adam")
        g = torch.Generator().manual_seed(12)
        for _ in range(3):
            grads = _grads(g, shared, heads, K)
            if form == "flat":
                grads = torch.cat([x.reshape(K, -1) for x in grads], dim=1)
            elif form == "strided":
                grads = [x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() > 2 else x for x in grads]
            opt.step(task_grads=grads)
        runs.append((shared, heads, opt))
    _assert_same_run(runs[1], runs[0], torch.float32)
    _assert_same_run(runs[2], runs[0], torch.float32)


@pytest.mark.parametrize("backend", ("cpp", "triton"))
def test_fused_kernel_writes_every_au_entry(backend):
    """The AU output is poisoned with NaN before the kernel: every entry must be written (zeros on a skipped step)."""
    _need(backend)
    g = torch.Generator().manual_seed(13)
    K = 3
    params = [torch.randn(n, generator=g) for n in (5, 1100, 1)]
    grads = [torch.randn(K, p.numel(), generator=g) for p in params]
    coef = torch.tensor([[1e-2 / (1 - 0.9), (1 - 0.999) ** 0.5]] * 3, dtype=torch.float64)
    for found in (0.0, 1.0):
        m = [torch.zeros(K, p.numel()) for p in params]
        v = [torch.zeros(K, p.numel()) for p in params]
        au = torch.full((3, K), float("nan"))
        ps = [p.clone() for p in params]
        steps = [torch.ones(()) for _ in params]
        _load_extension(backend)
        _STEP[backend](StepArgs(ps, grads, m, v, coef, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=0.0, variant=0, grad_scale=None, found_inf=torch.full((1,), found),
                                au_sums=au))  # fmt: skip
        assert torch.isfinite(au).all()
        if found:
            assert torch.equal(au, torch.zeros(3, K)) and all(torch.equal(a, b) for a, b in zip(ps, params))
        else:
            # First adam step: m = 0.1 g, v = 0.001 g^2, so each task's update term is -lr g / (|g| + eps) and its
            # squared sum over a tensor is lr^2 n, up to eps.
            share = torch.stack([torch.full((K,), 1e-4 * p.numel()) for p in params])
            torch.testing.assert_close(au, share, rtol=1e-4, atol=0)


def test_skipped_param_and_au_diagnostic():
    """A None entry leaves its parameter alone; the task with the larger gradients dominates rAU."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    params = list(model.parameters())
    backend = "cpp" if backend_status("cpp").available else "torch"
    opt = AdaTask(params, 2, lr=1e-3, variant="rmsprop", backend=backend, track_au=True, au_beta=0.9)
    before = params[3].detach().clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = []
        for p in params:
            x = torch.randn(2, *p.shape, generator=g)
            x[0] *= 0.01
            grads.append(x)
        grads[3] = None
        opt.step(task_grads=grads)
    assert torch.equal(params[3], before) and not opt.state[params[3]]
    dom = opt.task_dominance(model)
    assert set(dom["per_parameter"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert set(dom["per_layer"]) == {"0", "2"}
    for r in dom["per_layer"].values():
        torch.testing.assert_close(r.sum(), torch.tensor(1.0))
    assert torch.equal(dom["per_parameter"]["2.bias"], torch.zeros(2))  # never stepped

    # The point of AdaTask: per-task accumulators balance tasks whose gradients differ 100x in scale. On the first
    # adagrad step u_k = g_k / (|g_k| + eps) = sign(g_k) for both tasks, so rAU is 1/2 each.
    opt2 = AdaTask(params[:1], 2, lr=1e-3, variant="adagrad", backend=backend, track_au=True, au_beta=0.0)
    opt2.step(task_grads=[torch.stack([torch.full((6, 4), 10.0), torch.full((6, 4), 0.1)])])
    torch.testing.assert_close(opt2.task_dominance()["per_parameter"]["shared.0"], torch.tensor([0.5, 0.5]))
    with pytest.raises(RuntimeError, match="track_au"):
        AdaTask(params, 2).task_dominance()


@pytest.mark.parametrize("mode", ("loop", "batched"))
def test_backward_feeds_step(mode):
    """opt.backward gives the shared parameters their per-task gradients and the heads grad(sum of losses)."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(7, 2) for _ in range(3)])
    x = torch.randn(9, 5)
    z = trunk(x)
    losses = [h(z).square().mean() for h in heads]
    expect = [torch.autograd.grad(loss, list(trunk.parameters()), retain_graph=True) for loss in losses]
    head_expect = torch.autograd.grad(sum(losses), list(heads.parameters()), retain_graph=True)
    opt = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend="torch")
    opt.backward(losses, features=z if mode == "batched" else None, mode=mode)
    views = opt._resolve_task_grads(None)
    for i, v in enumerate(views):
        torch.testing.assert_close(v, torch.stack([e[i] for e in expect]))
    for p, e in zip(heads.parameters(), head_expect):
        torch.testing.assert_close(p.grad, e)
    with pytest.raises(ValueError, match="3 losses"):
        opt.backward(losses[:2])
    opt.step()
    opt.zero_grad()
    with pytest.raises(ValueError, match="no per-task gradients"):
        opt.step()


# -------------------------------------------------------------------------------------------------------------- #
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/bin/nvcc"), reason="nvcc not found")
def test_cuda_source_compiles(tmp_path):
    """The .cu holds no torch headers: nvcc compiles it for sm_90a here, without torch's CUDA build."""
    nvcc = shutil.which("nvcc") or "/usr/local/bin/nvcc"
    src = os.path.join(ROOT, "csrc", "cuda", "adatask.cu")
    out = subprocess.run([nvcc, "-arch=sm_90a", "-cubin", "-O3", "-std=c++17", "--use_fast_math", "-o",
                          str(tmp_path / "adatask.cubin"), src], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "adatask.cubin").stat().st_size > 0


def test_triton_kernel_compiles_for_sm90():
    """Ahead-of-time compile of the Triton kernel for an H100, checking it asks for correctly rounded sqrt/div."""
    code = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from dgr_fast.kernels.adatask import _adatask_kernel
sig = {n: "*i64" for n in ("p_tab", "g_tab", "gs_tab", "m_tab", "v_tab", "n_tab", "blk_s")}
sig.update(blk_t="*i32", coef="*fp64", au_part="*fp32", scale_ptr="*fp32", found_ptr="*fp32", w1="fp32", beta2="fp32",
           c2="fp32", eps="fp32", decay="fp32", K="i32")
for variant, pdt in ((0, tl.bfloat16), (1, tl.float32), (2, tl.float16)):
    const = dict(VARIANT=variant, PDT=pdt, HAS_SCALE=True, HAS_FOUND=True, TRACK_AU=True, BLOCK=1024)
    sig.update({k: "constexpr" for k in const})
    k = triton.compile(triton.compiler.ASTSource(fn=_adatask_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
    assert "sqrt.rn.f32" in k.asm["ptx"] and "div.rn.f32" in k.asm["ptx"], variant
print("ok")
"""
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    if "0 active drivers" in out.stderr or "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip(f"this Triton cannot compile for sm_90 here: {out.stderr[-300:]}")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_exported():
    assert dgr_fast.AdaTask is AdaTask
    assert "AdaTask" in dgr_fast.__all__
