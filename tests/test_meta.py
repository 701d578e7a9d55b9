"""MetaMTL: alpha = 0 is the summed gradient; first- and second-order steps equal hand-written ones on a tiny model;
the parameters are untouched by the inner/outer evaluations and BatchNorm statistics see the inner forward only."""

import copy

import pytest
import torch
from torch import nn

from dgr_fast.mtl import MetaMTL

K, D_IN, D, N = 3, 5, 4, 6


class Tiny(nn.Module):
    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        layers = [nn.Linear(D_IN, D)] + ([nn.BatchNorm1d(D)] if batchnorm else []) + [nn.Tanh(), nn.Linear(D, D)]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(D, 2) for _ in range(K))

    def forward(self, x):
        z = torch.tanh(self.encoder(x))
        return [head(z) for head in self.heads]


def criterion(outputs, targets):
    return torch.stack([((o - y) ** 2).mean() for o, y in zip(outputs, targets)])


def make(batchnorm: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny(batchnorm).double()
    batches = [(torch.randn(N, D_IN, dtype=torch.float64), [torch.randn(N, 2, dtype=torch.float64) for _ in range(K)])
               for _ in range(2)]
    return model, batches[0], batches[1]


def meta_of(model, alpha, second_order=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return MetaMTL(model, list(model.encoder.parameters()), criterion, opt, alpha=alpha, second_order=second_order)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def hand_grads(model, inner, outer, alpha, second_order):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    shared = [n for n in params if n.startswith("encoder.")]

    def losses(p, batch):
        return criterion(torch.func.functional_call(model, p, (batch[0],)), batch[1])

    def meta_objective(theta):
        total = 0.0
        for k in range(K):
            g = torch.func.grad(lambda t: losses({**params, **t}, inner)[k])(theta)
            if not second_order:
                g = {n: v.detach() for n, v in g.items()}
            adapted = {n: theta[n] - alpha * g[n] for n in shared}
            total = total + losses({**params, **adapted}, outer)[k]
        return total

    expected = torch.func.grad(meta_objective)({n: params[n] for n in shared})
    task = torch.func.grad(lambda p: losses({**params, **p}, inner).sum())(
        {n: v for n, v in params.items() if n not in shared})
    return {**expected, **task}


def test_alpha_zero_is_the_summed_gradient():
    model, batch, _ = make(seed=1)
    reference = copy.deepcopy(model)
    criterion(reference(batch[0]), batch[1]).sum().backward()
    meta_of(model, 0.0).step(batch, batch)
    got = grads_of(model)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("second_order", [False, True], ids=["first-order", "second-order"])
def test_step_matches_a_hand_written_meta_step(second_order):
    model, inner, outer = make(seed=2)
    expected = hand_grads(model, inner, outer, 0.3, second_order)
    before = [p.detach().clone() for p in model.parameters()]
    out = meta_of(model, 0.3, second_order).step(inner, outer)
    got = grads_of(model)
    for n, g in expected.items():
        torch.testing.assert_close(got[n], g, rtol=1e-10, atol=1e-12)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    torch.testing.assert_close(out["inner_losses"], criterion(model(inner[0]), inner[1]).detach())


def test_first_and_second_order_differ_when_alpha_is_positive():
    model, inner, outer = make(seed=3)
    meta_of(model, 0.5).step(inner, outer)
    first = grads_of(model)
    meta_of(model, 0.5, second_order=True).step(inner, outer)
    second = grads_of(model)
    assert not torch.allclose(first["encoder.0.weight"], second["encoder.0.weight"])
    torch.testing.assert_close(first["heads.0.weight"], second["heads.0.weight"], rtol=1e-12, atol=1e-14)


def test_batchnorm_statistics_see_the_inner_forward_only():
    model, inner, outer = make(batchnorm=True, seed=4)
    reference = copy.deepcopy(model)
    reference(inner[0])
    meta_of(model, 0.2).step(inner, outer)
    assert torch.equal(model.encoder[1].running_mean, reference.encoder[1].running_mean)
    assert torch.equal(model.encoder[1].running_var, reference.encoder[1].running_var)


def test_bad_arguments_are_refused():
    model, inner, outer = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shared = list(model.encoder.parameters())
    with pytest.raises(ValueError, match="alpha"):
        MetaMTL(model, shared, criterion, opt, alpha=-0.1)
    with pytest.raises(ValueError, match="not parameters of model"):
        MetaMTL(model, [nn.Parameter(torch.ones(2))], criterion, opt, alpha=0.1)
    with pytest.raises(ValueError, match="shared_params"):
        MetaMTL(model, [], criterion, opt, alpha=0.1)
    with pytest.raises(TypeError, match="criterion"):
        MetaMTL(model, shared, None, opt, alpha=0.1)
    bad = MetaMTL(model, shared, lambda o, t: torch.ones(2, 2), opt, alpha=0.1)
    with pytest.raises(ValueError, match="criterion"):
        bad.step(inner, outer)
