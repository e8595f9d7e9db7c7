"""``eval``: models side by side on one split, with ultralytics' own validator (the numbers ``YOLO.val()`` gives)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils.torch_utils import get_flops

from .data import load_data
from .models import count_params, load_model


def evaluate(
    weights: list[str],
    data: str,
    imgsz: int = 640,
    batch: int = 16,
    device: str = "",
    split: str = "val",
    trust_checkpoint: bool = False,
) -> list[dict[str, Any]]:
    """One row per model: params, GFLOPs (at imgsz), mAP50-95, mAP50, precision, recall, inference ms per image.

    Validation runs exactly as ``YOLO(w).val(data=..., imgsz=..., batch=..., split=...)`` does (rectangular
    batches, conf 0.001, IoU 0.7), so the numbers are the same.
    """
    load_data(data, split)  # one clear error for a bad yaml, before any model is read
    models = [(w, load_model(w, "weights", trust=trust_checkpoint)) for w in weights]
    rows = []
    for path, model in models:
        args = {
            "data": data,
            "imgsz": imgsz,
            "batch": batch,
            "split": split,
            "device": device,
            "rect": True,
            "plots": False,
            "verbose": False,
            "save_json": False,
            "mode": "val",
        }
        with tempfile.TemporaryDirectory() as scratch:  # the validator wants a save dir even when it saves nothing
            validator = DetectionValidator(save_dir=Path(scratch), args=args)
            stats = validator(model=model)
        rows.append(
            {
                "model": str(path),
                "params": count_params(model),
                "gflops": round(get_flops(model, imgsz), 2),
                "mAP50-95": float(stats["metrics/mAP50-95(B)"]),
                "mAP50": float(stats["metrics/mAP50(B)"]),
                "precision": float(stats["metrics/precision(B)"]),
                "recall": float(stats["metrics/recall(B)"]),
                "ms_per_img": round(float(validator.speed["inference"]), 2),
            }
        )
    return rows
