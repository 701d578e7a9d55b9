"""Frozen-feature evaluation: how well other classifiers read each task from the trained encoder's features.

The DGR paper evaluates the shared representation "applied to various classifiers" (its code imports k-NN, decision
trees and SVC). Here: a linear probe (logistic regression for class tasks, ridge regression otherwise) and k-nearest
neighbours, fitted on the frozen features of the training split, scored with the task's own metric on the test split.
Needs scikit-learn (the ``demo`` extra).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dgr_fast.data import MTLDataset, TaskSpec
from dgr_fast.train.metrics import Metric, valid_mask
from dgr_fast.train.models import MTLModel


def _features(model: MTLModel, data: MTLDataset, device: torch.device, batch_size: int) -> tuple[Tensor, list[Tensor]]:
    """Encoder features as rows ``[n, D]`` (dense maps: one row per pixel) and each task's targets as rows."""
    zs, ys = [], [[] for _ in data.tasks]
    model.eval()
    with torch.no_grad():
        for idx in torch.arange(len(data)).split(batch_size):
            x, targets = data.batch(idx)
            z = model.encoder(x.to(device)).float().cpu()
            zs.append(z.movedim(1, -1).reshape(-1, z.shape[1]))
            for task, y, rows in zip(data.tasks, targets, ys):
                rows.append(y.reshape(-1) if task.loss == "ce" else y.movedim(1, -1).reshape(-1, y.shape[1]))
    model.train()
    return torch.cat(zs), [torch.cat(rows) for rows in ys]


def _usable_rows(task: TaskSpec, y: Tensor, max_rows: int, generator: torch.Generator) -> Tensor:
    """Rows whose target counts (not ignore_index / masked), at most ``max_rows`` of them drawn at random."""
    if task.loss == "ce":
        keep = y != task.ignore_index
    else:
        mask = valid_mask(task, y)  # y rows [n, C]: dim 1 is the channel, as valid_mask expects
        keep = torch.ones(len(y), dtype=torch.bool) if mask is None else mask
    rows = keep.nonzero().squeeze(1)
    if len(rows) > max_rows:
        rows = rows[torch.randperm(len(rows), generator=generator)[:max_rows]]
    return rows


def _score(task: TaskSpec, pred, y: Tensor) -> float:
    """The task's metric on probe predictions (class indices become one-hot scores)."""
    pred = torch.as_tensor(pred)
    if task.loss == "ce":
        pred = torch.nn.functional.one_hot(pred.long(), task.out_features).float()
    metric = Metric(task)
    metric.update(pred.reshape(len(y), -1), y)
    return metric.compute()


def probe(model: MTLModel, train: MTLDataset, test: MTLDataset, device: torch.device | str, *, seed: int = 0,
          neighbours: int = 5, max_rows: int = 20000, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """``{task: {"linear": metric, "knn": metric}}`` of probes on frozen features (see the module docstring).

    Dense tasks use at most ``max_rows`` random valid pixels of each split (k-NN and the probes are quadratic or
    worse in the number of rows).
    """
    try:
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:
        raise ImportError("the frozen-feature probe needs scikit-learn: pip install scikit-learn "
                          "(or the project's demo extra)") from err
    device = torch.device(device)
    z_train, y_train = _features(model, train, device, batch_size)
    z_test, y_test = _features(model, test, device, batch_size)
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for k, task in enumerate(train.tasks):
        tr = _usable_rows(task, y_train[k], max_rows, generator)
        te = _usable_rows(task, y_test[k], max_rows, generator)
        fit_x, fit_y, eval_x = z_train[tr].numpy(), y_train[k][tr].numpy(), z_test[te].numpy()
        if task.loss == "ce":
            linear = LogisticRegression(max_iter=1000)
            knn = KNeighborsClassifier(n_neighbors=neighbours)
        else:
            linear, knn = Ridge(alpha=1.0), KNeighborsRegressor(n_neighbors=neighbours)
        result[task.name] = {
            name: _score(task, make_pipeline(StandardScaler(), est).fit(fit_x, fit_y).predict(eval_x), y_test[k][te])
            for name, est in (("linear", linear), ("knn", knn))
        }
    return result
