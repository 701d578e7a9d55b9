"""DummyHeads with the paper's dummy heads: module heads (exact double backward), MLP heads (the closed form of
dgr_mlp_penalty), linear modules (recognised and fused), transforms, per-task features, the authors'
finite-difference estimate, head modes, draws and state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgr_fast import DummyHeads, DummyTask
from dgr_fast.ops.dgr_mlp_penalty import mlp_head_of, mlp_penalty_per_task
from dgr_fast.reference import module_penalty, task_loss
from dgr_fast.reference.dgr import finite_difference_features_grad, head_penalties, module_head_fns

D = 6


def upsample(s, target):
    return F.interpolate(s, size=target.shape[-2:], mode="bilinear", align_corners=False)


def unit_normals(s, target):
    return F.normalize(upsample(s, target), dim=1)


def conv_head(classes):
    return lambda: nn.Sequential(nn.Conv2d(D, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, classes, 1))


def mlp(classes, final_relu=True):
    return lambda: nn.Sequential(nn.Linear(D, 5), nn.ReLU(), nn.Linear(5, classes), *([nn.ReLU()] if final_relu else []))


def thawed(head: nn.Module) -> nn.Module:
    """A frozen head as an ordinary module with parameters, for the references."""
    head = copy.deepcopy(head)
    names = head.__dict__.pop("dummy_parameter_names")
    for name in names:
        *path, leaf = name.split(".")
        owner = head.get_submodule(".".join(path))
        value = owner._buffers.pop(leaf)
        owner.register_parameter(leaf, nn.Parameter(value.clone()))
    return head.eval()


def dense_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(-1, 4, (2, 6, 8), generator=g)
    depth = torch.rand(2, 1, 3, 4, generator=g, dtype=torch.float64)
    normal = torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64)
    targets = {"seg": seg, "depth": depth, "normal": normal}
    masks = {"depth": depth[:, 0] > 0.2, "normal": normal.sum(1) != 0}  # the authors' "channel sum != 0"
    return targets, masks


DENSE_TASKS = {"seg": DummyTask("ce", 4, ignore_index=-1, head=conv_head(4), transform=upsample),
               "depth": DummyTask("l1", 1, reduction="row_mean", head=lambda: nn.Conv2d(D, 1, 1)),
               "normal": DummyTask("l1", 3, reduction="row_mean", head=conv_head(3), transform=unit_normals)}


def reference_penalty(dummy, s, features, targets, masks, weights=None, train=False):
    """module_penalty on set s's heads as plain modules, with the tasks' transforms and losses (``train``: the
    copies in training mode, BatchNorm on batch statistics)."""
    names = dummy.task_names
    heads, fns = [], []
    for k, (name, task) in enumerate(zip(names, dummy.tasks)):
        if dummy.kinds[k] == "linear":
            c0, c1 = dummy.offsets[k]
            head = nn.Conv2d(D, c1 - c0, 1).double() if features[k].dim() == 4 else nn.Linear(D, c1 - c0).double()
            with torch.no_grad():
                head.weight.copy_(dummy.weight[s, c0:c1].view_as(head.weight))
                head.bias.copy_(dummy.bias[s, c0:c1])
        else:
            head = thawed(dummy.modules_[f"set{s}_task{k}"]).train(train)
        heads.append(head)

        def fn(out, task=task, y=targets[name], m=masks.get(name)):
            out = task.transform(out, y) if task.transform else out
            return task_loss(out, y, task.loss, mask=m, ignore_index=task.ignore_index, reduction=task.reduction)
        fns.append(fn)
    penalties = head_penalties(*module_head_fns(features, heads), fns)
    return (penalties * (1 if weights is None else torch.tensor(weights, dtype=penalties.dtype) ** 2)).sum()


def test_module_heads_are_exact_against_module_penalty():
    dummy = DummyHeads(None, DENSE_TASKS, num_sets=2, seed=3, dtype=torch.float64)
    assert dummy.kinds == ["module", "linear", "module"]  # the 1x1 convolution is recognised and fused
    assert list(dummy.parameters()) == []  # frozen: no optimizer sees them
    targets, masks = dense_problem()
    z = torch.randn(2, D, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = [1.0, 0.5, 2.0]
    value = dummy(z, targets, masks=masks, task_weights=weights)
    (grad,) = torch.autograd.grad(value, z)
    zr = z.detach().requires_grad_(True)
    want = sum(reference_penalty(dummy, s, [zr] * 3, targets, masks, weights) for s in range(2)) / 2
    (want_grad,) = torch.autograd.grad(want, zr)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_deeplab_heads_with_dead_taps_are_exact():
    """DeepLab heads on a map smaller than their largest rate: DummyHeads cuts the convolutions to their live taps
    (ops.live_taps); the penalty and its gradient are still the double backward's through the whole heads."""
    from dgr_fast.train.models import DeepLabHead

    tasks = {"seg": DummyTask("ce", 4, ignore_index=-1, transform=upsample,
                              head=lambda: DeepLabHead(D, 4, width=5, rates=(2, 4, 6))),
             "depth": DummyTask("l1", 1, reduction="row_mean",
                                head=lambda: DeepLabHead(D, 1, width=3, rates=(1, 3, 6)))}
    dummy = DummyHeads(None, tasks, seed=1, dtype=torch.float64)
    targets, masks = dense_problem(seed=4)
    targets, masks = {k: targets[k] for k in tasks}, {"depth": masks["depth"]}
    z = torch.randn(2, D, 3, 4, dtype=torch.float64, requires_grad=True)
    kernels = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.conv2d and args[5][0] > 1:  # nn.Conv2d passes (x, w, b, stride, padding, dilation, groups)
                kernels.append((tuple(args[1].shape[-2:]), args[5][0]))
            return func(*args, **(kwargs or {}))

    with Spy():
        value = dummy(z, targets, masks=masks)
    (grad,) = torch.autograd.grad(value, z)
    # on 3 x 4: rate 2 keeps the whole kernel, rates 4 and 6 only the centre, rate 3 the middle row
    assert sorted(kernels) == [((1, 1), 4), ((1, 1), 6), ((1, 1), 6), ((1, 3), 3), ((3, 3), 2)]
    zr = z.detach().requires_grad_(True)
    want = reference_penalty(dummy, 0, [zr] * 2, targets, masks)
    (want_grad,) = torch.autograd.grad(want, zr)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_a_checkpointed_head_with_dead_taps_is_exact():
    """Activation checkpointing inside a dummy head replays its forward in the backward, where no convolution is
    cut: DummyHeads leaves a checkpointed forward whole, so the replay saves what the forward saved."""
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(D, 3, 3, padding=3, dilation=3), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.out(torch.utils.checkpoint.checkpoint(lambda t: self.conv(t).relu(), x, use_reentrant=False))

    dummy = DummyHeads(None, {"seg": DummyTask("ce", 2, head=Checkpointed)}, seed=0, dtype=torch.float64)
    z = torch.randn(2, D, 3, 4, dtype=torch.float64, requires_grad=True)  # 3 x 4: the rate-3 taps are dead
    y = {"seg": torch.randint(0, 2, (2, 3, 4), generator=torch.Generator().manual_seed(0))}
    value = dummy(z, y)
    (grad,) = torch.autograd.grad(value, z)
    zr = z.detach().requires_grad_(True)
    want = reference_penalty(dummy, 0, [zr], y, {})
    (want_grad,) = torch.autograd.grad(want, zr)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-14)


