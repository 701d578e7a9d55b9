"""AdaTask: every backend against the per-task-loop reference, torch.optim.Adam at K = 1, resume, AMP, bad input."""

from __future__ import annotations

import copy
import importlib.util
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
from dgr_fast.mtl import per_task_grads
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
        pytest.skip("bf16 arithmetic is unreliable in the Triton interpreter (docs/DESIGN.md section 3); tested on GPU")
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
def _full_snapshot(opt):
    """What a call that raises must leave as it was, copied: every parameter's values, the state (keyed by parameter
    identity) and the param groups."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return (
        [p.detach().clone() for p in params],
        {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in st.items()}
         for p, st in opt.state.items()},
        [{k: [id(p) for p in v] if k == "params" else copy.deepcopy(v) for k, v in g.items()} for g in opt.param_groups],
    )  # fmt: skip


def _deep_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and (a.dtype, a.device, a.shape, a.stride()) == (b.dtype, b.device, b.shape, b.stride())
                and torch.equal(a, b))  # fmt: skip
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _edited(sd, edit):
    sd = copy.deepcopy(sd)
    edit(sd)
    return sd


def test_load_state_dict_checks_everything_before_changing_anything():
    """Every dict that would break a later step is refused, naming the parameter or group and the key, and the
    optimizer compares equal (deeply) before and after the failed load."""
    shared, heads = _problem(0, torch.float32, torch.device("cpu"))
    K = 3
    opt, rms = _make("torch", shared, heads, K, "adam"), _make("torch", shared, heads, K, "rmsprop")
    g = torch.Generator().manual_seed(0)
    for o in (rms, opt, opt):
        o.step(task_grads=_grads(g, shared, heads, K))
    good, rms_sd = opt.state_dict(), rms.state_dict()
    # Parameter ids: group 0 holds 0-2, group 1 holds 3-4 (shared), group 2 holds the heads 5-6.
    st = lambda i, key, value: lambda sd: sd["state"][i].__setitem__(key, value)  # noqa: E731
    pg = lambda i, key, value: lambda sd: sd["param_groups"][i].__setitem__(key, value)  # noqa: E731
    bad = [
        (_edited(good, st(0, "step", torch.tensor(-1.0))), ValueError, r"parameter 0 \(param group 0\): step must be an integer"),
        (_edited(good, st(3, "step", float("nan"))), ValueError, r"parameter 3 \(param group 1\): step must be an integer"),
        (_edited(good, st(5, "step", 2.5)), ValueError, r"parameter 5 \(param group 2\): step must be an integer"),
        (_edited(good, st(1, "step", 2**25)), ValueError, r"parameter 1 .*2\^24"),
        (_edited(good, st(1, "step", "2")), TypeError, r"parameter 1 .*step must be a number"),
        (_edited(good, lambda sd: sd["state"][4].pop("step")), ValueError, r"parameter 4 .*missing key\(s\) \['step'\]"),
        (_edited(good, st(1, "exp_avg", good["state"][1]["exp_avg"].double())), TypeError,
         r"parameter 1 \(param group 0\): exp_avg has dtype torch.float64, expected torch.float32"),
        (_edited(good, st(5, "exp_avg_sq", torch.zeros(K, 5, 3))), ValueError, r"parameter 5 \(param group 2\): exp_avg_sq has shape"),
        (_edited(good, st(0, "au", torch.zeros(K + 1))), ValueError, r"parameter 0 .*au has shape"),
        (_edited(good, lambda sd: sd["state"][2].pop("au")), ValueError, r"parameter 2 .*missing key\(s\) \['au'\]"),
        (_edited(good, st(6, "au", torch.zeros(K))), ValueError, r"parameter 6 .*unexpected key\(s\) \['au'\]; a task parameter"),
        (_edited(good, st(0, "exp_avg", [0.0])), TypeError, r"parameter 0 .*exp_avg must be a tensor"),
        (_edited(good, lambda sd: sd["state"].__setitem__(99, {})), ValueError, r"parameter id\(s\) \[99\]"),
        (rms_sd, ValueError, r"parameter 0 \(param group 0\): missing key\(s\) \['exp_avg'\]; a shared parameter of variant 'adam'"),
        (_edited(good, pg(1, "lr", float("nan"))), ValueError, r"param group 1: lr must be finite and >= 0"),
        (_edited(good, pg(0, "betas", (1.5, 2.0))), ValueError, r"param group 0: betas\[0\] must be in \[0, 1\)"),
        (_edited(good, pg(2, "eps", -1e-8)), ValueError, r"param group 2: eps must be finite and >= 0"),
        (_edited(good, pg(1, "weight_decay", "0.1")), TypeError, r"param group 1: weight_decay must be a real number"),
        (_edited(good, lambda sd: sd["param_groups"][1].pop("lr")), ValueError, r"param group 1: missing key\(s\) \['lr'\]"),
        (_edited(good, pg(2, "shared", True)), ValueError, r"param group 2: shared=True"),
    ]  # fmt: skip
    for target, sd, exc, word in [(opt, sd, exc, word) for sd, exc, word in bad] + [
        (rms, good, ValueError, r"parameter 0 .*unexpected key\(s\) \['exp_avg'\]; a shared parameter of variant 'rmsprop'")
    ]:
        before = _full_snapshot(target)
        with pytest.raises(exc, match=word):
            target.load_state_dict(sd)
        assert _deep_equal(_full_snapshot(target), before), word
    # What is accepted: a step as a Python int, and non-contiguous moments, which are stored contiguous for the
    # fused kernels.
    odd = _edited(good, st(0, "step", 2))
    odd["state"][0]["exp_avg"] = good["state"][0]["exp_avg"].transpose(0, 1).contiguous().transpose(0, 1)
    opt.load_state_dict(odd)
    state0 = opt.state[shared[0][0]]
    assert state0["exp_avg"].is_contiguous() and torch.equal(state0["exp_avg"], good["state"][0]["exp_avg"])
    assert state0["step"].dtype == torch.float32 and state0["step"].dim() == 0 and float(state0["step"]) == 2.0
    opt.step(task_grads=_grads(g, shared, heads, K))
    assert float(state0["step"]) == 3.0


def test_failed_step_changes_nothing():
    """A step that raises on the last bucket leaves the earlier ones (counters, moments, AU, parameters) as they were."""
    backend = "cpp" if backend_status("cpp").available else "torch"
    shared, heads = _problem(1, torch.float32, torch.device("cpu"))
    K = 3
    opt = _make(backend, shared, heads, K, "adam")
    g = torch.Generator().manual_seed(2)
    opt.step(task_grads=_grads(g, shared, heads, K))
    late = opt.state[heads[1]]  # a task parameter: the last bucket of the step
    late_shared = opt.state[shared[1][1]]
    for state, corrupt, exc, word in [
        (late, lambda st: st.__setitem__("exp_avg_sq", st["exp_avg_sq"].double()), TypeError,
         r"param group 2 parameter 1: exp_avg_sq has dtype torch.float64"),
        (late, lambda st: st.__setitem__("step", 1), TypeError, r"param group 2 parameter 1: step must be a 0-dim float32"),
        (late_shared, lambda st: st.__setitem__("exp_avg", st["exp_avg"].t().contiguous().t()), ValueError,
         r"param group 1 parameter 1: exp_avg must be a contiguous"),
        (late_shared, lambda st: st.pop("au"), ValueError, r"param group 1 parameter 1: missing key\(s\) \['au'\]"),
    ]:  # fmt: skip
        saved = dict(state)
        corrupt(state)
        before = _full_snapshot(opt)
        with pytest.raises(exc, match=word):
            opt.step(task_grads=_grads(g, shared, heads, K))
        assert _deep_equal(_full_snapshot(opt), before), word
        state.clear()
        state.update(saved)


@pytest.mark.parametrize("backend", ("torch", "reference", "cpp", "triton", "cuda"))
def test_non_contiguous_params_and_grads(backend):
    """A transposed view made a Parameter, and a parameter whose .data became a permuted view, stepped in place (they
    stay views) with non-contiguous gradients: torch.optim.Adam at K = 1, the contiguous reference run at K = 3."""
    device = _need(backend)
    g = torch.Generator().manual_seed(21)
    base = [torch.randn(11, 37, generator=g), torch.randn(5, 6, 7, generator=g)]

    def views():
        a = torch.nn.Parameter(base[0].clone().to(device).t())  # [37, 11], strides (1, 37)
        b = torch.nn.Parameter(base[1].clone().to(device))
        b.data = b.data.permute(2, 0, 1)  # [7, 5, 6]
        return a, b

    def grads(K):
        # Laid out unlike their parameters: the per-task gradient transposed, the head's permuted another way.
        return (torch.randn(K, 11, 37, generator=g).transpose(1, 2).to(device),
                torch.randn(6, 7, 5, generator=g).permute(1, 2, 0).to(device))  # fmt: skip

    ours, theirs = views(), views()
    opt = AdaTask([ours[0]], 1, lr=1e-2, task_params=[ours[1]], backend=backend)
    ref = torch.optim.Adam(theirs, lr=1e-2)
    for _ in range(4):
        tg, hg = grads(1)
        ours[1].grad, theirs[0].grad, theirs[1].grad = hg.clone(), tg[0].clone(), hg.clone()
        opt.step(task_grads=[tg])
        ref.step()
    for a, b in zip(ours, theirs):
        assert not a.is_contiguous() and a.stride() == b.stride()
        if backend == "torch":
            assert torch.equal(a, b)  # the same ATen ops on the same values
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    K = 3
    ours = views()
    flat = [torch.nn.Parameter(p.detach().contiguous()) for p in ours]
    opt = AdaTask([ours[0]], K, lr=1e-2, task_params=[ours[1]], backend=backend, track_au=True)
    ref = AdaTask([flat[0]], K, lr=1e-2, task_params=[flat[1]], backend="reference", track_au=True)
    for _ in range(3):
        tg, hg = grads(K)
        ours[1].grad, flat[1].grad = hg.clone(), hg.contiguous()
        opt.step(task_grads=[tg])
        ref.step(task_grads=[tg.contiguous()])
    _assert_same_run(([[ours[0]]], [ours[1]], opt), ([[flat[0]]], [flat[1]], ref), torch.float32)
    assert not ours[0].is_contiguous() and not ours[1].is_contiguous()


@pytest.mark.parametrize("backend", ("torch", "cpp", "triton", "cuda"))
def test_bad_grad_scale(backend):
    """A zero, negative, inf or NaN grad_scale would make every parameter NaN: refused on the CPU (ValueError), a
    skipped step on a GPU, where reading the scale would cost a host sync."""
    device = _need(backend)
    shared, heads = _problem(3, torch.float32, device)
    K = 2
    opt = _make(backend, shared, heads, K, "adam")
    g = torch.Generator().manual_seed(4)
    opt.step(task_grads=_grads(g, shared, heads, K))
    before = _full_snapshot(opt)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        scale = torch.full((1,), bad, device=device)
        if device.type == "cpu":
            with pytest.raises(ValueError, match="grad_scale must be positive and finite"):
                opt.step(task_grads=_grads(g, shared, heads, K), grad_scale=scale)
        else:
            opt.step(task_grads=_grads(g, shared, heads, K), grad_scale=scale)
        assert _deep_equal(_full_snapshot(opt), before), bad
    # The device-side check the GPU path relies on, here on CPU tensors (which the host check stops before it).
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        assert float(opt._fold_nonfinite([], None, torch.full((1,), bad))) > 0
    assert float(opt._fold_nonfinite([], torch.zeros(1), torch.full((1,), 2.0**16))) == 0


def test_grad_scaler_with_shared_parameters_only():
    """No task parameters: GradScaler finds no .grad in AdaTask's groups and hands it found_inf = 0 (a sum over no
    inf checks); the step checks the per-task gradients itself. The heads' Adam under the same scaler gives
    scaler.update() the inf checks it needs."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 8)
    twin = copy.deepcopy(trunk)
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in range(2)])
    opt = AdaTask(trunk.parameters(), 2, lr=1e-2, backend="torch")
    twin_opt = AdaTask(twin.parameters(), 2, lr=1e-2, backend="torch")
    head_opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    x = torch.randn(16, 6)
    for poison in (None, "task", "head", None):
        head_opt.zero_grad()
        z = trunk(x)
        scaled = [scaler.scale(h(z).pow(2).mean()) for h in heads]
        flat = per_task_grads(scaled, list(trunk.parameters()), retain_graph=True)
        torch.autograd.backward(sum(scaled), inputs=list(heads.parameters()))
        if poison == "task":
            flat[1, 0] = float("inf")
        elif poison == "head":
            heads[1].weight.grad.fill_(float("nan"))
        before = [p.detach().clone() for p in trunk.parameters()]
        unscaled = flat / scaler.get_scale()
        scaler.step(opt, task_grads=flat)
        scaler.step(head_opt)
        scaler.update()
        moved = any(not torch.equal(b, p) for b, p in zip(before, trunk.parameters()))
        assert moved == (poison != "task")
        if moved:
            twin_opt.step(task_grads=unscaled)
        for a, b in zip(trunk.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**9  # backed off once, for the heads' NaN: a per-task inf alone does not lower it


@pytest.mark.parametrize("backend", ("torch", "cpp"))
def test_sparse_gradients_are_refused(backend):
    _need(backend)
    shared, heads = _problem(5, torch.float32, torch.device("cpu"))
    K = 2
    opt = _make(backend, shared, heads, K, "adam")
    g = torch.Generator().manual_seed(6)
    opt.step(task_grads=_grads(g, shared, heads, K))
    before = _full_snapshot(opt)
    good = _grads(g, shared, heads, K)
    sparse = list(good)
    sparse[3] = good[3].to_sparse()
    with pytest.raises(TypeError, match=r"task_grads\[3\] must be dense"):
        opt.step(task_grads=sparse)
    with pytest.raises(TypeError, match=r"task_grads must be dense"):
        opt.step(task_grads=torch.cat([x.reshape(K, -1) for x in good], dim=1).to_sparse())
    heads[0].grad = heads[0].grad.to_sparse()
    with pytest.raises(TypeError, match=r"param group 2 parameter 0: AdaTask does not take sparse gradients"):
        opt.step(task_grads=good)
    assert _deep_equal(_full_snapshot(opt), before)


def _bench_script():
    spec = importlib.util.spec_from_file_location("bench_adatask", os.path.join(ROOT, "benchmarks", "bench_adatask.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_floor_moves_the_steps_bytes():
    """The floor of benchmarks/bench_adatask.py reads the K gradients once and reads and writes θ and the 2K moments
    in place, once each: the bytes step_bytes counts for the step, with the step's read/write mix."""
    bench = _bench_script()
    P, K = 100, 3
    grads, exp_avgs, rest = tensors = bench.floor_tensors(P, K, torch.device("cpu"))
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    assert 2 * (nbytes(exp_avgs) + nbytes(rest)) + nbytes(grads) == bench.step_bytes(P, K)
    before = [(t._version, t.clone()) for t in tensors]
    bench.floor_pass(*tensors)
    # One in-place op on each written buffer (its version counter moves by one), none on the gradients.
    assert [t._version - v for (v, _), t in zip(before, tensors)] == [0, 1, 1]
    assert torch.equal(grads, before[0][1]) and torch.equal(rest, before[2][1])
    assert torch.equal(exp_avgs, before[1][1] + grads)


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
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(task_grads=good, grad_scale=torch.ones(2))
    # A backend asked for by name that cannot take a bucket raises before any bucket moved.
    if backend_status("triton").available and not torch.cuda.is_available():
        opt.backend = "triton"
        p64 = opt.param_groups[1]["params"][0]
        p64.data = p64.data.double()
        # Its fp32 moments do not fit an fp64 parameter (whose moments are fp64): refused first.
        with pytest.raises(TypeError, match=r"param group 1 parameter 0: exp_avg has dtype torch.float32"):
            opt.step(task_grads=good)
        del opt.state[p64]
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
    before = [p.detach().clone() for p in [*trunk.parameters(), *heads.parameters()]]
    opt.step()  # no gradients anywhere: nothing steps, as in torch.optim
    assert all(torch.equal(a, b) for a, b in zip(before, [*trunk.parameters(), *heads.parameters()]))


def _mtl_model(seed=0, num_tasks=3):
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6))
    heads = torch.nn.ModuleList([torch.nn.Linear(6, 1) for _ in range(num_tasks)])
    return trunk, heads


def _task_losses(trunk, heads, x):
    z = trunk(x)
    return [(h(z) - i).square().mean() for i, h in enumerate(heads)]


def _params(trunk, heads):
    return [*trunk.parameters(), *heads.parameters()]


@pytest.mark.parametrize("backend", ("torch",) + FUSED)
def test_compiled_step_has_no_graph_break_and_matches_eager(backend):
    """torch.compile(opt.step, fullgraph=True) (which raises on a graph break) gives eager's parameters and AU: first
    step (state created), later ones, and a GradScaler-style skip (found_inf = 1, read on the device)."""
    device = _need(backend)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(device)
    runs = []
    for compiled in (False, True):
        trunk, heads = _mtl_model()
        trunk, heads = trunk.to(device), heads.to(device)
        opt = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend=backend, track_au=True,
                      weight_decay=0.1)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for i in range(4):
            opt.zero_grad()
            opt.backward([loss * 8.0 for loss in _task_losses(trunk, heads, x * (i + 1))])
            before = [p.detach().clone() for p in _params(trunk, heads)]
            skip = torch.full((1,), float(i == 2), device=device)
            step(grad_scale=torch.full((1,), 8.0, device=device), found_inf=skip)
            if i == 2:
                assert all(torch.equal(a, b) for a, b in zip(before, _params(trunk, heads)))
        runs.append([p.detach() for p in _params(trunk, heads)] + [opt.state[p]["au"] for p in trunk.parameters()])
    for a, b in zip(*runs):
        if backend == "torch":  # inductor fuses and reorders the foreach ops: rounding differs
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:  # the fused backends run the same kernel, as an opaque op
            assert torch.equal(a, b)


