"""dgr_penalty and DummyHeads under torch.compile (one graph, eager's numbers) and under torch.func transforms.

- torch.compile: the penalty alone and a whole training step (encoder, task heads, DummyHeads, backward inside the
  graph with ``trace_autograd_ops``, or the compiled loss with the backward outside) trace with 0 graph breaks on
  every backend that runs here (``torch._dynamo.explain``), compile with ``fullgraph=True`` and give eager's value
  and gradients in fp32 and fp64.
- torch.func: ``grad``, ``vmap`` (one penalty per problem of a batch), ``vmap(grad)`` and ``jvp`` on the ``torch``
  and ``reference`` backends equal plain autograd; the fused backends refuse every transform with one error that
  names the backends that work.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dgr_cases import make_case
from dgr_fast import DummyHeads, dgr_penalty
from dgr_fast.backends import ENV_VAR, backend_status
from dgr_fast.dummy_heads import DummyTask
from dgr_fast.ops.dgr_penalty import DTYPES, dgr_penalty_backend

FUNC_BACKENDS = ("torch", "reference")
FUSED_BACKENDS = ("cpp", "triton", "cuda")
BACKENDS = (*FUNC_BACKENDS, *FUSED_BACKENDS)
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def needs(backend: str, dtype: torch.dtype | None = None) -> None:
    status = backend_status(backend)
    if not status.available:
        pytest.skip(f"backend {backend!r} does not run here: {status.reason}")
    if dtype is not None and dtype not in DTYPES.get(backend, (dtype,)):  # torch, reference: any floating dtype
        pytest.skip(f"backend {backend!r} does not take {dtype}")


def device_for(backend: str) -> str:
    """CUDA tensors for the GPU backends where a GPU is (Triton takes CPU tensors only in its interpreter)."""
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def on_device(case: dict, backend: str) -> dict:
    """``case`` on ``backend``'s device, in fp32 where the backend has no fp64 (``cuda``)."""
    dtype = case["features"].dtype
    dtype = dtype if dtype in DTYPES.get(backend, (dtype,)) else torch.float32
    device = device_for(backend)

    def move(t):
        return t if t is None else t.to(device, dtype) if t.is_floating_point() else t.to(device)

    return {k: [move(t) for t in v] if k in ("weights", "biases", "targets", "masks") else
            move(v) if k == "features" else v for k, v in case.items()}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Each test's compiled functions start without the previous tests' caches (recompilation limits, guards).
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def penalty_fn(case: dict, backend: str | None, **kwargs):
    """``f(features, *targets) -> penalty`` on ``case``'s heads and masks, the task weights fixed."""
    def f(features, *targets):
        return dgr_penalty(features, case["weights"], case["biases"], list(targets), case["losses"],
                           masks=case["masks"], ignore_index=case["ignore_index"], backend=backend,
                           task_weights=[1.0, 0.5, 2.0, 1.5], **kwargs)
    return f


def value_and_grad(f, features, targets):
    z = features.detach().clone().requires_grad_(True)
    value = f(z, *targets)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def assert_one_graph(f, *args) -> None:
    explained = torch._dynamo.explain(f)(*args)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_compiles_in_one_graph_with_eagers_results(backend, dtype):
    needs(backend, dtype)
    case = on_device(make_case((3, 6, 5), dtype=dtype, seed=1), backend)
    f = penalty_fn(case, backend, norm="l2")
    assert_one_graph(f, case["features"], *case["targets"])
    want, want_grad = value_and_grad(f, case["features"], case["targets"])
    got, got_grad = value_and_grad(torch.compile(f, fullgraph=True), case["features"], case["targets"])
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_grad, want_grad, **TOL[dtype])


def test_compiled_penalty_refuses_a_bad_class_index_when_it_runs():
    case = make_case((9, 4), dtype=torch.float32)
    f = torch.compile(penalty_fn(case, "torch"), fullgraph=True)
    f(case["features"], *case["targets"])
    bad = [t.clone() for t in case["targets"]]
    bad[0][2] = 5  # task 0 has 5 classes: index 5 is outside [0, 5)
    with pytest.raises(RuntimeError, match=r"targets\[0\] holds a class index outside \[0, 5\)"):
        f(case["features"], *bad)


