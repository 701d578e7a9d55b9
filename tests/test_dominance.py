"""The task-dominance tracker: AU against a direct recomputation from per-task updates (SGD, Adam, AdaTask), the
per-task split of every method's step (TaskSAM's against its stage-2 gradients written out by hand; MTLStep's from
its own per-task gradients, bit for bit as taking them again, with no backward pass of the tracker's), AdaTask's
balance against equal weighting's, and ``dgr-fast train --dominance``."""

from __future__ import annotations

import copy

import pytest
import torch
from test_cli import TINY, run_cli
from test_sam import closure_for, hand_grads
from torch import nn

from dgr_fast import DummyHeads, DummyTask
from dgr_fast.cli import main
from dgr_fast.mtl import CAGrad, MGDA, MTLStep, PCGrad, GradDrop, Sum, TaskSAM, make_method
from dgr_fast.mtl.dominance import TaskDominance, _same_draws, aggregator_parts, layer_of
from dgr_fast.mtl.grads import per_task_grads
from dgr_fast.mtl.weightings import RLW, UncertaintyWeighting
from dgr_fast.optim.adatask import AdaTask

K = 3
SHAPES = [(7, 5), (5,), (3, 2, 3)]  # odd sizes; the first two form layer "l0", the last layer "l1"
NAMES = ["l0.weight", "l0.bias", "l1.weight"]
BETA = 0.9


def shared_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in SHAPES]