def test_per_task_features_mtan_style():
    """Each head reads its own task's features (a mapping by name), as the MTAN variant's dummy heads do."""
    dummy = DummyHeads(None, DENSE_TASKS, seed=4, dtype=torch.float64)
    targets, masks = dense_problem(1)
    feats = {name: torch.randn(2, D, 3, 4, dtype=torch.float64, requires_grad=True) for name in DENSE_TASKS}
    value = dummy(feats, targets, masks=masks)
    grads = torch.autograd.grad(value, list(feats.values()))
    refs = [f.detach().requires_grad_(True) for f in feats.values()]
    want = reference_penalty(dummy, 0, refs, targets, masks)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    for got, ref in zip(grads, torch.autograd.grad(want, refs)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="features has no entry for tasks"):
        dummy({"seg": feats["seg"]}, targets, masks=masks)


@pytest.mark.parametrize("rows", [9, 40])  # fewer rows than 1.5 sum(H) take the Gram form, more the direct one
def test_mlp_heads_take_the_closed_form_and_match_double_backward(rows):
    tasks = [DummyTask("ce", 4, ignore_index=-1, head=mlp(4)), DummyTask("bce", 3, head=mlp(3, False)),
             DummyTask("mse", 2, head=mlp(2)), DummyTask("l1", 2, reduction="row_mean", head=mlp(2, False))]
    dummy = DummyHeads(None, tasks, seed=5, dtype=torch.float64)
    assert dummy.kinds == ["mlp"] * 4
    g = torch.Generator().manual_seed(rows)
    z = torch.randn(rows, D, generator=g, dtype=torch.float64, requires_grad=True)
    y0 = torch.randint(0, 4, (rows,), generator=g)
    y0[::3] = -1
    targets = [y0, torch.rand(rows, 3, generator=g, dtype=torch.float64),
               torch.randn(rows, 2, generator=g, dtype=torch.float64), torch.randn(rows, 2, generator=g, dtype=torch.float64)]
    masks = [None, torch.rand(rows, generator=g) < 0.6, None, torch.rand(rows, generator=g) < 0.8]
    value = dummy(z, targets, masks=masks)
    (grad,) = torch.autograd.grad(value, z)
    heads = [thawed(dummy.modules_[f"set0_task{k}"]) for k in range(4)]
    fns = [lambda s, k=k: task_loss(s, targets[k], tasks[k].loss, mask=masks[k], ignore_index=-1,
                                    reduction=tasks[k].reduction) for k in range(4)]
    zr = z.detach().requires_grad_(True)
    want = module_penalty(zr, heads, fns)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, torch.autograd.grad(want, zr)[0], rtol=1e-10, atol=1e-14)
    closed = [mlp_head_of(h) for h in heads]
    fn = lambda x: mlp_penalty_per_task(x, closed, targets, [t.loss for t in tasks], masks=masks, ignore_index=-1,  # noqa: E731
                                        reductions=[t.reduction for t in tasks])
    assert torch.autograd.gradcheck(fn, (z.detach().requires_grad_(True),))


