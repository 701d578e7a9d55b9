"""dgr_penalty: the closed-form `torch` backend against autograd double backward, checks, dispatch, DummyHeads."""

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dgr_fast
from dgr_fast import DummyHeads, DummyTask, dgr_penalty
from dgr_fast.reference import dgr as ref
from dgr_cases import LOSS_MIX, make_case, penalty_and_grad

SHAPES = {"rows": (37, 29), "dense2d": (2, 11, 5, 7), "dense3d": (2, 6, 3, 4, 5), "dense1d": (3, 9, 13)}


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("reduction", ["mean", "row_mean"])
@pytest.mark.parametrize("norm", ["squared", "l2"])
def test_torch_matches_reference(shape, reduction, norm):
    case = make_case(shape, seed=hash((shape, reduction, norm)) % 1000)
    kw = dict(reductions=reduction, norm=norm, task_weights=[1.0, 0.5, 2.0, 1.5])
    want = penalty_and_grad(dgr_penalty, case, backend="reference", **kw)
    got = penalty_and_grad(dgr_penalty, case, backend="torch", **kw)
    assert want[0] > 0
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


@pytest.mark.parametrize("layout,shape", [("transposed", (37, 29)), ("sliced", (23, 13)), ("transposed", (2, 7, 3, 5)),
                                          ("sliced", (2, 7, 3, 5)), ("channels_last", (3, 7, 4, 5))])
def test_non_contiguous_features(layout, shape):
    case = make_case(shape, layout=layout, seed=3)
    assert not case["features"].is_contiguous()
    want = penalty_and_grad(dgr_penalty, case, backend="reference")
    got = penalty_and_grad(dgr_penalty, case, backend="torch")
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_weights_multiply_the_loss_before_the_gradient():
    """Independent of the library's weighting code: w_k inside the loss that is differentiated."""
    case = make_case((31, 9), seed=5)
    w = torch.tensor([0.3, 2.0, 1.0, 0.7], dtype=torch.float64)
    z = case["features"].requires_grad_(True)
    head_fns, params, loss_fns = [], [], []
    for k in range(4):
        b = case["biases"][k]
        head_fns.append(lambda ps: ref.linear_head(z, ps[0], ps[1] if len(ps) > 1 else None))
        params.append([case["weights"][k]] + ([] if b is None else [b]))
        loss_fns.append(lambda s, k=k: w[k] * ref.task_loss(s, case["targets"][k], case["losses"][k], mask=case["masks"][k], ignore_index=-1))
    want = ref.head_penalties(head_fns, params, loss_fns).sum()
    got = dgr_penalty(**case, task_weights=w, backend="torch")
    assert_close(got, want)


def test_learnable_task_weights_get_their_gradient():
    case = make_case((17, 5), seed=6)
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    per_task = dgr_fast.dgr_penalty_per_task(**{k: v for k, v in case.items()}, backend="torch")
    (grad,) = torch.autograd.grad(dgr_penalty(**case, task_weights=w, backend="torch"), w)
    assert_close(grad, 2 * w.detach() * per_task.detach())


def test_gradcheck_and_gradgradcheck_torch_backend():
    for shape in [(7, 5), (2, 4, 3, 2)]:
        case = make_case(shape, seed=7)
        z = case.pop("features").requires_grad_(True)
        for norm in ["squared", "l2"]:
            fn = lambda f: dgr_penalty(f, **case, norm=norm, backend="torch")  # noqa: E731
            assert torch.autograd.gradcheck(fn, (z,))
            assert torch.autograd.gradgradcheck(fn, (z,))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nothing_valid_gives_zero_and_a_zero_gradient(backend):
    case = make_case((9, 4), seed=8)
    case["targets"][0].fill_(-1)  # every ce target ignored
    case["masks"] = [torch.zeros(9, dtype=torch.bool)] * 4
    for norm in ["squared", "l2"]:
        value, grad = penalty_and_grad(dgr_penalty, case, backend=backend, norm=norm)
        assert value == 0
        assert torch.isfinite(grad).all() and (grad == 0).all()


