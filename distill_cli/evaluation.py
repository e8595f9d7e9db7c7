"""``eval``: models side by side on one split, with ultralytics' own validator (the numbers ``YOLO.val()`` gives)."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.models.yolo.detect import DetectionValidator
from ultralytics.utils.torch_utils import get_flops

from .data import load_data, split_errors, warn_skipped
from .errors import DistillError
from .models import class_names, count_params, load_model, stride_multiple
from .options import EvalOptions
from .rules import api_function, validated


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
    with tempfile.TemporaryDirectory() as scratch, single_process_validation(), threads_kept():
        validator = DetectionValidator(dataloader=loader, save_dir=Path(scratch), args=args)
        build = validator.get_dataloader  # its errors, and only those, mean the split has no usable images

        def get_dataloader(*build_args: Any) -> Any:
            with split_errors(args["split"]):
                return build(*build_args)

        validator.get_dataloader = get_dataloader
        stats = validator(model=model)
    model.train(was_training)
    if loader is None:  # a loader of ours warned when it was built
        warn_skipped(validator.dataloader.dataset, args["split"], len(validator.data["names"]))
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
def threads_kept() -> Iterator[None]:
    """The process's torch CPU threads as they were before: ultralytics' validator, exporter and predictor call its
    ``select_device``, which on a CPU sets them to its own ``NUM_THREADS`` (``os.cpu_count() - 1``, from 1 to 8) for
    the rest of the process; every training step after the first validation ran on 1 thread of a 2-core machine."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def single_process_validation() -> Iterator[None]:
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


@api_function
def evaluate(
    weights: list[str],
    data: str,
    imgsz: int = EvalOptions.imgsz,
    batch: int = EvalOptions.batch,
    device: str = EvalOptions.device,
    split: str = EvalOptions.split,
    trust_checkpoint: bool = False,
    details: bool = False,
    allow_class_mismatch: bool = False,
) -> list[dict[str, Any]]:
    """One row per model: the imgsz validated at (``imgsz`` rounded up to the model's stride), params, GFLOPs (at
    that size), mAP50-95, mAP50, precision, recall, inference ms per image.

    Validation runs exactly as ``YOLO(w).val(data=..., imgsz=..., batch=..., split=...)`` does (rectangular
    batches, conf 0.001, IoU 0.7), so the numbers are the same. ``details`` adds per-class AP and the PR curve.
    A data yaml whose class list differs from a model's is refused (its numbers would be wrong) unless
    ``allow_class_mismatch``, which warns what is dropped.
    """
    opts = validated(EvalOptions, locals())
    dataset = load_data(opts.data, opts.split)  # one clear error for a bad yaml, before any model is read
    on = validator_device(opts.device)
    models = [(w, load_model(w, "weights", trust=opts.trust_checkpoint)) for w in opts.weights]
    for path, model in models:
        check_classes(path, class_names(model), dataset, opts)
    rows = []
    for path, model in models:
        # ultralytics rounds an imgsz up to the model's stride too, silently: say so, and count GFLOPs at that size
        imgsz = stride_multiple(opts.imgsz, int(model.stride.max()))
        args = {"data": opts.data, "imgsz": imgsz, "batch": opts.batch, "split": opts.split, "device": on}
        result = run_validator(model, args)
        row = {
            "model": str(path),
            "imgsz": imgsz,
            "params": count_params(model),
            "gflops": round(get_flops(model, imgsz), 2),
            **result.metrics,
            "ms_per_img": round(result.ms_per_img, 2),
        }
        if opts.details:
            row.update(per_class=result.per_class, pr={"recall": result.recall, "precision": result.precision})
        rows.append(row)
    return rows


def validator_device(spec: str) -> str:
    """The device as ultralytics' validator takes it ("cpu", "0"); a missing GPU is one clear error."""
    from .settings import select_device  # late: settings imports the engine, which imports this module

    if "," in spec:
        raise DistillError(f"--device {spec}: validation runs on one device; give one, e.g. --device 0")
    device = select_device(spec)
    return "cpu" if device.type == "cpu" else str(device.index or 0)


def check_classes(weights: str, have: list[str], data: dict[str, Any], opts: EvalOptions) -> None:
    """Refuse a data yaml whose class list differs from the model's, or (allowed) say loudly what the numbers lose:
    ultralytics matches classes by id and skips images whose labels have ids the yaml lacks."""
    want = list(data["names"].values())  # in id order (load_data)
    if have == want:
        return
    summary = f"'{weights}' has {len(have)} classes, data yaml '{opts.data}' {len(want)}"
    if not opts.allow_class_mismatch:
        raise DistillError(
            f"{summary} and the class lists differ, so mAP would be wrong; give the data yaml the model was trained "
            f"on (or --allow-class-mismatch to evaluate anyway)"
        )
    notes = "; ".join(mismatch_notes(have, want))
    warnings.warn(f"CLASS LISTS DIFFER, the numbers are not comparable: {summary}; {notes}", stacklevel=3)


def mismatch_notes(have: list[str], want: list[str]) -> list[str]:
    """What a validation with class list ``want`` (the yaml's) does to a model predicting ``have``."""
    renamed = [
        f"id {i} is '{a}' here, '{b}' in the yaml" for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b
    ]
    notes = renamed[:3] + ([f"and {len(renamed) - 3} more renamed ids"] if len(renamed) > 3 else [])
    if len(have) > len(want):
        extra = have[len(want) :]
        named = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        # images whose labels hold such ids are skipped by the dataset, which warns of it on its own (warn_skipped)
        notes.append(f"the model's classes {len(want)}+ ({named}) are not in the yaml: their detections match no label")
    if len(want) > len(have):
        notes.append(f"labels of ids {len(have)}+ ({len(want) - len(have)} classes) can never be matched")
    return notes