def test_backward_never_accumulates_silently():
    """A second backward() refuses while gradients are held (unless accumulate=True, which adds them); step() uses
    the per-task gradients up; backward() after a step refuses until zero_grad() clears the heads' .grad."""
    trunk, heads = _mtl_model()
    opt = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend="torch")
    x1, x2 = torch.randn(4, 5), torch.randn(6, 5)
    opt.backward(_task_losses(trunk, heads, x1))
    with pytest.raises(RuntimeError, match="accumulate=True"):
        opt.backward(_task_losses(trunk, heads, x2))
    opt.backward(_task_losses(trunk, heads, x2), accumulate=True)
    want = [torch.stack(list(g)) for g in zip(*[
        [torch.autograd.grad(l1 + l2, p, retain_graph=True)[0] for p in trunk.parameters()]
        for l1, l2 in zip(_task_losses(trunk, heads, x1), _task_losses(trunk, heads, x2))])]  # fmt: skip
    for got, w in zip(opt._resolve_task_grads(None), want):
        torch.testing.assert_close(got, w)
    head_want = torch.autograd.grad(sum(_task_losses(trunk, heads, x1)) + sum(_task_losses(trunk, heads, x2)),
                                    list(heads.parameters()))  # fmt: skip
    for p, w in zip(heads.parameters(), head_want):
        torch.testing.assert_close(p.grad, w)
    opt.step()
    assert opt._resolve_task_grads(None) == [None] * 4  # used up: a second step() cannot reuse them
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.backward(_task_losses(trunk, heads, x1))
    opt.zero_grad()
    opt.backward(_task_losses(trunk, heads, x1))


