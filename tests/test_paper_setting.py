"""The paper's dummy heads in the training steps and the trainer: MTLStep and TaskSAM with per-task features,
`--dummy-heads same|linear`, `--paper-setting` (the authors' heads, optimizer and schedule)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from dgr_fast import DummyHeads, DummyTask
from dgr_fast.cli import main
from dgr_fast.data import TaskSpec, TensorMTLDataset
from dgr_fast.mtl import PCGrad, TaskSAM
from dgr_fast.mtl.step import MTLStep
from dgr_fast.reference import task_loss
from dgr_fast.reference.dgr import head_penalties, module_head_fns
from dgr_fast.train.models import DeepLabHead, make_model
from dgr_fast.train.trainer import RunConfig, TrainSettings, _Step
from test_data import nyuv2_dir  # noqa: F401  (fixture)

D = 5


def mlp_head(classes):
    return lambda: nn.Sequential(nn.Linear(D, 4), nn.ReLU(), nn.Linear(4, classes), nn.ReLU())


class MTANLike(nn.Module):
    """A shared trunk and one attention mask per task: each task's head reads its own features."""

    def __init__(self, classes):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(7, D), nn.Tanh())
        self.att = nn.ModuleList(nn.Linear(D, D) for _ in classes)
        self.heads = nn.ModuleList(nn.Linear(D, c) for c in classes)

    def forward(self, x):
        z = self.trunk(x)
        feats = [z * torch.sigmoid(att(z)) for att in self.att]
        return feats, [head(f) for head, f in zip(self.heads, feats)]


def thawed(head):
    head = copy.deepcopy(head)
    for name in head.__dict__.pop("dummy_parameter_names"):
        *path, leaf = name.split(".")
        owner = head.get_submodule(".".join(path))
        owner.register_parameter(leaf, nn.Parameter(owner._buffers.pop(leaf).clone()))
    return head


def expected_penalty(dummy, feats, ys):
    heads = [thawed(dummy.modules_[f"set0_task{k}"]).eval() for k in range(len(ys))]
    fns, params = module_head_fns(feats, heads)
    return head_penalties(fns, params, [lambda s, y=y: task_loss(s, y, "ce") for y in ys]).sum()


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def pcgrad():
    return PCGrad(torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["ew", "pcgrad"])
def test_mtlstep_takes_per_task_features(method):
    torch.manual_seed(0)
    aggregator = pcgrad() if method == "pcgrad" else None
    classes = (3, 4)
    model = MTANLike(classes).double()
    tasks = {f"t{k}": DummyTask("ce", c, head=mlp_head(c)) for k, c in enumerate(classes)}
    dummy = DummyHeads(None, tasks, seed=2, dtype=torch.float64)
    x = torch.randn(9, 7, dtype=torch.float64)
    ys = [torch.randint(0, c, (9,)) for c in classes]
    shared = list(model.trunk.parameters()) + list(model.att.parameters())
    heads = list(model.heads.parameters())
    step = MTLStep(shared, heads, torch.optim.SGD(shared + heads, lr=0.1), aggregator=aggregator,
                   dummy_heads=dummy, dgr_lambda=0.3)
    feats, outs = model(x)
    losses = [task_loss(o, y, "ce") for o, y in zip(outs, ys)]
    info = step.backward(losses, features={"t0": feats[0], "t1": feats[1]}, dgr_targets=ys)
    got = [p.grad.clone() for p in shared]

    feats, outs = model(x)
    penalty = expected_penalty(dummy, feats, ys)
    torch.testing.assert_close(info["penalty"], penalty.detach(), rtol=1e-12, atol=0)
    if aggregator is None:
        want = torch.autograd.grad(sum(task_loss(o, y, "ce") for o, y in zip(outs, ys)) + 0.3 * penalty, shared)
    else:
        rows = [task_loss(o, y, "ce") for o, y in zip(outs, ys)]
        G = torch.stack([flat_grad(r, shared) for r in rows])
        direction = pcgrad()(G)  # summed: the DGR authors' mean-scaled PCGrad times K
        dgr = flat_grad(0.3 * penalty, shared)
        flat, want, i = direction + dgr, [], 0
        for p in shared:
            want.append(flat[i:i + p.numel()].view_as(p))
            i += p.numel()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_batched_grad_mode_needs_one_features_tensor():
    classes = (3, 2)
    model = MTANLike(classes)
    dummy = DummyHeads(None, {f"t{k}": DummyTask("ce", c, head=mlp_head(c)) for k, c in enumerate(classes)}, seed=0)
    shared, heads = list(model.trunk.parameters()) + list(model.att.parameters()), list(model.heads.parameters())
    step = MTLStep(shared, heads, torch.optim.SGD(shared + heads, lr=0.1), aggregator=PCGrad(),
                   dummy_heads=dummy, dgr_lambda=0.1, grad_mode="batched")
    feats, outs = model(torch.randn(4, 7))
    ys = [torch.randint(0, c, (4,)) for c in classes]
    with pytest.raises(TypeError, match="features must be a tensor when mode='batched'"):
        step.backward([task_loss(o, y, "ce") for o, y in zip(outs, ys)], features=feats, dgr_targets=ys)