def task_parts(step: int, scales=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """Fresh random per-task gradient parts ``[K, P]`` for a step."""
    g = torch.Generator().manual_seed(100 + step)
    P = sum(torch.Size(s).numel() for s in SHAPES)
    return torch.randn(K, P, generator=g, dtype=torch.float64) * torch.tensor(scales, dtype=torch.float64)[:, None]


def set_grads(params, flat: torch.Tensor) -> None:
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def steps_alone(alone: list[list[torch.Tensor]], opts: list[torch.optim.Optimizer],
                c: torch.Tensor) -> torch.Tensor:
    """``[K, P]``: row k the step ``opts[k]`` takes on its own copy ``alone[k]`` of the parameters given ``c[k]``."""
    rows = []
    for params, opt, part in zip(alone, opts, c):
        before = torch.cat([p.detach().reshape(-1) for p in params])
        set_grads(params, part)
        opt.step()
        rows.append(torch.cat([p.detach().reshape(-1) for p in params]) - before)
    return torch.stack(rows)


def ema_of_squares(updates: list[torch.Tensor]) -> torch.Tensor:
    """AU by its definition: AU <- beta AU + (1 - beta) u^2, from zero."""
    au = torch.zeros_like(updates[0])
    for u in updates:
        au = BETA * au + (1 - BETA) * u * u
    return au


def check_levels(tracker: TaskDominance, au: torch.Tensor) -> None:
    """``au [K, P]`` (direct) against the tracker's AU and against its rAU at every level and reduction."""
    sizes = [torch.Size(s).numel() for s in SHAPES]
    direct = dict(zip(NAMES, au.split(sizes, dim=1)))
    for name, shape in zip(NAMES, SHAPES):
        torch.testing.assert_close(tracker.au()[name], direct[name].view(K, *shape), rtol=1e-10, atol=0)
    rel = au / au.sum(0)  # every element has been updated
    for name, shape in zip(NAMES, SHAPES):
        torch.testing.assert_close(tracker.rau("element")[name].double(), rel.split(sizes, dim=1)[NAMES.index(name)]
                                   .view(K, *shape), rtol=1e-6, atol=1e-7)
    for layer in ("l0", "l1"):
        cols = torch.cat([rel.split(sizes, dim=1)[i] for i, n in enumerate(NAMES) if layer_of(n) == layer], dim=1)
        sums = torch.cat([direct[n] for n in NAMES if layer_of(n) == layer], dim=1).sum(1)
        torch.testing.assert_close(tracker.rau("layer", "mean")[layer].double(), cols.mean(1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(tracker.rau("layer", "sum")[layer].double(), sums / sums.sum(), rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_shares_are_the_split_first_moment_over_adams_denominator(amsgrad):
    params = shared_params()
    lr, (b1, b2), eps = 3e-2, (0.8, 0.95), 1e-8
    opt = torch.optim.Adam(params, lr=lr, betas=(b1, b2), eps=eps, amsgrad=amsgrad)
    tracker = TaskDominance(zip(NAMES, params), opt, K, beta=BETA)
    P = sum(p.numel() for p in params)
    m = torch.zeros(K, P, dtype=torch.float64)
    v, vmax = torch.zeros(P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)
    updates = []
    for t in range(1, 7):
        c = task_parts(t, scales=(1.0, 10.0, 0.1))
        before = torch.cat([p.detach().reshape(-1) for p in params])
        set_grads(params, c.sum(0))
        opt.step()
        tracker.observe(c)
        m = b1 * m + (1 - b1) * c
        v = b2 * v + (1 - b2) * c.sum(0) ** 2
        vmax = torch.maximum(vmax, v)
        denom = (vmax if amsgrad else v) / (1 - b2**t)
        u = -lr * (m / (1 - b1**t)) / (denom.sqrt() + eps)
        updates.append(u)
        after = torch.cat([p.detach().reshape(-1) for p in params])
        torch.testing.assert_close(u.sum(0), after - before, rtol=1e-9, atol=1e-15)  # the shares are Adam's step
    check_levels(tracker, ema_of_squares(updates))


@pytest.mark.parametrize("nesterov, dampening", [(False, 0.3), (True, 0.0)])
def test_sgd_shares_are_each_tasks_own_sgd_step(nesterov, dampening):
    params = shared_params()
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=nesterov, dampening=dampening)
    tracker = TaskDominance(zip(NAMES, params), opt, K, beta=BETA)
    # SGD is linear: task k's share is the step of an SGD that sees task k's part alone.
    alone = [[p.detach().clone().requires_grad_() for p in params] for _ in range(K)]
    alone_opts = [torch.optim.SGD(a, lr=0.05, momentum=0.9, nesterov=nesterov, dampening=dampening) for a in alone]
    updates = []
    for t in range(1, 7):
        c = task_parts(t)
        set_grads(params, c.sum(0))
        opt.step()
        tracker.observe(c)
        updates.append(steps_alone(alone, alone_opts, c))
    check_levels(tracker, ema_of_squares(updates))


def test_adatask_shares_are_each_tasks_own_adam_step_and_its_own_au():
    params = shared_params()
    opt = AdaTask(params, K, lr=2e-2, betas=(0.85, 0.97), track_au=True, au_beta=BETA)
    tracker = TaskDominance(zip(NAMES, params), opt, K, beta=BETA)
    # AdaTask's per-task moments are independent: task k's share is an Adam that sees task k's gradient alone.
    alone = [[p.detach().clone().requires_grad_() for p in params] for _ in range(K)]
    alone_opts = [torch.optim.Adam(a, lr=2e-2, betas=(0.85, 0.97)) for a in alone]
    updates = []
    for t in range(1, 7):
        c = task_parts(t, scales=(1.0, 100.0, 0.01))
        opt.step(task_grads=c)
        tracker.observe()
        updates.append(steps_alone(alone, alone_opts, c))
    check_levels(tracker, ema_of_squares(updates))
    own = opt.task_dominance()["per_parameter"]  # AdaTask's own AU, summed per tensor in its fused step
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(tracker.rau("tensor", "sum")[name], own[f"shared.{i}"], rtol=1e-5, atol=1e-6)


def test_per_tensor_au_alone_gives_the_same_summed_rau():
    runs = []
    for per_element in (True, False):
        params = shared_params()
        opt = torch.optim.Adam(params, lr=1e-2)
        tracker = TaskDominance(zip(NAMES, params), opt, K, beta=BETA, per_element=per_element)
        for t in range(1, 4):
            c = task_parts(t, scales=(1.0, 3.0, 9.0))
            set_grads(params, c.sum(0))
            opt.step()
            tracker.observe(c)
        runs.append(tracker)
    for level in ("tensor", "layer"):
        a, b = runs[0].rau(level, "sum"), runs[1].rau(level, "sum")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name])
    with pytest.raises(ValueError, match="per_element=True"):
        runs[1].rau("layer", "mean")


class Net(nn.Module):
    def __init__(self, seed: int = 0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(9, 13), nn.Tanh(), nn.Linear(13, 6), nn.Tanh()).to(dtype)
        self.heads = nn.ModuleList([nn.Linear(6, 1).to(dtype) for _ in range(K)])

    def forward(self, x):
        """``(features, [K outputs [N, 1]])``, as TaskSAM's hand-written step in test_sam takes a model."""
        z = self.encoder(x)
        return z, [h(z) for h in self.heads]

    def losses(self, x, y, scales=(1.0, 1.0, 1.0)):
        z = self.encoder(x)
        return [s * ((h(z)[:, 0] - y[:, k]) ** 2).mean() for k, (h, s) in enumerate(zip(self.heads, scales))], z


def batch(step: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(step)
    return torch.randn(17, 9, generator=g, dtype=dtype), torch.randn(17, K, generator=g, dtype=dtype)


@pytest.mark.parametrize("method", ["ew", "uw", "rlw", "pcgrad", "graddrop", "cagrad", "mgda"])
def test_the_split_of_mtlsteps_gradient_sums_to_it(method):
    net = Net()
    shared, heads = list(net.encoder.parameters()), list(net.heads.parameters())
    m = {"uw": UncertaintyWeighting(K).double(), "rlw": RLW(torch.Generator().manual_seed(1)),
         "graddrop": GradDrop(leak=0.3)}.get(method) or make_method(method, K)
    extra = list(m.parameters()) if isinstance(m, nn.Module) else []
    opt = torch.optim.SGD(shared + heads + extra, lr=1e-2)
    kind = {"aggregator": m} if method in ("pcgrad", "graddrop", "cagrad", "mgda") else {"weighting": m}
    step = MTLStep(shared, heads, opt, **kind)
    tracker = TaskDominance(net.encoder.named_parameters(prefix="encoder"), opt, K)
    seen = []
    observe = tracker.observe
    tracker.observe = lambda grads=None: (seen.append(grads), observe(grads))
    for t in range(3):
        x, y = batch(t)
        tracker.step(step, net.losses(x, y, scales=(1.0, 5.0, 0.2))[0])
        torch.testing.assert_close(seen[-1].sum(0), torch.cat([p.grad.reshape(-1) for p in shared]),
                                   rtol=1e-10, atol=1e-12)


def adam_run(aggregator, run) -> tuple[Net, TaskDominance]:
    """Four Adam steps of MTLStep with ``aggregator`` on losses that conflict (one negated, for PCGrad to project),
    each step being ``run(tracker, step, losses)``; the global generator seeded first (GradDrop draws from it)."""
    net = Net()
    shared, heads = list(net.encoder.parameters()), list(net.heads.parameters())
    opt = torch.optim.Adam(shared + heads, lr=1e-2)
    step = MTLStep(shared, heads, opt, aggregator=aggregator)
    tracker = TaskDominance(net.encoder.named_parameters(prefix="encoder"), opt, K)
    torch.manual_seed(5)
    for t in range(4):
        x, y = batch(t)
        run(tracker, step, net.losses(x, y, scales=(1.0, -1.0, 0.5))[0])
    return net, tracker


@pytest.mark.parametrize("aggregator", [PCGrad, GradDrop])
def test_tracking_leaves_a_random_aggregators_training_as_it_was(aggregator):
    nets = [adam_run(aggregator(), lambda tracker, step, losses: step.step(losses))[0],
            adam_run(aggregator(), TaskDominance.step)[0]]
    results = [torch.cat([p.detach().reshape(-1) for p in net.parameters()]) for net in nets]
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("aggregator", [PCGrad(generator=torch.Generator().manual_seed(2)), GradDrop(leak=0.25),
                                        GradDrop(reduction="mean"), CAGrad(), MGDA("l2")])
def test_aggregator_parts_sum_to_the_aggregate(aggregator):
    G = torch.randn(4, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    G[1] *= -0.5
    gen = getattr(aggregator, "generator", None)
    state = gen.get_state() if gen is not None else torch.get_rng_state()
    parts = aggregator_parts(aggregator, G)
    gen.set_state(state) if gen is not None else torch.set_rng_state(state)
    torch.testing.assert_close(parts.sum(0), aggregator(G), rtol=1e-12, atol=1e-14)


def recomputing_step(tracker: TaskDominance, step: MTLStep, losses: list[torch.Tensor]) -> None:
    """The split the tracker made before MTLStep handed out its gradients: the per-task gradients taken again."""
    grads = per_task_grads(losses, step.shared_params, retain_graph=True)
    values = torch.stack([loss.detach() for loss in losses])
    parts = _same_draws(step.aggregator, grads.device, lambda: aggregator_parts(step.aggregator, grads, values))
    step.step(losses)
    tracker.observe(parts * {CAGrad: float(K)}.get(type(step.aggregator), 1.0))  # the DGR code's scales


@pytest.mark.parametrize("aggregator", [lambda: PCGrad(torch.Generator().manual_seed(4)), CAGrad,
                                        lambda: GradDrop(leak=0.2)], ids=["pcgrad", "cagrad", "graddrop"])
def test_mtlsteps_own_gradients_give_the_au_of_taking_them_again_bit_for_bit(aggregator):
    au = [adam_run(aggregator(), run)[1].au() for run in (TaskDominance.step, recomputing_step)]
    for name in au[0]:
        assert torch.equal(au[0][name], au[1][name]), name


@pytest.mark.parametrize("method, passes", [("pcgrad", 1), ("cagrad", 1), ("ew", 2)])
def test_aggregators_are_tracked_with_no_backward_pass_of_their_own(method, passes):
    """Each loss's backward passes, counted by a hook on it: one per step for an aggregator, as MTLStep alone;
    a weighting computes no per-task gradients, so the tracker takes them (one more pass per loss)."""
    net = Net()
    shared, heads = list(net.encoder.parameters()), list(net.heads.parameters())
    opt = torch.optim.SGD(shared + heads, lr=1e-2, momentum=0.9)
    m = make_method(method, K)
    step = MTLStep(shared, heads, opt, **({"weighting": m} if method == "ew" else {"aggregator": m}))
    tracker = TaskDominance(net.encoder.named_parameters(prefix="encoder"), opt, K)
    seen = []
    step.observer = own = lambda grads, values: seen.append(grads.shape)  # a user's observer is kept
    for t in range(3):
        losses = net.losses(*batch(t))[0]
        counts = [0] * K
        for k, loss in enumerate(losses):
            loss.register_hook(lambda g, k=k: counts.__setitem__(k, counts[k] + 1))
        tracker.step(step, losses)
        assert counts == [passes] * K
    assert step.observer is own and tracker.steps == 3
    assert seen == ([] if method == "ew" else [(K, sum(p.numel() for p in shared))] * 3)


@pytest.mark.parametrize("aggregator, scale, dgr", [
    (Sum, 1.0, False), (Sum, 1.0, True), (lambda: CAGrad(0.4), 1.0, False), (lambda: MGDA("l2"), float(K), False),
    (lambda: PCGrad(torch.Generator().manual_seed(3)), 1.0, False)], ids=["sum", "sum+dgr", "cagrad", "mgda", "pcgrad"])
def test_task_sam_shares_are_each_tasks_part_of_its_stage_2_gradients(aggregator, scale, dgr):
    """SGD without momentum: task k's share is ``lr c_k``, ``c_k = s (a_k g_k + a'_k h_k)`` from the stage-1 and
    stage-2 gradients written out by hand (``h = g^SAM - g``; ``Sum``: ``c_k = g_k^SAM``), the MTL-SAM code's scale
    ``s`` (MGDA: K); DGR's penalty gradient is in ``.grad`` and in no share."""
    net = Net()
    shared, heads = list(net.encoder.parameters()), [list(h.parameters()) for h in net.heads]
    lr, rho = 0.05, 0.3
    opt = torch.optim.SGD(shared + [p for h in heads for p in h], lr=lr)
    dummy = DummyHeads(6, [DummyTask("mse", 1)] * K, seed=0, dtype=torch.float64) if dgr else None
    sam = TaskSAM(net, shared, heads, opt, aggregator=aggregator(), rho=rho, dummy_heads=dummy,
                  dgr_lambda=0.5 if dgr else 0.0)
    tracker = TaskDominance(net.encoder.named_parameters(prefix="encoder"), opt, K, beta=BETA)
    twin = aggregator()  # draws as the step's aggregator does, a copy of its generator's stream
    updates = []
    for t in range(4):
        x, y = batch(t)
        ys = [y[:, k : k + 1] for k in range(K)]
        targets = [torch.randn(17, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(t))] * K
        G, S, _ = hand_grads(net, x, ys, rho, adaptive=True)
        c = scale * sum(a.weights(M)[:, None] * M for a, M in ((twin, G), (twin, S - G)))
        if isinstance(twin, Sum):
            torch.testing.assert_close(c, S, rtol=1e-12, atol=1e-14)
        z = net.encoder(x)
        penalty = torch.cat([g.reshape(-1) for g in torch.autograd.grad(0.5 * dummy(z, targets), shared)]) if dgr else 0
        tracker.step(sam, closure_for(net, x, ys, with_features=dgr), **({"dgr_targets": targets} if dgr else {}))
        torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in shared]), c.sum(0) + penalty,
                                   rtol=1e-10, atol=1e-12)
        updates.append(lr * c)
    au = ema_of_squares(updates)
    sizes = [p.numel() for p in shared]
    for (name, p), a in zip(net.encoder.named_parameters(prefix="encoder"), au.split(sizes, dim=1)):
        torch.testing.assert_close(tracker.au()[name], a.view(K, *p.shape), rtol=1e-9, atol=1e-18)