def test_backward_through_a_forwarding_wrapper_feeds_the_optimizers_step():
    """A wrapper that forwards attribute reads and keeps its own writes (as Lightning's LightningOptimizer does):
    wrapper.backward / zero_grad reach the optimizer that the wrapped step() runs."""

    class Wrapper:
        def __init__(self, optimizer):
            self._optimizer = optimizer
            self.__class__ = type("Wrapped" + type(optimizer).__name__, (Wrapper, type(optimizer)), {})

        def step(self, closure=None):
            return self._optimizer.step(closure)

        def __getattr__(self, name):
            return getattr(self._optimizer, name)

    runs = []
    for wrap in (False, True):
        trunk, heads = _mtl_model()
        inner = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend="torch")
        opt = Wrapper(inner) if wrap else inner
        for i in range(3):
            opt.zero_grad()
            opt.backward(_task_losses(trunk, heads, torch.full((4, 5), 0.3 * i)))
            opt.step()
        runs.append([p.detach() for p in _params(trunk, heads)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("norm_type", (2.0, 1.0, float("inf")))
@pytest.mark.parametrize("per_task", (False, True))
def test_clip_grad_norm_against_hand_computation(per_task, norm_type):
    trunk, heads = _mtl_model()
    opt = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend="torch")
    opt.backward(_task_losses(trunk, heads, torch.randn(4, 5)))
    shared = [g.clone() for g in opt._resolve_task_grads(None)]  # [3, *θ.shape] each
    head = [p.grad.clone() for p in heads.parameters()]
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    if per_task:
        want = torch.stack([torch.linalg.vector_norm(flat([g[k] for g in shared]), norm_type) for k in range(3)]
                           + [torch.linalg.vector_norm(flat(head), norm_type)])  # fmt: skip
        max_norm = float(want[1])  # task 1 at the limit: tasks 0 and 2 on either side of it
    else:
        want = torch.linalg.vector_norm(flat(shared + head), norm_type)
        max_norm = 0.5 * float(want)
    got = opt.clip_grad_norm_(max_norm, norm_type=norm_type, per_task=per_task)
    torch.testing.assert_close(got, want)
    scale = (max_norm / (want + 1e-6)).clamp(max=1.0)
    for g, g0 in zip(opt._resolve_task_grads(None), shared):
        torch.testing.assert_close(g, g0 * (scale[:3].view(3, *[1] * (g0.dim() - 1)) if per_task else scale))
    for p, g0 in zip(heads.parameters(), head):
        torch.testing.assert_close(p.grad, g0 * (scale[3] if per_task else scale))
    if not per_task and norm_type == 2.0:  # the same as torch's on the same tensors
        twins = [torch.nn.Parameter(torch.zeros_like(t)) for t in shared + head]
        for t, x in zip(twins, shared + head):
            t.grad = x.clone()
        torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(twins, max_norm), want)
    with pytest.raises(RuntimeError, match="non-finite"):
        heads[0].bias.grad.fill_(float("nan"))
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm"):
        opt.clip_grad_norm_(-1.0)


