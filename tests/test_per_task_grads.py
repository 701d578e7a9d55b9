"""per_task_grads: loop and batched modes against autograd's per-task gradients."""

from __future__ import annotations

import pytest
import torch

from dgr_fast.mtl import per_task_grads


def _conv_problem(seed: int = 0, K: int = 3):
    torch.manual_seed(seed)
    enc = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.BatchNorm2d(5), torch.nn.ReLU(), torch.nn.Conv2d(5, 4, 3, stride=2)
    ).double()
    unused = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))  # reaches no loss
    heads = [torch.nn.Linear(4, 2).double() for _ in range(K)]
    x = torch.randn(6, 3, 9, 7, dtype=torch.float64)
    z = enc(x)
    feats = z.mean(dim=(2, 3))
    losses = [h(feats).sin().sum() * (k + 1) for k, h in enumerate(heads)]
    params = list(enc.parameters()) + [unused]
    return losses, params, z


def _expected(losses, params):
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows)


@pytest.mark.parametrize("mode,chunk_size", [("loop", None), ("batched", None), ("batched", 1), ("batched", 2)])
def test_matches_autograd(mode, chunk_size):
    losses, params, z = _conv_problem()
    expect = _expected(losses, params)
    got = per_task_grads(losses, params, features=z if mode == "batched" else None, mode=mode, chunk_size=chunk_size)
    assert got.shape == (3, sum(p.numel() for p in params)) and got.dtype == torch.float64
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, -3:], torch.zeros(3, 3))  # the unused parameter: zeros, not garbage


def test_loss_without_graph_and_tensor_losses():
    losses, params, _ = _conv_problem(1, K=2)
    expect = _expected(losses[:1], params)[0]
    got = per_task_grads([losses[0], torch.zeros((), dtype=torch.float64)], params, retain_graph=True)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # a constant loss: a zero row
    torch.testing.assert_close(got[0], expect, rtol=1e-12, atol=1e-12)
    stacked = per_task_grads(torch.stack(losses), params)  # a [K] tensor of losses
    torch.testing.assert_close(stacked[0], expect, rtol=1e-12, atol=1e-12)


def test_retain_graph():
    losses, params, z = _conv_problem(2)
    per_task_grads(losses, params, features=z, mode="batched", retain_graph=True)
    per_task_grads(losses, params, mode="loop")  # the graph was kept
    with pytest.raises(RuntimeError):
        losses[0].backward()  # and now it is freed


def test_mixed_dtypes_give_float32():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    losses = [a.sum() + b.double().sum(), (a * 2).sum()]
    got = per_task_grads(losses, [a, b])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([[1.0, 1, 1, 1, 1], [2, 2, 2, 0, 0]]))


def test_bad_input():
    losses, params, z = _conv_problem(3)
    for kwargs, exc, word in [
        (dict(mode="vmap"), ValueError, "mode"),
        (dict(mode="batched"), TypeError, "features"),
        (dict(mode="batched", features=z.detach()), ValueError, "features"),
        (dict(mode="batched", features=z, chunk_size=0), ValueError, "chunk_size"),
    ]:
        with pytest.raises(exc, match=word):
            per_task_grads(losses, params, **kwargs)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        per_task_grads(losses, [torch.zeros(2)])
    with pytest.raises(TypeError, match="params"):
        per_task_grads(losses, params[0])
    with pytest.raises(ValueError, match=r"losses\[0\]"):
        per_task_grads([z.sum(dim=0)], params)
    with pytest.raises(ValueError, match="losses is empty"):
        per_task_grads([], params)
    with pytest.raises(TypeError, match=r"losses\[1\]"):
        per_task_grads([losses[0], 1.0], params)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_batched_equals_loop_when_a_loss_reaches_params_around_the_features(chunk_size):
    """A weight penalty on a shared parameter, and a head reading an earlier layer, reach params without passing
    through the features: the batched product alone misses that part (norm 0.70 vs 3.44 once)."""
    torch.manual_seed(3)
    first, second = torch.nn.Linear(5, 6).double(), torch.nn.Linear(6, 4).double()
    heads = [torch.nn.Linear(4, 1).double() for _ in range(4)]
    x = torch.randn(9, 5, dtype=torch.float64)
    hidden = torch.tanh(first(x))
    z = torch.tanh(second(hidden))
    losses = [
        heads[0](z).square().mean(),
        heads[1](z).sin().mean() + 0.3 * first.weight.square().sum(),  # a weight penalty
        heads[2](z).mean() + hidden.square().mean(),  # an earlier layer
        heads[3](z).cos().mean(),
    ]
    params = list(first.parameters()) + list(second.parameters())
    expect = _expected(losses, params)
    got = per_task_grads(losses, params, features=z, mode="batched", chunk_size=chunk_size, retain_graph=True)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_batched_refuses_features_not_computed_from_params():
    z = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="is a leaf tensor"):
        per_task_grads([z.sum()], [z], features=z, mode="batched")
    with pytest.raises(ValueError, match="does not require grad"):
        per_task_grads([z.sum()], [z], features=z.detach(), mode="batched")


def test_sparse_gradients_become_dense_rows_in_loop_mode_and_batched_says_why_not():
    torch.manual_seed(4)
    emb, lin = torch.nn.Embedding(10, 3, sparse=True).double(), torch.nn.Linear(3, 1).double()
    z = emb(torch.tensor([1, 2, 2, 5]))
    losses = [lin(z).sum(), (z**2).sum()]
    got = per_task_grads(losses, [emb.weight], retain_graph=True)
    want = torch.zeros(10, 3, dtype=torch.float64)
    want.index_add_(0, torch.tensor([1, 2, 2, 5]), 2 * z.detach())
    torch.testing.assert_close(got[1].view(10, 3), want)
    with pytest.raises(ValueError, match="sparse gradients.*mode='loop'"):
        per_task_grads(losses, [emb.weight], features=z, mode="batched")
