"""Lightning manual optimisation with AdaTask and MTLStep: the README's recipe, trained by a Trainer, equals the plain
loop step for step, and Lightning counts the steps (global_step)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lightning", reason="Lightning is an optional extra: pip install 'dgr_fast[lightning]'")
import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from dgr_fast import AdaTask  # noqa: E402
from dgr_fast.mtl import MTLStep  # noqa: E402

STEPS = 4


def _model():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh())
    heads = torch.nn.ModuleList([torch.nn.Linear(7, 1) for _ in range(3)])
    return trunk, heads


def _data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(STEPS * 4, 5, generator=g), torch.randn(STEPS * 4, 3, generator=g))


def _losses(trunk, heads, x, y):
    z = trunk(x)
    return [(h(z).squeeze(1) - y[:, k]).square().mean() for k, h in enumerate(heads)]


def _optimizer(trunk, heads):
    return AdaTask(trunk.parameters(), 3, lr=1e-2, task_params=heads.parameters(), backend="torch")


class _Recipe(L.LightningModule):
    """The recipe: automatic_optimization off, and every call on the optimizer Lightning hands out."""

    def __init__(self, use_mtl_step: bool):
        super().__init__()
        self.automatic_optimization = False
        self.trunk, self.heads = _model()
        self.use_mtl_step = use_mtl_step

    def configure_optimizers(self):
        return _optimizer(self.trunk, self.heads)

    def on_train_start(self):
        # Built on Lightning's optimizer (not the one configure_optimizers returned), so that its step() is counted.
        self.mtl = MTLStep(list(self.trunk.parameters()), list(self.heads.parameters()), self.optimizers())

    def training_step(self, batch, batch_idx):
        losses = _losses(self.trunk, self.heads, *batch)
        if self.use_mtl_step:
            self.mtl.step(losses)
        else:
            opt = self.optimizers()
            opt.zero_grad()
            opt.backward(losses)
            opt.clip_grad_norm_(1.0)
            opt.step()
        return torch.stack(losses).sum().detach()


def _fit(module):
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(_data(), batch_size=4))
    return trainer


@pytest.mark.parametrize("use_mtl_step", (False, True))
def test_recipe_equals_the_plain_loop(use_mtl_step):
    module = _Recipe(use_mtl_step)
    trainer = _fit(module)
    assert trainer.global_step == STEPS

    trunk, heads = _model()
    opt = _optimizer(trunk, heads)
    mtl = MTLStep(list(trunk.parameters()), list(heads.parameters()), opt)
    for x, y in DataLoader(_data(), batch_size=4):
        losses = _losses(trunk, heads, x, y)
        if use_mtl_step:
            mtl.step(losses)
        else:
            opt.zero_grad()
            opt.backward(losses)
            opt.clip_grad_norm_(1.0)
            opt.step()
    trained = [*module.trunk.parameters(), *module.heads.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(trained, [*trunk.parameters(), *heads.parameters()]))


class _Forgets(_Recipe):
    """The mistake the issue met: no zero_grad() between steps."""

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.backward(_losses(self.trunk, self.heads, *batch))
        opt.step()


def test_a_missing_zero_grad_raises_instead_of_accumulating():
    with pytest.raises(RuntimeError, match="zero_grad"):
        _fit(_Forgets(use_mtl_step=False))
