"""Training hard-parameter-sharing models on the built-in data sets: what ``dgr-fast train`` runs.

``parse_spec`` reads a method spec (``"pcgrad+dgr"``, ``"adatask"``, ...), ``train`` trains one on an ``MTLData``,
``probe`` evaluates frozen features, ``delta_m`` compares runs.
"""

from dgr_fast.train.metrics import Metric, delta_m, task_loss
from dgr_fast.train.models import MTLModel, make_model
from dgr_fast.train.probe import probe
from dgr_fast.train.trainer import RunConfig, SpecError, TrainSettings, evaluate, parse_spec, train

__all__ = ["Metric", "delta_m", "task_loss", "MTLModel", "make_model", "probe", "RunConfig", "SpecError",
           "TrainSettings", "evaluate", "parse_spec", "train"]