def test_empty_task_contributes_nothing():
    case = make_case((15, 6), seed=9, empty_task=1)
    full = penalty_and_grad(dgr_penalty, case, backend="torch")
    keep = [0, 2, 3]
    sub = {k: ([v[i] for i in keep] if isinstance(v, list) else v) for k, v in case.items()}
    part = penalty_and_grad(dgr_penalty, sub, backend="torch")
    assert_close(full[0], part[0])
    assert_close(full[1], part[1])


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6), d=st.integers(1, 9), spatial=st.lists(st.integers(1, 4), max_size=2),
    tasks=st.lists(st.tuples(st.sampled_from(LOSS_MIX), st.integers(1, 6)), min_size=1, max_size=4),
    reduction=st.sampled_from(["mean", "row_mean"]), seed=st.integers(0, 10_000),
)
def test_property_torch_equals_reference(n, d, spatial, tasks, reduction, seed):
    losses, classes = zip(*tasks)
    case = make_case((n, d, *spatial), classes=classes, losses=losses, seed=seed)
    want = penalty_and_grad(dgr_penalty, case, backend="reference", reductions=reduction)
    got = penalty_and_grad(dgr_penalty, case, backend="torch", reductions=reduction)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_fp32_features_accumulate_in_fp32():
    case = make_case((40, 16), seed=10)
    case32 = {**case, "features": case["features"].float(), "weights": [w.float() for w in case["weights"]],
              "biases": [None if b is None else b.float() for b in case["biases"]],
              "targets": [t.float() if t.is_floating_point() else t for t in case["targets"]]}
    want = penalty_and_grad(dgr_penalty, case, backend="reference")
    got = penalty_and_grad(dgr_penalty, case32, backend="torch")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_on_torch_backend(dtype):
    case = make_case((40, 16), seed=11)
    half = {**case, "features": case["features"].to(dtype)}
    want = penalty_and_grad(dgr_penalty, {**case, "features": half["features"].double()}, backend="reference")
    got = penalty_and_grad(dgr_penalty, half, backend="torch")
    assert got[1].dtype == dtype
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got[1].double(), want[1], rtol=2e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: refused before any kernel runs, naming the argument.


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda c: {"features": c["features"][:, 0]}, ValueError, "features must be"),
        (lambda c: {"features": c["features"].long()}, TypeError, "features must be a floating"),
        (lambda c: {"weights": [c["weights"][0][:, :3]] + c["weights"][1:]}, ValueError, r"weights\[0\]"),
        (lambda c: {"losses": c["losses"][:3]}, ValueError, "losses has 3 entries"),
        (lambda c: {"targets": c["targets"][:2]}, ValueError, "targets has 2 entries"),
        (lambda c: {"biases": c["biases"][:1]}, ValueError, "biases has 1 entries"),
        (lambda c: {"masks": c["masks"] + [None]}, ValueError, "masks has 5 entries"),
        (lambda c: {"losses": ["ce", "bce", "huber", "l1"]}, ValueError, r"losses\[2\]"),
        (lambda c: {"reductions": "sum"}, ValueError, r"reductions\[0\]"),
        (lambda c: {"targets": [c["targets"][0] + 7] + c["targets"][1:]}, ValueError, r"targets\[0\] holds class index"),
        (lambda c: {"targets": [torch.full_like(c["targets"][0], -5)] + c["targets"][1:]}, ValueError, "class index -5"),
        (lambda c: {"targets": [c["targets"][0].double()] + c["targets"][1:]}, TypeError, r"targets\[0\].*integer"),
        (lambda c: {"targets": c["targets"][:1] + [c["targets"][1].long()] + c["targets"][2:]}, TypeError, r"targets\[1\].*floating"),
        (lambda c: {"targets": c["targets"][:2] + [c["targets"][2][:, :1]] + c["targets"][3:]}, ValueError, r"targets\[2\].*must be \[11, 2\]"),
        (lambda c: {"targets": [c["targets"][0].to("meta")] + c["targets"][1:]}, ValueError, r"targets\[0\] is on meta"),
        (lambda c: {"masks": [torch.ones(11)] + c["masks"][1:]}, ValueError, r"masks\[0\] must be None or a bool"),
        (lambda c: {"biases": [torch.zeros(2, dtype=torch.float64)] + c["biases"][1:]}, ValueError, r"biases\[0\]"),
        (lambda c: {"weights": []}, ValueError, "weights is empty"),
        (lambda c: {"weights": torch.stack([c["weights"][1], c["weights"][1]])}, TypeError, "sequence"),
        (lambda c: {"norm": "l1"}, ValueError, "norm must be"),
        (lambda c: {"task_weights": [1.0, 2.0]}, ValueError, "task_weights must have one entry per task"),
        (lambda c: {"backend": "fastest"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_refused(change, error, match):
    case = make_case((11, 6), seed=12)
    with pytest.raises(error, match=match):
        dgr_penalty(**{"backend": "torch", **case, **change(case)})


def test_ignore_index_is_allowed_outside_the_class_range():
    case = make_case((11, 6), seed=13, ignore_index=255)
    assert (case["targets"][0] == 255).any()
    want = penalty_and_grad(dgr_penalty, case, backend="reference")
    got = penalty_and_grad(dgr_penalty, case, backend="torch")
    assert_close(got[1], want[1])


# ---------------------------------------------------------------------------------------------------------------
# Dispatch.


def test_available_backends_says_why():
    status = dgr_fast.available_backends()
    assert list(status) == list(dgr_fast.BACKENDS)
    assert status["torch"].available and status["reference"].available
    for s in status.values():
        assert s.reason
    if not torch.cuda.is_available():
        assert not status["cuda"].available and "CUDA" in status["cuda"].reason


def test_named_backend_that_cannot_run_raises():
    case = make_case((5, 3), seed=14)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda'.*cannot run here"):
            dgr_penalty(**case, backend="cuda")


def test_environment_variable_sets_the_default(monkeypatch):
    case = make_case((5, 3), seed=15)
    monkeypatch.setenv("DGR_FAST_BACKEND", "reference")
    assert_close(dgr_penalty(**case), dgr_penalty(**case, backend="torch"))
    monkeypatch.setenv("DGR_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DGR_FAST_BACKEND"):
        dgr_penalty(**case)


def test_automatic_choice_on_cpu_is_never_the_interpreter_or_reference():
    from dgr_fast.backends import resolve_backend

    from dgr_fast.ops.dgr_penalty import DTYPES, IMPLEMENTED

    name = resolve_backend("dgr_penalty", None, torch.device("cpu"), torch.float32, IMPLEMENTED, DTYPES)
    assert name == ("cpp" if dgr_fast.available_backends()["cpp"].available else "torch")


@pytest.fixture
def pretend_gpu(monkeypatch):
    """A CUDA device with H100's 227 KiB of opt-in shared memory per block, the cuda and triton backends available:
    dispatch on metadata only, no kernel runs."""
    import types

    from dgr_fast import backends
    from dgr_fast.ops import dgr_penalty as op

    real = backends.backend_status
    monkeypatch.setattr(backends, "backend_status", lambda name: backends.BackendStatus(name, True, "pretend")
                        if name in ("cuda", "triton") else real(name))
    monkeypatch.setattr(op, "_missing_kernels", lambda name: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(shared_memory_per_block_optin=232448))
    monkeypatch.setattr(backends, "_warned", set())
    return op


@pytest.mark.parametrize("shape, expected", [
    ((3, 17, 4096, 5), "cuda"),      # the limits of dgr_penalty.cu on sm_90: D <= 4096 for every C <= 256
    ((3, 256, 4096, 5), "cuda"),
    ((3, 17, 4800, 5), "cuda"),      # 48 (4800 + 2 * 20) + 128 = 232448 bytes: exactly the budget
    ((3, 17, 4801, 5), "triton"),
    ((33, 40, 64, 0), "triton"),     # more than 32 tasks
    ((2, 257, 64, 0), "triton"),     # more than 256 columns
])
def test_automatic_choice_passes_over_cuda_beyond_its_limits(pretend_gpu, shape, expected):
    cuda = torch.device("cuda")
    if expected == "cuda":
        assert pretend_gpu._resolve(cuda, torch.float32, None, shape) == "cuda"
        return
    with pytest.warns(RuntimeWarning, match="backend 'cuda' is unavailable"):
        assert pretend_gpu._resolve(cuda, torch.float32, None, shape) == expected
    with pytest.raises(RuntimeError, match="backend 'cuda' .*cannot run here"):
        pretend_gpu._resolve(cuda, torch.float32, "cuda", shape)


# ---------------------------------------------------------------------------------------------------------------
# Heads beyond linear, and the authors' finite-difference estimate.


def mlp_case(seed=16):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    z = torch.randn(12, 8, generator=g, dtype=torch.float64)
    heads = [nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double(), nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 2)).double()]
    y0 = torch.randint(0, 4, (12,), generator=g)
    y1 = torch.randn(12, 2, generator=g, dtype=torch.float64)
    loss_fns = [lambda s: ref.task_loss(s, y0, "ce"), lambda s: ref.task_loss(s, y1, "mse")]
    return z, heads, loss_fns