def test_mlp_recognition_is_exact_about_the_architecture():
    assert mlp_head_of(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))) is not None
    assert mlp_head_of(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))) is None
    assert mlp_head_of(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Sigmoid())) is None
    assert mlp_head_of(nn.Linear(4, 3)) is None


def authors_compute_hessian(features, heads, loss_fns, h):
    """A hand copy of the DGR authors' compute_hessian (LearningUnivforMTL, SceneUnderstanding/DGR_train.py) with the
    features in the place of model.encoder_parameter() and the heads' parameters as model.n_dummy_parameter(n)."""
    encoder = [features.detach().requires_grad_(True)]
    dummy_params = [p for head in heads for p in head.parameters()]

    def dummy_loss():
        return sum(fn(head(encoder[0])) for head, fn in zip(heads, loss_fns))

    loss = dummy_loss()
    d = torch.autograd.grad(loss, dummy_params, retain_graph=True)
    grad = torch.autograd.grad(loss, encoder, retain_graph=True)
    norm = torch.cat([w.view(-1) for w in d]).norm(2)
    eps = h / norm
    with torch.no_grad():
        for p, g in zip(dummy_params, d):
            p += eps * g
    dummyloss = dummy_loss()
    grad_p = torch.autograd.grad(dummyloss, encoder)
    with torch.no_grad():
        for p, g in zip(dummy_params, d):
            p -= eps * g
    grad_p_scaled = [g * loss for g in grad_p]
    grad_scaled = [g * dummyloss for g in grad]
    grad_p_sq = [g * dummyloss for g in grad_p]
    grad_sq = [g * loss for g in grad]
    prox = [2 * ((sq + p_sq) - (p_scaled + scaled)) / h**2
            for sq, p_sq, p_scaled, scaled in zip(grad_p_sq, grad_sq, grad_p_scaled, grad_scaled)]
    return prox[0]


@pytest.mark.parametrize("h", [1e-3, 1e-4])
def test_finite_difference_estimator_is_the_authors_bit_for_bit(h):
    tasks = {"age": DummyTask("ce", 7, head=mlp(7)), "gender": DummyTask("ce", 2, head=mlp(2)),
             "race": DummyTask("ce", 5, head=mlp(5))}
    dummy = DummyHeads(None, tasks, seed=6, estimator="finite_difference", fd_step=h)
    z = torch.randn(16, D, requires_grad=True)
    ys = {name: torch.randint(0, t.out_features, (16,)) for name, t in tasks.items()}
    (got,) = torch.autograd.grad(dummy(z, ys), z)
    heads = [thawed(dummy.modules_[f"set0_task{k}"]) for k in range(3)]
    fns = [lambda s, y=y: task_loss(s, y, "ce") for y in ys.values()]
    ours = finite_difference_features_grad(z, heads, fns, h=h)[1]
    # before theirs: their ``p -= eps * g`` does not restore p exactly, and 1/h^2 magnifies the last bit
    want = authors_compute_hessian(z, heads, fns, h)
    assert torch.equal(got, want)
    assert torch.equal(ours, want)
    with pytest.raises(ValueError, match="no per-task split"):
        dummy.per_task(z, ys)