class Model(nn.Module):
    """An encoder, two task heads and the dummy heads of both tasks: ``loss(x, y)`` is the training loss."""

    def __init__(self, dummy_tasks, backend: str, dtype: torch.dtype, resample: str = "never") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 2)])
        self.dummy = DummyHeads(8, dummy_tasks, seed=0, backend=backend, dtype=dtype, resample=resample)
        self.to(dtype)

    def loss(self, x, y_class, y_value):
        z = self.encoder(x)
        task = (nn.functional.cross_entropy(self.heads[0](z), y_class)
                + nn.functional.mse_loss(self.heads[1](z), y_value))
        return task + 0.5 * self.dummy(z, [y_class, y_value])


def module_head():
    return nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 3))


def mlp_head():
    """Linear-ReLU-Linear: DummyHeads takes dgr_mlp_penalty's closed form for it."""
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))


HEADS = {
    "linear": [DummyTask("ce", 3), DummyTask("mse", 2)],
    "module": [DummyTask("ce", 3, head=module_head), DummyTask("mse", 2)],
    "mlp": [DummyTask("ce", 3, head=mlp_head), DummyTask("mse", 2)],
}


def step_inside(model):
    """The whole step in one graph: forward, backward (``trace_autograd_ops``), the loss returned."""
    def step(*batch):
        loss = model.loss(*batch)
        loss.backward()
        return loss.detach()
    return step


def batch(dtype, device="cpu"):
    g = torch.Generator().manual_seed(3)
    return tuple(t.to(device) for t in (torch.randn(10, 5, generator=g, dtype=dtype),
                                         torch.randint(0, 3, (10,), generator=g),
                                         torch.randn(10, 2, generator=g, dtype=dtype)))


def eager_step(model, data):
    loss = model.loss(*data)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", list(HEADS))
def test_training_step_compiles_in_one_graph_with_eagers_results(heads, backend, dtype):
    needs(backend, dtype)
    model, data = Model(HEADS[heads], backend, dtype).to(device_for(backend)), batch(dtype, device_for(backend))
    want, want_grads = eager_step(copy.deepcopy(model), data)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        assert_one_graph(step_inside(model), *data)
        model.zero_grad(set_to_none=True)
        got = torch.compile(step_inside(model), fullgraph=True)(*data)
    torch.testing.assert_close(got, want, **TOL[dtype])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], **TOL[dtype], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_loss_with_the_backward_outside(backend):
    """The usual split: the loss compiled in one graph, ``loss.backward()`` runs its compiled backward."""
    needs(backend)
    dtype = torch.float32
    model, data = Model(HEADS["linear"], backend, dtype).to(device_for(backend)), batch(dtype, device_for(backend))
    want, want_grads = eager_step(copy.deepcopy(model), data)
    assert_one_graph(model.loss, *data)
    got = torch.compile(model.loss, fullgraph=True)(*data)
    got.backward()
    torch.testing.assert_close(got.detach(), want, **TOL[dtype])
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], **TOL[dtype], msg=name)


def test_module_heads_with_cut_convolutions_compile_in_one_graph():
    """A dilated convolution in a module dummy head, cut to its live taps (ops.live_taps) inside DummyHeads: the
    penalty and its backward trace into one graph, and the compiled value and gradient are eager's."""
    def head():
        return nn.Sequential(nn.Conv2d(4, 3, 3, padding=3, dilation=3), nn.ReLU(), nn.Conv2d(3, 2, 1))

    dummy = DummyHeads(None, [DummyTask("ce", 2, head=head)], seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)  # 3 rows: the taps 3 rows up and down are dead
    y = torch.randint(0, 2, (2, 3, 5), generator=g)

    def step(features, target):
        value = dummy(features, [target])
        value.backward()
        return value.detach()

    def value_and_features_grad(run):
        leaf = z.clone().requires_grad_(True)
        return run(leaf, y), leaf.grad

    want, want_grad = value_and_features_grad(step)
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # the module heads' penalty takes autograd.grad
        assert_one_graph(step, z.clone().requires_grad_(True), y)
        got, got_grad = value_and_features_grad(torch.compile(step, fullgraph=True))
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    torch.testing.assert_close(got_grad, want_grad, **TOL[torch.float64])