def test_module_penalty_matches_linear_heads():
    case = make_case((13, 7), seed=17, no_bias=())
    heads = []
    for w, b in zip(case["weights"], case["biases"]):
        lin = nn.Linear(7, w.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        heads.append(lin)
    loss_fns = [lambda s, k=k: ref.task_loss(s, case["targets"][k], case["losses"][k], mask=case["masks"][k], ignore_index=-1) for k in range(4)]
    got = penalty_and_grad(lambda features, **_: ref.module_penalty(features, heads, loss_fns), case)
    want = penalty_and_grad(dgr_penalty, case, backend="torch")
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_module_penalty_leaves_heads_untouched_and_is_twice_differentiable():
    z, heads, loss_fns = mlp_case()
    before = [p.detach().clone() for h in heads for p in h.parameters()]
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: ref.module_penalty(f, heads, loss_fns), (z,))
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(before, [p for h in heads for p in h.parameters()]))


def test_finite_difference_estimate_converges_to_the_exact_gradient():
    z, heads, loss_fns = mlp_case()
    exact_value, exact = penalty_and_grad(lambda features, **_: ref.module_penalty(features, heads, loss_fns), {"features": z})
    errors = []
    for h in [1e-1, 1e-2, 1e-3]:
        value, estimate = ref.finite_difference_features_grad(z, heads, loss_fns, h=h)
        assert_close(value, exact_value)
        errors.append(((estimate - exact).norm() / exact.norm()).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# DummyHeads.


TASKS = {"seg": DummyTask("ce", 5, ignore_index=-1), "depth": DummyTask("l1", 1, reduction="row_mean"), "normal": DummyTask("l1", 3, reduction="row_mean")}


def dense_targets(seed=18, b=2, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(-1, 5, (b, h, w), generator=g)
    return {"seg": seg, "depth": torch.rand(b, 1, h, w, generator=g), "normal": torch.randn(b, 3, h, w, generator=g)}


def test_dummy_heads_are_fixed_buffers_drawn_like_pytorch_linear():
    heads = DummyHeads(64, TASKS, seed=0)
    assert list(heads.parameters()) == []
    assert heads.weight.shape == (1, 9, 64) and heads.bias.shape == (1, 9)
    bound = 1 / math.sqrt(64)
    assert heads.weight.abs().max() <= bound and heads.weight.abs().max() > 0.9 * bound
    assert abs(heads.weight.mean().item()) < 0.02
    assert set(heads.state_dict()) == {"weight", "bias", "_extra_state"}


def test_dummy_heads_penalty_equals_dgr_penalty():
    heads = DummyHeads(6, TASKS, seed=1)
    z = torch.randn(2, 6, 4, 5)
    t = dense_targets()
    masks = {"depth": t["depth"][:, 0] > 0.3}
    got = heads(z, t, masks=masks, task_weights=[1.0, 2.0, 0.5])
    w, b = heads.weight[0], heads.bias[0]
    want = dgr_penalty(z, [w[:5], w[5:6], w[6:]], [b[:5], b[5:6], b[6:]], [t["seg"], t["depth"], t["normal"]],
                       ["ce", "l1", "l1"], masks=[None, masks["depth"], None], ignore_index=-1,
                       reductions=["mean", "row_mean", "row_mean"], task_weights=[1.0, 2.0, 0.5], backend="torch")
    torch.testing.assert_close(got, want)


def test_dummy_heads_average_their_sets():
    heads = DummyHeads(6, list(TASKS.values()), num_sets=3, seed=2, norm="l2")
    z, t = torch.randn(2, 6, 4, 5), list(dense_targets().values())
    per_set = []
    for s in range(3):
        one = DummyHeads(6, list(TASKS.values()), norm="l2")
        one.weight.copy_(heads.weight[s : s + 1])
        one.bias.copy_(heads.bias[s : s + 1])
        per_set.append(one(z, t))
    torch.testing.assert_close(heads(z, t), torch.stack(per_set).mean())


def test_dummy_heads_seed_resample_and_state_dict():
    a, b = DummyHeads(8, TASKS, seed=3), DummyHeads(8, TASKS, seed=3)
    assert torch.equal(a.weight, b.weight)
    first = a.weight.clone()
    a.resample()
    assert not torch.equal(a.weight, first)
    c = DummyHeads(8, TASKS, seed=99)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.weight, a.weight)
    a.resample(), c.resample()
    assert torch.equal(c.weight, a.weight) and torch.equal(c.bias, a.bias)  # the generator state travelled too


@pytest.mark.parametrize("mode,changes_on_forward,changes_on_epoch", [("never", False, False), ("step", True, False), ("epoch", False, True)])
def test_dummy_heads_resample_modes(mode, changes_on_forward, changes_on_epoch):
    heads = DummyHeads(6, TASKS, resample=mode, seed=4)
    z, t = torch.randn(2, 6, 4, 5), dense_targets()
    before = heads.weight.clone()
    heads(z, t)
    assert (not torch.equal(before, heads.weight)) == changes_on_forward
    heads.eval()
    before = heads.weight.clone()
    heads(z, t)
    assert torch.equal(before, heads.weight)  # never redrawn in eval mode
    heads.new_epoch()
    assert (not torch.equal(before, heads.weight)) == changes_on_epoch


def test_dummy_heads_bad_arguments():
    with pytest.raises(ValueError, match="resample"):
        DummyHeads(4, TASKS, resample="always")
    with pytest.raises(ValueError, match="num_sets"):
        DummyHeads(4, TASKS, num_sets=0)
    with pytest.raises(ValueError, match="DummyTask.loss"):
        DummyTask("hinge", 3)
    with pytest.raises(ValueError, match="out_features"):
        DummyTask("ce", 0)
    heads = DummyHeads(6, TASKS, seed=5)
    z = torch.randn(2, 6, 4, 5)
    with pytest.raises(ValueError, match="targets has no entry"):
        heads(z, {"seg": dense_targets()["seg"]})
    with pytest.raises(ValueError, match="not among"):
        heads(z, {**dense_targets(), "edges": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"weights\[0\] must be \[C_k, D\] with D = features.shape\[1\] = 7"):
        heads(torch.randn(2, 7, 4, 5), dense_targets())


def test_dummy_heads_in_a_training_step():
    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 6, 3, padding=1)
    heads = DummyHeads(6, TASKS, seed=6)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1)
    x, t = torch.randn(2, 3, 4, 5), dense_targets()
    z = encoder(x)
    (0.1 * heads(z, t)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    assert heads.weight.grad is None
    opt.step()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_torch_compile_traces_dummy_heads(backend):
    if not dgr_fast.available_backends()[backend].available:
        pytest.skip(f"backend {backend!r} is not available here: {dgr_fast.available_backends()[backend].reason}")
    heads = DummyHeads(6, TASKS, seed=7, backend=backend)
    z, t = torch.randn(2, 6, 4, 5, requires_grad=True), dense_targets()
    targets = []

    def recording(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(heads, backend=recording, fullgraph=False)
    want = penalty_and_grad(lambda features, **_: heads(features, t), {"features": z})
    got = penalty_and_grad(lambda features, **_: compiled(features, t), {"features": z})
    torch.testing.assert_close(got, want)
    if backend != "torch":  # the fused backends are traced as their custom op, not through the eager Function
        assert any("dgr_penalty_fwd" in target for target in targets), targets


def test_dummy_heads_per_task_splits_the_penalty():
    heads = DummyHeads(6, TASKS, num_sets=2, seed=8)
    z, t = torch.randn(2, 6, 4, 5), dense_targets()
    per_task = heads.per_task(z, t)
    assert per_task.shape == (3,)
    torch.testing.assert_close(per_task.sum(), heads(z, t))
    with pytest.raises(ValueError, match="norm='squared'"):
        DummyHeads(6, TASKS, norm="l2").per_task(z, t)


@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3, 4), (2, 5, 0, 4)])
def test_empty_batch_gives_zero(shape):
    case = make_case(shape, seed=19)
    for backend in ["reference", "torch"]:
        value, grad = penalty_and_grad(dgr_penalty, case, backend=backend)
        assert value == 0 and grad.shape == case["features"].shape