def imbalance(tracker: TaskDominance, reduction: str) -> float:
    """The largest distance of a task's layer share from 1/K, over layers and tasks."""
    return max(float((r - 1.0 / K).abs().max()) for r in tracker.rau("layer", reduction).values())


def test_adatask_balances_a_task_whose_gradients_are_100x_larger_where_equal_weighting_does_not():
    trackers = {}
    for optimizer in ("adam", "adatask"):
        net = Net(dtype=torch.float32)
        shared, heads = list(net.encoder.parameters()), list(net.heads.parameters())
        opt = (AdaTask(shared, K, lr=1e-3, task_params=heads) if optimizer == "adatask"
               else torch.optim.Adam(shared + heads, lr=1e-3))
        step = MTLStep(shared, heads, opt)
        trackers[optimizer] = tracker = TaskDominance(net.encoder.named_parameters(prefix="encoder"), opt, K)
        for t in range(30):
            x, y = batch(t, torch.float32)
            tracker.step(step, net.losses(x, y, scales=(1.0, 100.0, 1.0))[0])
    for reduction in ("mean", "sum"):
        assert imbalance(trackers["adatask"], reduction) < imbalance(trackers["adam"], reduction)
        for layer, share in trackers["adam"].rau("layer", reduction).items():  # ew + Adam: task 1 dominates
            assert int(share.argmax()) == 1, layer