def test_task_sam_takes_per_task_features():
    torch.manual_seed(1)
    classes = (3, 4)
    model = MTANLike(classes).double()
    dummy = DummyHeads(None, {f"t{k}": DummyTask("ce", c, head=mlp_head(c)) for k, c in enumerate(classes)},
                       seed=4, dtype=torch.float64)
    x = torch.randn(6, 7, dtype=torch.float64)
    ys = [torch.randint(0, c, (6,)) for c in classes]
    shared = list(model.trunk.parameters()) + list(model.att.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    sam = TaskSAM(model, shared, heads, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.05,
                  dummy_heads=dummy, dgr_lambda=0.2)

    def closure():
        feats, outs = model(x)
        return [task_loss(o, y, "ce") for o, y in zip(outs, ys)], feats

    before = expected_penalty(dummy, model(x)[0], ys).detach()
    info = sam.step(closure, dgr_targets=ys)
    torch.testing.assert_close(info["penalty"], before, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"closure must return \(losses, features\)"):
        sam.step(lambda: (closure()[0], "features"), dgr_targets=ys)


def dense_data(n=4, h=6, w=5):
    gen = torch.Generator().manual_seed(0)
    tasks = [TaskSpec("seg", "ce", 3, "miou", ignore_index=-1), TaskSpec("normal", "l1", 3, "angle_err",
                                                                         mask_zero=True)]
    normal = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=gen), dim=1)
    normal[:, :, 0] = 0  # a row of unlabelled pixels
    return TensorMTLDataset(tasks, torch.randn(n, 3, h, w, generator=gen),
                            [torch.randint(-1, 3, (n, h, w), generator=gen), normal], dense=True)


def test_dummy_heads_same_copies_the_paper_heads():
    data = dense_data()
    torch.manual_seed(0)
    model = make_model(data, features=8, heads="paper")
    assert isinstance(model.heads[0], DeepLabHead) and isinstance(model.heads[1][0], DeepLabHead)
    settings = TrainSettings(epochs=3, lr=0.1, heads="paper", dummy_heads="same", schedule="cosine",
                             weight_decay=1e-4)
    step = _Step(RunConfig(spec="ew+sgd+dgr", optimizer="sgd", dgr_lambda=0.1), model, data, settings,
                 torch.device("cpu"))
    assert step.dummy.kinds == ["module", "module"] and step.dummy.head_mode == "train"
    drawn = [step.dummy.modules_[f"set0_task{k}"] for k in range(2)]
    for mine, drawn_head in zip(model.heads, drawn):
        assert type(drawn_head) is type(mine)
        assert [tuple(b.shape) for _, b in drawn_head.named_buffers() if "running" not in _ and "num_batches" not in _] \
            == [tuple(p.shape) for p in mine.parameters()]
        out = drawn_head(torch.randn(2, 8, 6, 5))
        if isinstance(mine, nn.Sequential) and not isinstance(mine, DeepLabHead):  # the normals: unit vectors
            torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 6, 5))
    linear = _Step(RunConfig(spec="ew+dgr", dgr_lambda=0.1), model, data,
                   TrainSettings(heads="paper", dummy_heads="linear"), torch.device("cpu"))
    assert linear.dummy.kinds == ["linear", "linear"]
    optimizer = step.runner.optimizer
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4 and optimizer.param_groups[0]["momentum"] == 0.9
    x, ys = data.batch(torch.arange(len(data)))
    for epoch in range(1, 3):
        losses = step(x, ys)
        assert torch.isfinite(losses).all()
        step.end_epoch()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * epoch / 3)))


def test_cli_paper_setting_on_nyuv2(tmp_path, nyuv2_dir):  # noqa: F811
    root, _ = nyuv2_dir
    path = tmp_path / "r.json"
    assert main(["train", "--dataset", "nyuv2", "--data-dir", str(root), "--epochs", "1", "--batch-size", "2",
                 "--paper-setting", "--compare", "ew+dgr", "--no-plot", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    settings, run = result["settings"], result["runs"][0]
    assert (settings["heads"], settings["dummy_heads"], settings["lr"], settings["weight_decay"],
            settings["schedule"]) == ("paper", "same", 0.1, 1e-4, "cosine")
    assert run["config"]["optimizer"] == "sgd" and run["backends"]["dgr_penalty"] == "torch (module heads)"
    assert all(math.isfinite(v) for v in run["final"].values())


def test_cli_dummy_heads_linear_with_the_paper_heads(tmp_path):
    path = tmp_path / "r.json"
    assert main(["train", "--dataset", "synthetic", "--train-size", "32", "--test-size", "16", "--epochs", "1",
                 "--paper-setting", "--dummy-heads", "linear", "--compare", "ew+dgr", "--no-plot",
                 "--json", str(path)]) == 0
    run = json.loads(path.read_text())["runs"][0]
    assert run["backends"]["dgr_penalty"] in ("cpp", "torch", "triton")
