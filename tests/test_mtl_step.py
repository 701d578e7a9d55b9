"""MTLStep: each composition equals the step written by hand on a tiny model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgr_fast import AdaTask, DummyHeads, DummyTask
from dgr_fast.mtl.aggregators import IMTLG, MGDA, CAGrad, GradDrop, Mean, NashMTL, PCGrad, Sum
from dgr_fast.mtl.step import MTLStep
from dgr_fast.mtl.weightings import DWA, EqualWeighting, UncertaintyWeighting

TASKS = [DummyTask("ce", 3), DummyTask("mse", 1), DummyTask("bce", 2)]


def tiny(seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh()).double()
    heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 1), nn.Linear(8, 2)]).double()
    x = torch.randn(13, 5, dtype=torch.float64)
    targets = [torch.randint(0, 3, (13,)), torch.randn(13, 1, dtype=torch.float64), torch.rand(13, 2, dtype=torch.float64)]
    dummy = DummyHeads(8, TASKS, seed=seed, dtype=torch.float64)
    return encoder, heads, x, targets, dummy


def forward(encoder, heads, x, targets):
    z = encoder(x)
    out = [h(z) for h in heads]
    losses = [F.cross_entropy(out[0], targets[0]), F.mse_loss(out[1], targets[1]), F.binary_cross_entropy_with_logits(out[2], targets[2])]
    return z, losses


def grads(params):
    return [p.grad.clone() for p in params]


def frozen_sgd(params):
    return torch.optim.SGD(params, lr=0.0)  # keeps the parameters, so .grad can be compared after step()


@pytest.mark.parametrize("weighting", [EqualWeighting(), UncertaintyWeighting(3, init=0.3)])
def test_weighting_with_dgr_is_one_backward_of_the_total(weighting):
    encoder, heads, x, targets, dummy = tiny()
    params = [*encoder.parameters(), *heads.parameters(), *weighting.parameters()]
    step = MTLStep(list(encoder.parameters()), list(heads.parameters()), frozen_sgd(params), weighting=weighting, dummy_heads=dummy, dgr_lambda=0.3)
    z, losses = forward(encoder, heads, x, targets)
    info = step.step(losses, features=z, dgr_targets=targets)
    got = grads(params)
    for p in params:
        p.grad = None
    z, losses = forward(encoder, heads, x, targets)
    (weighting(torch.stack(losses)) + 0.3 * dummy(z, targets)).backward()
    for a, b in zip(got, grads(params)):
        torch.testing.assert_close(a, b)
    assert info["penalty"] > 0


def per_task_matrix(losses, shared):
    return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                        for loss in losses])


def authors_dgr_step(encoder, heads, x, targets, dummy, lam, method):
    """A hand-written copy of the DGR authors' step (LearningUnivforMTL, DGR_train.py) for a gradient method: one
    backward per task with the heads' gradients accumulating, the method on the per-task gradients of the shared
    parameters in its mean form, ``overwrite_grad`` (times K) for pcgrad / graddrop / cagrad, the gradient set as
    computed for imtl, then ``param.grad += lambda * dR/dtheta``. The solvers are the library's (the authors' SLSQP
    and Frank-Wolfe solve the same problems approximately); the trainer logic is theirs."""
    shared, head_params = list(encoder.parameters()), list(heads.parameters())
    z, losses = forward(encoder, heads, x, targets)
    K = len(losses)
    G = per_task_matrix(losses, shared)
    mean_form = {"pcgrad": lambda: PCGrad(torch.Generator().manual_seed(5), reduction="mean"),
                 "graddrop": lambda: GradDrop(generator=torch.Generator().manual_seed(5), reduction="mean"),
                 "cagrad": lambda: CAGrad(0.4), "imtl": IMTLG}[method]()
    g = mean_form(G)
    if method != "imtl":
        g = g * K  # overwrite_grad: "to match the sum loss"
    dr = torch.autograd.grad(lam * dummy(z, targets), shared, retain_graph=True)
    want_shared = [u.view_as(p) + d for u, p, d in zip(g.split([p.numel() for p in shared]), shared, dr)]
    return want_shared + list(torch.autograd.grad(sum(losses), head_params))


LIBRARY = {"pcgrad": lambda: PCGrad(torch.Generator().manual_seed(5)),
           "graddrop": lambda: GradDrop(generator=torch.Generator().manual_seed(5)),
           "cagrad": lambda: CAGrad(0.4), "imtl": IMTLG}


@pytest.mark.parametrize("method", sorted(LIBRARY))
@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
def test_aggregator_with_dgr_is_the_authors_step(method, grad_mode):
    """The default scale ("authors"): DGR's gradient is added to the update at the scale the DGR code gives it;
    for CAGrad that is K times its mean-scaled direction (DGR was K times too strong relative to CAGrad before)."""
    encoder, heads, x, targets, dummy = tiny(1)
    shared, head_params = list(encoder.parameters()), list(heads.parameters())
    step = MTLStep(shared, head_params, frozen_sgd(shared + head_params), aggregator=LIBRARY[method](),
                   dummy_heads=dummy, dgr_lambda=0.7, grad_mode=grad_mode)
    z, losses = forward(encoder, heads, x, targets)
    step.step(losses, features=z, dgr_targets=targets)
    got = grads(shared) + grads(head_params)
    want = authors_dgr_step(encoder, heads, x, targets, dummy, 0.7, method)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# What each named scale multiplies the update by, K = 3 tasks: the DGR code's overwrite_grad (x K after the mean-scaled
# pcgrad, graddrop, cagrad; imtl and nash-mtl as computed) and the MTL-SAM code's K for MGDA.
K = 3
FACTORS = {  # aggregator: (authors, sum, none)
    "mean": (K, K, 1), "sum": (1, 1, 1), "pcgrad": (1, 1, 1), "pcgrad_mean": (K, K, 1), "graddrop": (1, 1, 1),
    "cagrad": (K, K, 1), "imtl": (1, K, 1), "mgda": (K, K, 1), "nashmtl": (1, 1, 1),
}
AGGREGATORS = {
    "mean": Mean, "sum": Sum, "pcgrad": lambda: PCGrad(torch.Generator().manual_seed(5)),
    "pcgrad_mean": lambda: PCGrad(torch.Generator().manual_seed(5), reduction="mean"),
    "graddrop": lambda: GradDrop(generator=torch.Generator().manual_seed(5)), "cagrad": lambda: CAGrad(0.4),
    "imtl": IMTLG, "mgda": MGDA, "nashmtl": NashMTL,
}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("scale", ["authors", "sum", "none", 2.5])
def test_aggregator_scale_options(name, scale):
    encoder, heads, x, targets, dummy = tiny(6)
    shared, head_params = list(encoder.parameters()), list(heads.parameters())
    step = MTLStep(shared, head_params, frozen_sgd(shared + head_params), aggregator=AGGREGATORS[name](),
                   dummy_heads=dummy, dgr_lambda=0.4, aggregator_scale=scale)
    z, losses = forward(encoder, heads, x, targets)
    step.step(losses, features=z, dgr_targets=targets)
    got = grads(shared)
    factor = scale if isinstance(scale, float) else FACTORS[name][("authors", "sum", "none").index(scale)]
    z, losses = forward(encoder, heads, x, targets)
    update = AGGREGATORS[name]()(per_task_matrix(losses, shared), torch.stack(losses).detach())
    dr = torch.autograd.grad(0.4 * dummy(z, targets), shared)
    for a, u, p, d in zip(got, update.split([p.numel() for p in shared]), shared, dr):
        torch.testing.assert_close(a, factor * u.view_as(p) + d)


@pytest.mark.parametrize("scale", ["mean", 0.0, -1.0, float("inf"), True])
def test_bad_aggregator_scale(scale):
    encoder, heads, *_ = tiny(7)
    shared, head_params = list(encoder.parameters()), list(heads.parameters())
    with pytest.raises(ValueError, match="aggregator_scale"):
        MTLStep(shared, head_params, frozen_sgd(shared + head_params), aggregator=Mean(), aggregator_scale=scale)


def test_dgr_adds_exactly_lambda_dr_dtheta():
    results = []
    for lam in (0.0, 0.5):
        encoder, heads, x, targets, dummy = tiny(2)
        shared = list(encoder.parameters())
        step = MTLStep(shared, list(heads.parameters()), frozen_sgd(shared + list(heads.parameters())), aggregator=IMTLG(), dummy_heads=dummy, dgr_lambda=lam)
        z, losses = forward(encoder, heads, x, targets)
        step.step(losses, features=z, dgr_targets=targets)
        results.append(grads(shared))
    encoder, heads, x, targets, dummy = tiny(2)
    z, _ = forward(encoder, heads, x, targets)
    dr = torch.autograd.grad(dummy(z, targets), list(encoder.parameters()))
    for without, with_, d in zip(*results, dr):
        torch.testing.assert_close(with_ - without, 0.5 * d)


def test_adatask_takes_each_tasks_share_of_the_penalty():
    encoder, heads, x, targets, dummy = tiny(3)
    shared, head_params = list(encoder.parameters()), list(heads.parameters())
    opt = AdaTask(shared, num_tasks=3, task_params=head_params, lr=1e-2, backend="torch")
    step = MTLStep(shared, head_params, opt, dummy_heads=dummy, dgr_lambda=0.2)
    z, losses = forward(encoder, heads, x, targets)
    step.step(losses, features=z, dgr_targets=targets)
    got = [p.detach().clone() for p in shared + head_params]

    encoder, heads, x, targets, dummy = tiny(3)
    shared, head_params = list(encoder.parameters()), list(heads.parameters())
    opt = AdaTask(shared, num_tasks=3, task_params=head_params, lr=1e-2, backend="torch")
    z, losses = forward(encoder, heads, x, targets)
    opt.zero_grad()
    opt.backward(torch.stack(losses) + 0.2 * dummy.per_task(z, targets))
    opt.step()
    for a, b in zip(got, shared + head_params):
        torch.testing.assert_close(a, b.detach())


def test_dwa_weights_are_recorded_once_per_step():
    encoder, heads, x, targets, dummy = tiny(4)
    dwa = DWA()
    params = [*encoder.parameters(), *heads.parameters()]
    step = MTLStep(list(encoder.parameters()), list(heads.parameters()), torch.optim.SGD(params, lr=0.01), weighting=dwa)
    for _ in range(3):
        _, losses = forward(encoder, heads, x, targets)
        step.step(losses)
    assert dwa._epoch_batches == 3


def test_bad_arguments():
    encoder, heads, x, targets, dummy = tiny(5)
    shared, head_params = list(encoder.parameters()), list(heads.parameters())
    opt = frozen_sgd(shared + head_params)
    with pytest.raises(ValueError, match="not both"):
        MTLStep(shared, head_params, opt, weighting=EqualWeighting(), aggregator=Mean())
    with pytest.raises(ValueError, match="no aggregator"):
        MTLStep(shared, head_params, AdaTask(shared, num_tasks=3), aggregator=Mean())
    with pytest.raises(ValueError, match="grad_mode"):
        MTLStep(shared, head_params, opt, grad_mode="vmap")
    with pytest.raises(ValueError, match="dgr_lambda"):
        MTLStep(shared, head_params, opt, dgr_lambda=-1.0)
    step = MTLStep(shared, head_params, opt, dummy_heads=dummy, dgr_lambda=0.1)
    _, losses = forward(encoder, heads, x, targets)
    with pytest.raises(ValueError, match="features= and dgr_targets="):
        step.step(losses)


def test_adatask_and_dummy_heads_must_agree_on_the_tasks():
    encoder, heads, x, targets, _ = tiny(8)
    shared, head_params = list(encoder.parameters()), list(heads.parameters())
    two = DummyHeads(8, TASKS[:2], seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="dummy_heads has 2 tasks but the AdaTask optimizer 3"):
        MTLStep(shared, head_params, AdaTask(shared, num_tasks=3), dummy_heads=two, dgr_lambda=0.1)
    step = MTLStep(shared, head_params, frozen_sgd(shared + head_params), dummy_heads=two, dgr_lambda=0.1)
    z, losses = forward(encoder, heads, x, targets)
    with pytest.raises(ValueError, match="3 task losses but dummy_heads has 2"):
        step.step(losses, features=z, dgr_targets=targets[:2])


def test_adatask_backward_accumulates_micro_batches():
    """MTLStep.backward adds to the per-task gradients of earlier micro-batches (AdaTask refuses that unless asked)."""
    torch.manual_seed(5)
    encoder, heads = nn.Linear(5, 4).double(), nn.ModuleList(nn.Linear(4, 1) for _ in range(2)).double()
    x, ys = torch.randn(6, 5, dtype=torch.float64), torch.randn(2, 6, 1, dtype=torch.float64)

    def losses(rows):
        z = encoder(x[rows])
        return [F.mse_loss(h(z), y[rows]) for h, y in zip(heads, ys)]

    params = list(heads.parameters())
    results = []
    for batches in ([slice(0, 6)], [slice(0, 3), slice(3, 6)]):
        start = [p.detach().clone() for p in [*encoder.parameters(), *params]]
        step = MTLStep(list(encoder.parameters()), params, AdaTask(list(encoder.parameters()), 2, lr=0.1,
                                                                  task_params=params))
        for rows in batches:
            step.backward([loss / len(batches) for loss in losses(rows)])
        step.step()
        results.append([p.detach().clone() for p in encoder.parameters()])
        with torch.no_grad():
            for p, e in zip([*encoder.parameters(), *params], start):
                p.copy_(e)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-14)
