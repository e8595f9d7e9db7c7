"""Distillation losses, registered by name. Importing this package registers every method."""

from . import cross, feature, output  # noqa: F401  (registration side effect)
from .registry import (
    LOSSES,
    SCHEDULE_KINDS,
    CrossLoss,
    DistillContext,
    DistillLoss,
    FeatureLoss,
    OutputLoss,
    build_loss,
    check_loss_spec,
    loss_params,
    register,
)

__all__ = [
    "LOSSES",
    "SCHEDULE_KINDS",
    "CrossLoss",
    "DistillContext",
    "DistillLoss",
    "FeatureLoss",
    "OutputLoss",
    "build_loss",
    "check_loss_spec",
    "loss_params",
    "register",
]
