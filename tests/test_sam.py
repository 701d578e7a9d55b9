"""TaskSAM: a step equals a hand-written task-based SAM step on a tiny model, rho = 0 reduces to the aggregator,
parameters and BatchNorm statistics come back unchanged, DGR adds exactly lambda dR/dtheta."""

import copy

import pytest
import torch
from torch import nn

from dgr_fast import DummyHeads, DummyTask
from dgr_fast.mtl import CAGrad, MGDA, PCGrad, Sum, TaskSAM
from dgr_fast.mtl.sam import frozen_batchnorm_stats

K, D_IN, D, N = 3, 5, 4, 7


class Tiny(nn.Module):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(D_IN, D)] + ([nn.BatchNorm1d(D)] if batchnorm else []) + [nn.Tanh()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(D, 2) for _ in range(K))

    def forward(self, x):
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


def make(batchnorm: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny(batchnorm).double()
    x = torch.randn(N, D_IN, dtype=torch.float64)
    ys = [torch.randn(N, 2, dtype=torch.float64) for _ in range(K)]
    return model, x, ys


def closure_for(model, x, ys, with_features=False):
    def closure():
        z, outs = model(x)
        losses = [((o - y) ** 2).mean() for o, y in zip(outs, ys)]
        return (losses, z) if with_features else losses
    return closure


def sam_of(model, aggregator, rho, adaptive, **kwargs):
    shared = list(model.encoder.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    opt = torch.optim.SGD(shared + [p for h in heads for p in h], lr=0.0)
    return TaskSAM(model, shared, heads, opt, aggregator=aggregator, rho=rho, adaptive=adaptive, **kwargs)


def hand_grads(model, x, ys, rho, adaptive):
    """Task-based SAM's gradients written out with torch.func on a copy of the model: stage 1's and stage 2's
    shared ``[K, P]`` and each head's stage-2 gradients. ``model(x)`` returns ``(features, [K outputs])``, its
    parameters named ``encoder.*`` and ``heads.<k>.*``; the losses are mean squared errors."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    shared_names = [n for n in params if n.startswith("encoder.")]

    def loss_k(k, p):
        _, outs = torch.func.functional_call(model, p, (x,))
        return ((outs[k] - ys[k]) ** 2).mean()

    def flat(d, names):
        return torch.cat([d[n].reshape(-1) for n in names])

    def perturb(g, w):
        if adaptive:
            return rho * w * w * g / (w * g).norm()
        return rho * g / g.norm()

    G, S, head_grads = [], [], []
    for k in range(K):
        head_names = [n for n in params if n.startswith(f"heads.{k}.")]
        g = torch.func.grad(lambda p: loss_k(k, p))(params)
        moved = dict(params)
        for group in (shared_names, head_names):
            e = perturb(flat(g, group), flat(params, group))
            for n, piece in zip(group, e.split([params[n].numel() for n in group])):
                moved[n] = params[n] + piece.view_as(params[n])
        g_sam = torch.func.grad(lambda p: loss_k(k, p))(moved)
        G.append(flat(g, shared_names))
        S.append(flat(g_sam, shared_names))
        head_grads.append([g_sam[n] for n in head_names])
    return torch.stack(G), torch.stack(S), head_grads


def hand_step(model, x, ys, aggregator_factory, rho, adaptive):
    """Task-based SAM's shared update and head gradients, written out (``hand_grads``)."""
    G, S, head_grads = hand_grads(model, x, ys, rho, adaptive)
    return aggregator_factory()(G) + aggregator_factory()(S - G), head_grads


def grads_after_step(model, sam, closure, **kwargs):
    sam.step(closure, **kwargs)
    shared = torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])
    heads = [[p.grad for p in h.parameters()] for h in model.heads]
    return shared, heads


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("factory", [Sum, lambda: CAGrad(0.4), lambda: PCGrad(torch.Generator().manual_seed(3))],
                         ids=["sum", "cagrad", "pcgrad"])
