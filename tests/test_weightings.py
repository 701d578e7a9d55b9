"""Loss weightings: hand computations of DWA over several epochs, uncertainty weighting's gradients, RLW's
distribution and seeding, and the shared interface."""

import math

import pytest
import torch

from dgr_fast.mtl import DWA, RLW, EqualWeighting, UncertaintyWeighting
from dgr_fast.mtl.weightings import Weighting


def test_equal_weighting_sums_the_losses():
    losses = torch.tensor([0.3, 1.7, 2.2], requires_grad=True)
    total = EqualWeighting()(losses)
    assert torch.equal(total, losses.sum())
    total.backward()
    assert torch.equal(losses.grad, torch.ones(3))
    assert torch.equal(EqualWeighting().weights(losses), torch.ones(3))


def test_dwa_matches_a_hand_computation_over_several_epochs():
    batches = [  # epoch -> per-batch losses of 3 tasks
        [[2.0, 1.0, 4.0], [1.0, 3.0, 2.0]],
        [[1.0, 1.0, 3.0], [2.0, 1.0, 2.0], [0.0, 1.0, 1.0]],
        [[1.0, 0.5, 1.0], [1.0, 1.5, 3.0]],
        [[0.5, 0.5, 0.5]],
        [[1.0, 1.0, 1.0]],
    ]
    T = 2.0
    averages = [[sum(b[k] for b in epoch) / len(epoch) for k in range(3)] for epoch in batches]
    dwa = DWA(temperature=T)
    for e, epoch in enumerate(batches):
        if e < 2:
            expected = [1.0, 1.0, 1.0]
        else:
            ratios = [averages[e - 1][k] / averages[e - 2][k] for k in range(3)]
            exps = [math.exp(r / T) for r in ratios]
            expected = [3 * x / sum(exps) for x in exps]
        for batch in epoch:
            losses = torch.tensor(batch, dtype=torch.float64, requires_grad=True)
            total = dwa(losses)
            torch.testing.assert_close(total, sum(w * l for w, l in zip(expected, batch)) * torch.ones((),
                                       dtype=torch.float64), rtol=1e-14, atol=0)
            total.backward()
            torch.testing.assert_close(losses.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
        assert dwa.epoch == e
        dwa.end_epoch()


def test_dwa_weights_follow_the_losses_device_and_dtype_and_sum_to_k():
    dwa = DWA()
    for avg in ([1.0, 2.0], [2.0, 1.0]):
        dwa.weights(torch.tensor(avg))
        dwa.end_epoch()
    w = dwa.weights(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert w.dtype == torch.float64
    torch.testing.assert_close(w.sum(), torch.tensor(2.0, dtype=torch.float64))
    assert w[0] > w[1]  # task 0's loss rose (ratio 2), task 1's fell (ratio 1/2)
    torch.testing.assert_close(w, 2 * torch.softmax(torch.tensor([2.0, 0.5], dtype=torch.float64) / 2, 0))


def test_dwa_state_survives_a_state_dict_round_trip():
    a = DWA(temperature=1.5)
    for epoch in ([1.0, 3.0], [2.0, 1.0], [0.5, 0.5]):
        a(torch.tensor(epoch))
        a.end_epoch()
    a(torch.tensor([9.0, 1.0]))  # a half-finished epoch
    b = DWA(temperature=1.5)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 3
    for weighting in (a, b):
        weighting.end_epoch()
    probe = torch.tensor([1.0, 1.0])
    assert torch.equal(a.weights(probe), b.weights(probe))


def test_dwa_refuses_misuse():
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)
    dwa = DWA()
    with pytest.raises(RuntimeError, match="no losses"):
        dwa.end_epoch()
    dwa(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="losses"):
        dwa(torch.tensor([1.0, 2.0, 3.0]))
    dwa(torch.tensor([-1.0, -2.0]))
    with pytest.raises(ValueError, match="positive"):
        dwa.end_epoch()


def test_uncertainty_weighting_gradients():
    s0 = torch.tensor([0.3, -0.7, 1.1])
    uw = UncertaintyWeighting(3)
    with torch.no_grad():
        uw.log_vars.copy_(s0)
    losses = torch.tensor([0.5, 2.0, 1.5], requires_grad=True)
    total = uw(losses)
    torch.testing.assert_close(total, (0.5 * torch.exp(-s0) * losses + 0.5 * s0).sum())
    total.backward()
    # d/ds_k = 0.5 - 0.5 exp(-s_k) L_k,   d/dL_k = 0.5 exp(-s_k)
    torch.testing.assert_close(uw.log_vars.grad, 0.5 - 0.5 * torch.exp(-s0) * losses.detach())
    torch.testing.assert_close(losses.grad, 0.5 * torch.exp(-s0))
    torch.testing.assert_close(uw.weights(losses), 0.5 * torch.exp(-s0))


def test_uncertainty_weighting_is_stationary_at_the_log_losses():
    losses = torch.tensor([0.25, 1.0, 4.0])
    uw = UncertaintyWeighting(3, init=0.0)
    with torch.no_grad():
        uw.log_vars.copy_(losses.log())
    uw(losses).backward()
    torch.testing.assert_close(uw.log_vars.grad, torch.zeros(3), atol=1e-7, rtol=0)


def test_uncertainty_weighting_trains_with_an_optimizer_and_accepts_a_list_of_losses():
    uw = UncertaintyWeighting(2, init=-0.7)
    assert torch.equal(uw.log_vars.detach(), torch.full((2,), -0.7))
    opt = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        uw([torch.tensor(2.0), torch.tensor(0.5)]).backward()
        opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), torch.tensor([2.0, 0.5]).log(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="num_tasks"):
        uw(torch.ones(3))
    with pytest.raises(ValueError, match="num_tasks"):
        UncertaintyWeighting(0)
    with pytest.raises(ValueError, match="init"):
        UncertaintyWeighting(2, init=math.nan)