def test_grad_scaler_unscale_then_clip():
    """opt.unscale_(scaler) unscales the per-task gradients with the heads', so clipping sees the true norm and the
    run equals an unscaled one; an inf there skips the step and lowers the scale, heads or not;
    scaler.unscale_(opt), which cannot reach them, makes the step raise rather than step on scaled gradients."""
    runs = []
    for scaled in (False, True):
        trunk, heads = _mtl_model()
        opt = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend="torch")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        norms = []
        for i in range(3):
            opt.zero_grad()
            opt.backward([scaler.scale(loss) for loss in _task_losses(trunk, heads, torch.full((4, 5), 0.4 * i - 0.3))])
            opt.unscale_(scaler)
            norms.append(opt.clip_grad_norm_(0.05))
            scaler.step(opt)
            scaler.update()
        runs.append([p.detach() for p in _params(trunk, heads)] + norms)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(float(n) > 0.05 for n in runs[0][-3:])  # the clip did act

    trunk, _ = _mtl_model(num_tasks=2)
    opt = AdaTask(trunk.parameters(), 2, backend="torch")  # no task parameters: no .grad for GradScaler to check
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    z = trunk(torch.randn(4, 5))
    opt.backward([scaler.scale(z[:, 0].mean()), scaler.scale(z[:, 1].mean() * float("inf"))])
    before = [p.detach().clone() for p in trunk.parameters()]
    opt.unscale_(scaler)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, trunk.parameters()))
    assert scaler.get_scale() == 2.0**9

    trunk, heads = _mtl_model()
    opt = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend="torch")
    opt.backward([scaler.scale(loss) for loss in _task_losses(trunk, heads, torch.randn(4, 5))])
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"opt.unscale_\(scaler\)"):
        scaler.step(opt)


