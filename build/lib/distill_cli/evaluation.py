"""``eval``: models side by side on one split, with ultralytics' own validator (the numbers ``YOLO.val()`` gives)."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils.torch_utils import get_flops

from .data import load_data
from .models import count_params, load_model


@dataclass
class Validation:
    metrics: dict[str, float]  # mAP50-95, mAP50, precision, recall
    per_class: dict[str, float] = field(default_factory=dict)  # class name -> mAP50-95
    recall: list[float] = field(default_factory=list)  # PR curve at IoU 0.5, precision averaged over classes
    precision: list[float] = field(default_factory=list)
    ms_per_img: float = 0.0


def run_validator(model: nn.Module, args: dict[str, Any], loader=None) -> Validation:
    """Validate a copy of ``model`` (the validator fuses what it gets) and collect what reports need."""
    args = {"plots": False, "verbose": False, "save_json": False, "rect": True, "mode": "val", **args}
    was_training = model.training
    with tempfile.TemporaryDirectory() as scratch, single_process_validation():
        validator = DetectionValidator(dataloader=loader, save_dir=Path(scratch), args=args)
        stats = validator(model=model)
    model.train(was_training)
    metrics = validator.metrics
    names = validator.names
    box = metrics.box
    precision = box.prec_values.mean(0).tolist() if len(box.prec_values) else []
    return Validation(
        metrics={
            "mAP50-95": float(stats["metrics/mAP50-95(B)"]),
            "mAP50": float(stats["metrics/mAP50(B)"]),
            "precision": float(stats["metrics/precision(B)"]),
            "recall": float(stats["metrics/recall(B)"]),
        },
        per_class={names[i]: float(v) for i, v in enumerate(metrics.maps)},
        recall=box.px.tolist() if precision else [],
        precision=precision,
        ms_per_img=float(validator.speed["inference"]),
    )


@contextlib.contextmanager
def single_process_validation():
    """Under torchrun, ultralytics' validator sees RANK from the environment and gathers results from every rank;
    ours validates on rank 0 alone while the others wait at a barrier, so it must act as a single process."""
    from ultralytics.engine import validator as base_validator
    from ultralytics.models.yolo.detect import val as detect_val

    names = ("RANK", "LOCAL_RANK")  # LOCAL_RANK: its torch_distributed_zero_first would call barriers
    saved = {(m, n): getattr(m, n) for m in (base_validator, detect_val) for n in names if hasattr(m, n)}
    for module, name in saved:
        setattr(module, name, -1)
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def evaluate(
    weights: list[str],
    data: str,
    imgsz: int = 640,
    batch: int = 16,
    device: str = "",
    split: str = "val",
    trust_checkpoint: bool = False,
    details: bool = False,
) -> list[dict[str, Any]]:
    """One row per model: params, GFLOPs (at imgsz), mAP50-95, mAP50, precision, recall, inference ms per image.

    Validation runs exactly as ``YOLO(w).val(data=..., imgsz=..., batch=..., split=...)`` does (rectangular
    batches, conf 0.001, IoU 0.7), so the numbers are the same. ``details`` adds per-class AP and the PR curve.
    """
    load_data(data, split)  # one clear error for a bad yaml, before any model is read
    models = [(w, load_model(w, "weights", trust=trust_checkpoint)) for w in weights]
    rows = []
    for path, model in models:
        result = run_validator(model, {"data": data, "imgsz": imgsz, "batch": batch, "split": split, "device": device})
        row = {
            "model": str(path),
            "params": count_params(model),
            "gflops": round(get_flops(model, imgsz), 2),
            **result.metrics,
            "ms_per_img": round(result.ms_per_img, 2),
        }
        if details:
            row.update(per_class=result.per_class, pr={"recall": result.recall, "precision": result.precision})
        rows.append(row)
    return rows