def test_resample_step_under_compile_breaks_the_graph_and_keeps_eagers_draws():
    """resample="step" draws from a torch.Generator, which dynamo does not trace (README): the compiled forward
    breaks the graph around the draw but draws as eager does, step after step."""
    models = [Model(HEADS["linear"], "torch", torch.float64, resample="step") for _ in range(2)]
    data = batch(torch.float64)
    assert torch._dynamo.explain(models[1].loss)(*data).graph_break_count > 0
    models[1].dummy.load_state_dict(models[0].dummy.state_dict())  # explain drew once: start both alike
    compiled = torch.compile(models[1].loss)
    for _ in range(3):
        torch.testing.assert_close(compiled(*data), models[0].loss(*data), rtol=1e-12, atol=0)
        assert torch.equal(models[1].dummy.weight, models[0].dummy.weight)


def task_losses(model, x, y_class, y_value):
    """``[2]``: each task's loss plus half its share of the DGR penalty (what AdaTask takes per task)."""
    z = model.encoder(x)
    task = torch.stack([nn.functional.cross_entropy(model.heads[0](z), y_class),
                        nn.functional.mse_loss(model.heads[1](z), y_value)])
    return task + 0.5 * model.dummy.per_task(z, [y_class, y_value])


@pytest.mark.parametrize("backend", ("torch", "cpp"))
def test_adatask_backward_through_a_compiled_forward(backend):
    """AdaTask.backward takes K gradients through one graph (retain_graph): inductor's compiled backward must then
    donate no buffer (``torch._functorch.config.donated_buffer = False``, as the README says); with that, two
    compiled steps give eager's parameters."""
    from dgr_fast import AdaTask

    needs(backend)
    dtype = torch.float64
    models = [Model(HEADS["linear"], backend, dtype) for _ in range(2)]
    opts = [AdaTask(list(m.encoder.parameters()), num_tasks=2, task_params=list(m.heads.parameters()), lr=1e-2)
            for m in models]
    compiled = torch._functorch.config.patch(donated_buffer=False)(
        torch.compile(lambda *data: task_losses(models[1], *data), fullgraph=True))
    for step in range(2):
        data = batch(dtype)
        for losses, opt in ((task_losses(models[0], *data), opts[0]), (compiled(*data), opts[1])):
            opt.backward(losses)
            opt.step()
            opt.zero_grad()
    for (name, want), got in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=name)


# ---------------------------------------------------------------------------------------------------------------
# torch.func


def fp64_case(seed=0):
    return make_case((4, 6, 3), dtype=torch.float64, seed=seed)


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_func_grad_is_autograds(backend):
    case = fp64_case()
    f = penalty_fn(case, backend)
    _, want = value_and_grad(f, case["features"], case["targets"])
    got = torch.func.grad(f)(case["features"], *case["targets"])
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def problem_batch(count=3):
    """``count`` problems of the same sizes and heads (``make_case``'s of another seed each), stacked: features,
    targets and masks get a leading problem dim."""
    cases = [fp64_case(seed) for seed in range(count)]
    stacked = {key: torch.stack([c[key] for c in cases]) for key in ("features",)}
    stacked["targets"] = [torch.stack([c["targets"][k] for c in cases]) for k in range(4)]
    stacked["masks"] = [None if m is None else torch.stack([c["masks"][k] for c in cases])
                        for k, m in enumerate(cases[0]["masks"])]
    return cases, stacked