def test_step_matches_a_hand_written_task_sam_step(adaptive, factory):
    model, x, ys = make(seed=1)
    expected_shared, expected_heads = hand_step(model, x, ys, factory, rho=0.3, adaptive=adaptive)
    before = [p.detach().clone() for p in model.parameters()]
    sam = sam_of(model, factory(), 0.3, adaptive)
    shared, heads = grads_after_step(model, sam, closure_for(model, x, ys))
    torch.testing.assert_close(shared, expected_shared, rtol=1e-10, atol=1e-12)
    for got, want in zip(heads, expected_heads):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for p, b in zip(model.parameters(), before):  # perturb / restore leaves the parameters bit for bit
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("factory", [Sum, MGDA, lambda: CAGrad(0.4)], ids=["sum", "mgda", "cagrad"])
def test_rho_zero_reduces_to_the_aggregator(factory):
    model, x, ys = make(seed=2)
    losses = closure_for(model, x, ys)()
    shared_params = list(model.encoder.parameters())
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared_params, retain_graph=True)])
                     for l in losses])
    head_grads = [torch.autograd.grad(l, list(h.parameters()), retain_graph=True) for l, h in zip(losses, model.heads)]
    shared, heads = grads_after_step(model, sam_of(model, factory(), 0.0, True, aggregator_scale="none"),
                                     closure_for(model, x, ys))
    torch.testing.assert_close(shared, factory()(G), rtol=1e-12, atol=1e-14)
    for got, want in zip(heads, head_grads):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factory, factor", [
    (MGDA, K),  # the MTL-SAM code: param.grad = sum(sol_h h + sol_g g) * N_TASKS
    (lambda: CAGrad(0.4), 1),  # its CAGrad update is set as computed (mean scale, / (1 + c^2))
    (lambda: PCGrad(torch.Generator().manual_seed(3), reduction="mean"), K),  # its PCGrad sums
], ids=["mgda", "cagrad", "pcgrad_mean"])
def test_default_scale_is_the_mtl_sam_authors(factory, factor):
    model, x, ys = make(seed=4)
    expected_shared, _ = hand_step(model, x, ys, factory, rho=0.3, adaptive=True)
    shared, _ = grads_after_step(model, sam_of(model, factory(), 0.3, True), closure_for(model, x, ys))
    torch.testing.assert_close(shared, factor * expected_shared, rtol=1e-10, atol=1e-12)


def test_batchnorm_statistics_only_see_the_unperturbed_forward():
    model, x, ys = make(batchnorm=True, seed=3)
    reference = copy.deepcopy(model)
    reference(x)  # stage 1's forward
    sam_of(model, Sum(), 0.5, True).step(closure_for(model, x, ys))
    bn, ref_bn = model.encoder[1], reference.encoder[1]
    assert torch.equal(bn.running_mean, ref_bn.running_mean)
    assert torch.equal(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_frozen_batchnorm_stats_restores_every_statistic():
    model, x, _ = make(batchnorm=True, seed=4)
    model.encoder[1].momentum = None  # cumulative average: momentum = 0 would not freeze it
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}
    with frozen_batchnorm_stats(model):
        model(x)
        model(2 * x)
        assert not torch.equal(model.encoder[1].running_mean, before["encoder.1.running_mean"])
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)


def test_dgr_adds_lambda_times_the_penalty_gradient_at_the_unperturbed_point():
    model, x, ys = make(seed=5)
    dummy = DummyHeads(D, [DummyTask("mse", 2)] * K, seed=0, dtype=torch.float64)
    targets = [torch.randn(N, 2, dtype=torch.float64) for _ in range(K)]
    z, _ = model(x)
    penalty = dummy(z, targets)
    dR = torch.cat([g.reshape(-1) for g in torch.autograd.grad(penalty, list(model.encoder.parameters()))])
    closure = closure_for(model, x, ys, with_features=True)
    base, base_heads = grads_after_step(model, sam_of(model, Sum(), 0.3, True, dummy_heads=dummy, dgr_lambda=0.0),
                                        closure)
    with_dgr, heads = grads_after_step(model, sam_of(model, Sum(), 0.3, True, dummy_heads=dummy, dgr_lambda=0.5),
                                       closure, dgr_targets=targets)
    torch.testing.assert_close(with_dgr - base, 0.5 * dR, rtol=1e-10, atol=1e-12)
    for got, want in zip(heads, base_heads):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_bad_arguments_are_refused():
    model, x, ys = make()
    shared = list(model.encoder.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        TaskSAM(model, shared, heads, opt, rho=-1.0)
    with pytest.raises(TypeError, match="aggregator"):
        TaskSAM(model, shared, heads, opt, aggregator=torch.mean)
    with pytest.raises(ValueError, match="disjoint"):
        TaskSAM(model, shared, [shared] + heads[1:], opt)
    with pytest.raises(ValueError, match="head_params"):
        TaskSAM(model, shared, [], opt)
    with pytest.raises(TypeError, match="model"):
        TaskSAM(shared, shared, heads, opt)
    sam = TaskSAM(model, shared, heads[:2], opt)
    with pytest.raises(ValueError, match="3 losses"):
        sam.step(closure_for(model, x, ys))
    dummy = DummyHeads(D, [DummyTask("mse", 2)] * K, seed=0, dtype=torch.float64)
    sam = TaskSAM(model, shared, heads, opt, dummy_heads=dummy, dgr_lambda=0.1)
    with pytest.raises(ValueError, match="features"):
        sam.step(closure_for(model, x, ys))
    with pytest.raises(ValueError, match="dgr_targets"):
        sam.step(closure_for(model, x, ys, with_features=True))
