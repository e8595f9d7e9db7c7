"""``export``: the student through ultralytics' exporter, checked against PyTorch on a sample image."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from ultralytics import YOLO

from .data import _draw_image
from .errors import EXIT_RUNTIME, DistillError
from .models import load_model


def export(
    weights: str,
    format: str = "onnx",
    imgsz: int = 640,
    output: str | Path | None = None,
    image: str | None = None,
    trust_checkpoint: bool = False,
) -> dict[str, Any]:
    """Export ``weights`` to ``output`` (default: beside the weights); never overwrites an existing file.

    For ONNX, runs the file with onnxruntime and PyTorch on one image (``image`` or a drawn one) and reports the
    largest absolute difference of the raw outputs.
    """
    load_model(weights, "weights", trust=trust_checkpoint)  # the safe load vets the file before ultralytics opens it
    suffix = {"onnx": ".onnx", "torchscript": ".torchscript", "openvino": "_openvino_model"}.get(format, f".{format}")
    target = Path(output) if output else Path(weights).with_suffix("").with_name(Path(weights).stem + suffix)
    if target.exists():
        raise DistillError(f"'{target}' already exists; pass --output to write elsewhere (nothing is overwritten)")
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / Path(weights).name
        shutil.copy2(weights, copy)
        try:
            exported = Path(YOLO(str(copy), task="detect").export(format=format, imgsz=imgsz, device="cpu"))
        except Exception as e:  # the exporter raises many kinds (missing packages, unsupported ops)
            raise DistillError(f"export to {format} failed: {type(e).__name__}: {e}", EXIT_RUNTIME) from e
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(exported), target)
    result: dict[str, Any] = {"weights": str(weights), "format": format, "file": str(target), "imgsz": imgsz}
    if format == "onnx":
        result["max_abs_diff"] = onnx_parity(weights, target, imgsz, image)
    return result


def sample_input(imgsz: int, image: str | None) -> torch.Tensor:
    if image:
        picture = cv2.imread(image)
        if picture is None:
            raise DistillError(f"cannot read image '{image}'")
    else:
        picture, _ = _draw_image(np.random.default_rng(0), imgsz)
    picture = cv2.resize(picture, (imgsz, imgsz))[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
    return torch.from_numpy(np.ascontiguousarray(picture)).float().unsqueeze(0) / 255


def onnx_parity(weights: str, onnx_file: Path, imgsz: int, image: str | None) -> float:
    import onnxruntime

    x = sample_input(imgsz, image)
    model = YOLO(weights, task="detect").model.float().eval().fuse()
    with torch.no_grad():
        reference = model(x)[0].numpy()
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
    return float(np.abs(output - reference).max())