FUSED = [pytest.param(name, marks=pytest.mark.skipif(not dgr_fast.available_backends()[name].available,
                                                     reason=f"backend {name!r} is not available here"))
         for name in ("cpp", "triton")]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op_path", ["eager", "custom_op"])
def test_fused_second_derivative_raises_on_every_route(backend, op_path, monkeypatch):
    """A second derivative through a fused backend must raise, never silently drop the penalty's term: with
    ``torch.autograd.grad(..., inputs=z)`` torch prunes an error node that hangs off a detached copy (as
    ``once_differentiable``'s does), and returned 2 z alone for ``(z ** 2).sum() + penalty``."""
    if op_path == "custom_op":  # the torch.library op pair that torch.compile traces, run eagerly
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    case = make_case((7, 5), dtype=torch.float64, seed=21)
    x = case["features"].clone().requires_grad_(True)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64, requires_grad=True)

    def total(z, task_weights=None, backend=backend):
        return (z**2).sum() + dgr_penalty(**{**case, "features": z}, task_weights=task_weights, backend=backend)

    z = x * 1.0
    (g,) = torch.autograd.grad(total(z), z, create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(g.sum(), z)  # the route that was pruned
    (g,) = torch.autograd.grad(total(x * 1.0), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(g.sum(), x)  # through the op that made the features
    (g,) = torch.autograd.grad(total(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        g.sum().backward()
    (g,) = torch.autograd.grad(total(x, task_weights=w), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(g.sum(), w)  # through the incoming gradient w_k^2
    # create_graph=True alone is fine: the first derivative is the value torch gives
    (first,) = torch.autograd.grad(total(x), x, create_graph=True)
    (want,) = torch.autograd.grad(total(x, backend="torch"), x)
    torch.testing.assert_close(first.detach(), want, rtol=1e-10, atol=1e-12)


def test_fused_kernels_take_no_fp32_ce_head_beyond_exact_class_indices(pretend_gpu):
    """The fused kernels stage "ce" class indices in the accumulation dtype: refused past 2^24 classes in fp32."""
    cuda, wide = torch.device("cuda"), (2, 2**24 + 2, 1, 2**24 + 1)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        assert pretend_gpu._resolve(cuda, torch.float32, None, wide) == "torch"
    with pytest.raises(RuntimeError, match="class indices in fp32"):
        pretend_gpu._resolve(cuda, torch.float32, "triton", wide)
    assert pretend_gpu._resolve(cuda, torch.float64, "triton", wide) == "triton"  # exact in fp64
    assert pretend_gpu._resolve(cuda, torch.float32, "triton", (2, 2**24 + 2, 1, 2**24)) == "triton"
    if dgr_fast.available_backends()["cpp"].available:
        with pytest.raises(RuntimeError, match="class indices in fp32"):
            pretend_gpu._resolve(torch.device("cpu"), torch.float32, "cpp", wide)


def test_torch_backend_reads_class_indices_above_2_24_exactly():
    """A class index that fp32 cannot hold (2^24 + 1 rounds to 2^24) must hit its own class: it travelled as fp32
    once, and the penalty came out 4.0 instead of ~1e-11."""
    classes = 2**24 + 2
    z = torch.ones(1, 1)
    weight = torch.zeros(classes, 1)
    weight[2**24 + 1] = 30.0  # that class's logit dominates: p is one-hot on it, the residual ~0
    target = torch.tensor([2**24 + 1])
    with pytest.warns(RuntimeWarning, match="class indices in fp32") if dgr_fast.available_backends()["cpp"].available \
            else contextlib.nullcontext():
        assert dgr_penalty(z, [weight], None, [target], "ce") < 1e-6  # automatic: cpp passed over, torch runs
    assert dgr_penalty(z, [weight], None, [target], "ce", backend="torch") < 1e-6
    weight[2**24 + 1], weight[2**24] = 0.0, 30.0  # and the neighbour fp32 confuses it with: a large penalty
    assert dgr_penalty(z, [weight], None, [target], "ce", backend="torch") > 1.0


@pytest.mark.parametrize("ignore_index, match", [(1.0, r"ignore_index\[0\] must be an int"),
                                                 ([None] * 4, r"ignore_index\[0\] must be an int"),
                                                 (torch.tensor(-1), "one value for every task"),
                                                 (True, "one value for every task")])
def test_ignore_index_must_be_ints(ignore_index, match):
    case = make_case((9, 4))
    for backend in ("torch", "reference", "cpp"):
        with pytest.raises(TypeError, match=match):
            dgr_penalty(**{**case, "ignore_index": ignore_index}, backend=backend)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_every_backend_takes_every_integer_class_dtype(dtype):
    case = make_case((9, 4))
    ignore = 255 if dtype == torch.uint8 else -1
    targets = [t.masked_fill(t == -1, ignore).to(dtype) if t.dtype == torch.long else t for t in case["targets"]]
    want = dgr_penalty(**case, backend="reference")
    for backend in [b for b in ("reference", "torch", "cpp") if dgr_fast.available_backends()[b].available]:
        assert_close(dgr_penalty(**{**case, "targets": targets, "ignore_index": ignore}, backend=backend), want)


def test_dummy_heads_refuse_a_bool_width_and_load_nothing_from_other_sizes():
    with pytest.raises(ValueError, match="in_features"):
        DummyHeads(True, TASKS)
    with pytest.raises(ValueError, match="out_features"):
        DummyTask("ce", True)
    small, big = DummyHeads(6, [DummyTask("ce", 3)], seed=1), DummyHeads(6, [DummyTask("ce", 4)], seed=2)
    before = {k: v.clone() for k, v in big.state_dict().items() if isinstance(v, torch.Tensor)}
    generator = big.generator.get_state().clone()
    with pytest.raises(RuntimeError, match="other sizes"):
        big.load_state_dict(small.state_dict())
    assert torch.equal(big.generator.get_state(), generator)  # it was replaced before the error once
    assert all(torch.equal(v, big.state_dict()[k]) for k, v in before.items())
