"""yolodistill: knowledge distillation for YOLO detectors (teacher -> student), with our own training loop.

The Python API mirrors the commands: ``train``, ``probe_channels``, ``evaluate``, ``compare``, ``export``, ``run_demo``,
``load_recipe``; problems a user can fix raise ``DistillError``. Names load lazily, so that importing the package
(and ``yolodistill --help``) does not import torch and ultralytics.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import DistillError

__version__ = "0.3.33"

_API = {
    "train": "training",
    "TrainResult": "runlog",
    "RunConfig": "config",
    "load_recipe": "config",
    "probe_channels": "probe",
    "evaluate": "evaluation",
    "export": "exporter",
    "compare": "comparison",
    "run_demo": "demo",
    "make_synthetic_dataset": "data",
}
__all__ = ["DistillError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        # torch before ultralytics: ultralytics sets OMP_NUM_THREADS=1 where it is unset, and a torch imported after
        # that would train on one CPU thread
        importlib.import_module("torch")
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'distill_cli' has no attribute {name!r}")