@pytest.mark.parametrize("estimator", ["exact", "finite_difference"])
def test_channels_last_heads_and_features_give_the_same_penalty(estimator):
    """A model in channels_last (a common speed setting for convolutions): the heads' gradients are then not
    viewable as flat vectors, which the estimate's norm once assumed."""
    targets, masks = dense_problem()
    z = torch.randn(2, D, 3, 4, dtype=torch.float64)
    results = []
    for channels_last in (False, True):
        dummy = DummyHeads(None, DENSE_TASKS, seed=3, estimator=estimator, dtype=torch.float64)
        features = z.clone()
        if channels_last:
            dummy = dummy.to(memory_format=torch.channels_last)
            features = z.contiguous(memory_format=torch.channels_last)
            assert dummy.modules_["set0_task0"][0].weight.is_contiguous(memory_format=torch.channels_last)
        features.requires_grad_(True)
        value = dummy(features, targets, masks=masks)
        results.append((value, torch.autograd.grad(value, features)[0]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=0)
    # another summation order in the convolutions; the estimate's 1/h^2 magnifies that rounding ~1e6 times
    scale = float(results[0][1].abs().max()) * (1e-6 if estimator == "finite_difference" else 1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=scale)


def test_head_mode_train_uses_batch_statistics_and_moves_no_running_statistic():
    targets, masks = dense_problem(2)
    z = torch.randn(2, D, 3, 4, dtype=torch.float64)
    evaluated = DummyHeads(None, DENSE_TASKS, seed=7, dtype=torch.float64)
    trained = DummyHeads(None, DENSE_TASKS, seed=7, dtype=torch.float64, head_mode="train")
    before = {k: v.clone() for k, v in trained.state_dict().items() if isinstance(v, torch.Tensor)}
    assert not torch.allclose(trained(z, targets, masks=masks), evaluated(z, targets, masks=masks))
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())
    trained.train()
    assert not any(m.training for m in trained.modules_.modules())  # the heads' mode is head_mode's alone


def test_head_mode_train_is_exact_and_differentiable():
    """Batch statistics in the penalty and in its gradient, and the gradient taken after the forward returned
    (regression: restoring the running statistics in place broke that backward)."""
    targets, masks = dense_problem(4)
    dummy = DummyHeads(None, DENSE_TASKS, seed=9, dtype=torch.float64, head_mode="train")
    z = torch.randn(2, D, 3, 4, dtype=torch.float64, requires_grad=True)
    value = dummy(z, targets, masks=masks)
    (grad,) = torch.autograd.grad(value, z)
    zr = z.detach().requires_grad_(True)
    want = reference_penalty(dummy, 0, [zr] * 3, targets, masks, train=True)
    (want_grad,) = torch.autograd.grad(want, zr)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_module_heads_resample_reproducibly_and_round_trip_state():
    a = DummyHeads(None, DENSE_TASKS, seed=8, dtype=torch.float64, resample="epoch")
    b = DummyHeads(None, DENSE_TASKS, seed=8, dtype=torch.float64, resample="epoch")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if isinstance(x, torch.Tensor))
    first = {k: v.clone() for k, v in a.state_dict().items() if isinstance(v, torch.Tensor)}
    a.new_epoch()
    changed = [k for k, v in a.state_dict().items() if isinstance(v, torch.Tensor) and not torch.equal(v, first[k])]
    assert any("modules_" in k for k in changed) and "weight" in changed
    b.load_state_dict(a.state_dict())
    a.new_epoch()
    b.new_epoch()  # the generator state travelled with the heads: the next draws agree
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
               if isinstance(x, torch.Tensor))


def test_bad_module_heads_are_refused():
    with pytest.raises(TypeError, match="head must be callable"):
        DummyTask("ce", 3, head=nn.Linear(4, 3))
    with pytest.raises(TypeError, match="must build an nn.Module"):
        DummyHeads(None, [DummyTask("ce", 3, head=lambda: 3)])
    with pytest.raises(ValueError, match="tasks without a head factory need it"):
        DummyHeads(None, [DummyTask("ce", 3)])
    with pytest.raises(ValueError, match="estimator"):
        DummyHeads(4, [DummyTask("ce", 3)], estimator="exactly")
    with pytest.raises(ValueError, match="head_mode"):
        DummyHeads(4, [DummyTask("ce", 3)], head_mode="inference")
