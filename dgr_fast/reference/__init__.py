"""Plain-PyTorch references: the ground truth every fast path is tested against."""

from dgr_fast.reference.dgr import finite_difference_features_grad, module_penalty, task_loss

__all__ = ["finite_difference_features_grad", "module_penalty", "task_loss"]