def test_refusals():
    params = shared_params()
    with pytest.raises(TypeError, match="optimizer must be"):
        TaskDominance(zip(NAMES, params), torch.optim.RMSprop(params), K)
    opt = torch.optim.Adam(params)
    set_grads(params, task_parts(0).sum(0))
    opt.step()
    with pytest.raises(ValueError, match="before the optimizer's first step"):
        TaskDominance(zip(NAMES, params), opt, K)
    fresh = shared_params()
    tracker = TaskDominance(zip(NAMES, fresh), torch.optim.SGD(fresh, lr=0.1), K)
    with pytest.raises(ValueError, match=r"task_grads must be \[num_tasks, P\]"):
        tracker.observe()
    with pytest.raises(ValueError, match="level must be"):
        tracker.rau("row")


def test_cli_dominance_shares_sum_to_one_per_layer_and_draw_one_panel_per_spec(tmp_path, capsys):
    specs = "ew,pcgrad+dgr,adatask,uw+sgd,pcgrad+sam+dgr"
    result = run_cli(tmp_path, "--dataset", "synthetic", *TINY, "--compare", specs, "--dominance")
    out = capsys.readouterr().out
    assert "Task dominance" in out and (tmp_path / "result_dominance.png").stat().st_size > 0
    layers = ["encoder.0", "encoder.2"]  # the synthetic MLP's two Linear layers
    for run in result["runs"]:
        dom = run["dominance"]
        assert dom["layers"] == layers and dom["steps"] == 2 * 3  # 48 samples in batches of 16, 2 epochs
        for reduction in ("mean", "sum"):
            for layer in layers:
                shares = dom["rau"][reduction][layer]
                assert len(shares) == 2 and all(s >= 0 for s in shares)
                assert sum(shares) == pytest.approx(1.0, abs=1e-6)


def test_cli_dominance_refuses_meta_before_training(tmp_path, capsys):
    assert main(["train", "--dataset", "synthetic", *TINY, "--compare", "ew+sam,meta", "--dominance",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dominance tracker" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())