def per_problem(case0: dict, backend: str):
    """``f(features, targets, masks)`` for one problem, the heads of ``case0`` (the same for every problem)."""
    def f(features, targets, masks):
        return dgr_penalty(features, case0["weights"], case0["biases"], targets, case0["losses"], masks=masks,
                           ignore_index=case0["ignore_index"], backend=backend, task_weights=[1.0, 0.5, 2.0, 1.5])
    return f


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_vmap_gives_each_problems_penalty_and_gradient(backend):
    cases, stacked = problem_batch()
    # make_case draws the heads from the seed: take problem 0's heads for all, with each problem's data.
    for c in cases:
        c.update(weights=cases[0]["weights"], biases=cases[0]["biases"])
    f = per_problem(cases[0], backend)
    args = (stacked["features"], stacked["targets"], stacked["masks"])
    dims = (0, 0, [None if m is None else 0 for m in stacked["masks"]])  # vmap takes no dim of a missing mask
    want = [value_and_grad(lambda z, *t, c=c: f(z, list(t), c["masks"]), c["features"], c["targets"]) for c in cases]
    torch.testing.assert_close(torch.func.vmap(f, in_dims=dims)(*args), torch.stack([v for v, _ in want]),
                               rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(f), in_dims=dims)(*args),
                               torch.stack([g for _, g in want]), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_vmap_over_features_only(backend):
    """Per-sample: a batch of feature tensors against one set of targets."""
    case = fp64_case()
    f = penalty_fn(case, backend)
    shifted = torch.stack([case["features"] + 0.1 * i for i in range(3)])
    want = torch.stack([f(z, *case["targets"]) for z in shifted])
    got = torch.func.vmap(f, in_dims=(0, *[None] * 4))(shifted, *case["targets"])
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_jvp_is_the_directional_derivative(backend):
    case = fp64_case()
    f = penalty_fn(case, backend)
    value, grad = value_and_grad(f, case["features"], case["targets"])
    tangent = torch.randn(case["features"].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got_value, got_tangent = torch.func.jvp(lambda z: f(z, *case["targets"]), (case["features"],), (tangent,))
    torch.testing.assert_close(got_value, value, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_tangent, (grad * tangent).sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_forward_over_reverse_hessian_vector_product(backend):
    """``jvp(grad(f))`` against autograd's double backward."""
    case = fp64_case()
    f = penalty_fn(case, backend)
    tangent = torch.randn(case["features"].shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    z = case["features"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(z, *case["targets"]), z, create_graph=True)
    (want,) = torch.autograd.grad((g * tangent).sum(), z)
    _, got = torch.func.jvp(lambda x: torch.func.grad(f)(x, *case["targets"]), (case["features"],), (tangent,))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_a_transform_inside_a_compiled_function_on_a_named_backend(backend):
    """torch.compile(torch.func.grad(f)): dynamo runs the transform itself, which dgr_penalty cannot see, so the
    backend must be named (README); named, the compiled gradient is eager's."""
    case = fp64_case()
    f = penalty_fn(case, backend)
    want = torch.func.grad(f)(case["features"], *case["targets"])
    got = torch.compile(torch.func.grad(f), fullgraph=True)(case["features"], *case["targets"])
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def transforms(f, case):
    z, targets = case["features"], case["targets"]
    return {
        "grad": lambda: torch.func.grad(f)(z, *targets),
        "vmap": lambda: torch.func.vmap(f, in_dims=(0, *[None] * 4))(z[None], *targets),
        "jvp": lambda: torch.func.jvp(lambda x: f(x, *targets), (z,), (z,)),
    }


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_backends_refuse_transforms_naming_the_ones_that_work(backend, transform):
    needs(backend)
    case = on_device(fp64_case(), backend)
    with pytest.raises(RuntimeError, match=rf"dgr_penalty\(backend='{backend}'\) \(backend=\) does not support "
                                           r"torch.func transforms .*use backend='torch' \(or backend='reference'\)"):
        transforms(penalty_fn(case, backend), case)[transform]()


def test_backend_from_the_environment_is_named_in_the_refusal(monkeypatch):
    needs("cpp")
    monkeypatch.setenv(ENV_VAR, "cpp")
    case = fp64_case()
    with pytest.raises(RuntimeError, match=rf"backend='cpp'\) \(\${ENV_VAR}\) does not support torch.func"):
        transforms(penalty_fn(case, None), case)["grad"]()


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp"])
def test_automatic_choice_under_a_transform_is_the_torch_backends(transform, monkeypatch):
    needs("cpp")
    monkeypatch.delenv(ENV_VAR, raising=False)
    case = fp64_case()
    assert dgr_penalty_backend("cpu", torch.float64) == "cpp"  # outside a transform the choice is the fused one
    got, want = (transforms(penalty_fn(case, backend), case)[transform]() for backend in (None, "torch"))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