def test_repr_names_every_option():
    trunk, heads = _mtl_model()
    opt = AdaTask(trunk.parameters(), 3, lr=0.02, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.01, variant="rmsprop",
                  task_params=heads.parameters(), backend="torch", track_au=True, au_beta=0.9, process_group="local")
    text = repr(opt)
    for part in ("num_tasks=3", "variant='rmsprop'", "backend='torch'", "track_au=True", "au_beta=0.9",
                 "process_group='local'", "lr: 0.02", "betas: (0.8, 0.95)", "eps: 1e-07", "weight_decay: 0.01",
                 "shared: True", "shared: False", "Parameter Group 1"):
        assert part in text, (part, text)


def test_state_dict_hooks_see_the_state():
    """As in torch.optim: load pre-hooks see (and may replace) the incoming dict, post-hooks the loaded state;
    state_dict hooks see the optimizer and the dict it returns."""
    trunk, heads = _mtl_model()
    opt = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend="torch", track_au=True)
    opt.backward(_task_losses(trunk, heads, torch.randn(4, 5)))
    opt.step()
    seen = {}
    opt.register_state_dict_pre_hook(lambda o: seen.update(pre_save=len(o.state)))
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(post_save=sorted(sd["state"][0])))
    saved = opt.state_dict()
    assert seen == {"pre_save": 10, "post_save": ["au", "exp_avg", "exp_avg_sq", "step"]}
    other = AdaTask(trunk.parameters(), 3, task_params=heads.parameters(), backend="torch", track_au=True)

    def pre(o, sd):
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.5
        return sd

    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_post_hook(lambda o: seen.update(
        loaded={k: v.clone() for k, v in o.state[next(iter(trunk.parameters()))].items()}, lr=o.param_groups[0]["lr"]))
    other.load_state_dict(saved)
    assert seen["lr"] == 0.5
    for k, v in opt.state[next(iter(trunk.parameters()))].items():
        assert torch.equal(seen["loaded"][k], v)


def test_typed_package_ships_py_typed(tmp_path):
    """mypy types an installed dgr_fast only with dgr_fast/py.typed in it: setup.py's build copies it."""
    env = {**os.environ, "DGR_FAST_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "dgr_fast" / "py.typed").is_file()


def test_kernel_module_does_not_import_the_optimizer():
    """The Triton kernel takes the op's arguments, not the optimizer's StepArgs: no import cycle."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "dgr_fast", "kernels", "adatask.py")).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not [m for m in imported if m and m.startswith("dgr_fast.optim")]


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