def test_rlw_weights_are_a_seeded_softmax_of_a_standard_normal_draw():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    rlw = RLW(torch.Generator().manual_seed(5))
    reference = torch.Generator().manual_seed(5)
    for _ in range(3):
        w = rlw.weights(losses)
        assert w.dtype == torch.float64 and bool((w > 0).all())
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(w, torch.softmax(torch.randn(4, generator=reference), 0).double())
    again = RLW(torch.Generator().manual_seed(5))
    first = again.weights(losses)
    torch.testing.assert_close(first, RLW(torch.Generator().manual_seed(5)).weights(losses))
    assert not torch.equal(first, again.weights(losses))  # a fresh draw per step


def test_rlw_total_is_the_weighted_sum_and_the_weights_average_to_one_over_k():
    gen = torch.Generator().manual_seed(0)
    rlw = RLW(gen)
    losses = torch.tensor([1.0, 10.0, 100.0], requires_grad=True)
    total = rlw(losses)
    total.backward()
    torch.testing.assert_close(total.detach(), (losses.grad * losses.detach()).sum())
    draws = torch.stack([rlw.weights(torch.ones(3)) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), torch.full((3,), 1 / 3), atol=0.01, rtol=0)


@pytest.mark.parametrize("make", [EqualWeighting, DWA, lambda: UncertaintyWeighting(3), RLW],
                         ids=["equal", "dwa", "uw", "rlw"])
def test_bad_losses_are_refused(make):
    weighting = make()
    assert isinstance(weighting, Weighting)
    with pytest.raises(TypeError, match="losses"):
        weighting([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="losses"):
        weighting(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="losses"):
        weighting(torch.ones(3, 1))
    with pytest.raises(ValueError, match="losses"):
        weighting(torch.ones(0))
    with pytest.raises(ValueError, match="losses"):
        weighting([torch.ones(2), torch.ones(1)])
    with pytest.raises(TypeError, match="losses"):
        weighting([])
    assert weighting([torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]).shape == ()
