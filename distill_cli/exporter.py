"""``export``: the student through ultralytics' exporter, checked against PyTorch on a sample image."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from ultralytics import YOLO
from ultralytics.engine.exporter import export_formats
from ultralytics.utils import LOGGER

from .data import _draw_image
from .errors import EXIT_RUNTIME, DistillError
from .evaluation import threads_kept, validator_device
from .models import load_model, stride_multiple
from .options import ExportOptions
from .rules import api_function, validated
from .runlog import check_creatable, first_missing, removed_on_failure

# formats ultralytics 8.4's exporter always quantizes to INT8, calibrating on a data yaml's images
CALIBRATED = frozenset({"axelera", "deepx", "edgetpu", "hailo", "imx", "qnn", "xilinx"})


@api_function
def export(
    weights: str,
    format: str = ExportOptions.format,
    imgsz: int = ExportOptions.imgsz,
    output: str | Path | None = None,
    image: str | None = None,
    trust_checkpoint: bool = False,
    device: str = ExportOptions.device,
) -> dict[str, Any]:
    """Export ``weights`` to ``output`` (default: beside the weights); never overwrites an existing file.

    For ONNX, runs the file with onnxruntime and PyTorch on one image (``image`` or a drawn one) and reports the
    largest absolute difference of the raw outputs. The target appears only when the export (and the check) succeeded.
    """
    opts = validated(ExportOptions, locals())
    on = validator_device(opts.device)
    if opts.format == "engine" and on == "cpu":  # ultralytics' exporter refuses it after loading: bad input, first
        raise DistillError("--format engine (TensorRT) exports on a GPU; pass --device 0")
    if opts.format in CALIBRATED:  # without images of ours, ultralytics would download its own (coco8)
        raise DistillError(
            f"--format {opts.format} is INT8 only, calibrated on images of the data, which export does not take; "
            f"use ultralytics with your data yaml: yolo export model={shlex.quote(opts.weights)} "
            f"format={opts.format} imgsz={opts.imgsz} data=DATA"
        )
    if opts.format == "onnx":
        check_onnxruntime()
    model = load_model(opts.weights, "weights", trust=opts.trust_checkpoint)  # the safe load vets the file first
    imgsz = stride_multiple(opts.imgsz, int(model.stride.max()))  # the size ultralytics' exporter would use
    suffix = dict(zip(*(export_formats()[k] for k in ("Argument", "Suffix")), strict=True))[opts.format]
    stem = Path(opts.weights).with_suffix("")
    target = Path(opts.output) if opts.output else stem.with_name(stem.name + suffix)
    check_target(target, named=bool(opts.output))
    x = sample_input(imgsz, opts.image) if opts.format == "onnx" else None
    result: dict[str, Any] = {"weights": opts.weights, "format": opts.format, "file": str(target), "imgsz": imgsz}
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / Path(opts.weights).name
        shutil.copy2(opts.weights, copy)
        exported = run_exporter(copy, opts.format, imgsz, on)
        if x is not None:
            difference = onnx_parity(opts.weights, exported, x)
            if not np.isfinite(difference):  # a NaN difference would be reported as a number, the file kept
                raise DistillError(
                    f"the ONNX check failed: the outputs of {opts.weights} or its ONNX file hold NaN or inf (an "
                    "overflow in the model or the exported graph); nothing written",
                    EXIT_RUNTIME,
                )
            result["max_abs_diff"] = difference
        check_target(target, named=bool(opts.output))  # again: another command may have written it meanwhile
        # a full disk, the folder changed under us, a stop: no part of the file (or of a folder made for it) is left
        with removed_on_failure(target, first_missing(target.parent)):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(exported), target)  # a copy across filesystems: it can be cut short
            except OSError as e:
                raise DistillError(f"cannot write '{target}' ({e.strerror or e})", EXIT_RUNTIME) from e
    return result


def run_exporter(weights: Path, fmt: str, imgsz: int, device: str) -> Path:
    """The file ultralytics' exporter writes for ``weights``. A format whose package is not installed (and that
    ultralytics could not install: offline, or ``YOLO_AUTOINSTALL=false``) is bad input; any other failure is the
    export's."""
    try:
        with threads_kept(), failure_line_dropped():
            return Path(YOLO(str(weights), task="detect").export(format=fmt, imgsz=imgsz, device=device))
    except Exception as e:  # the exporter raises many kinds (missing packages, unsupported ops, failed conversions)
        package = missing_package(e)
        if package:
            raise DistillError(
                f"--format {fmt} needs the Python module '{package}', which is not installed here and ultralytics "
                f"could not install (offline, or YOLO_AUTOINSTALL=false): install the package that provides it "
                f"(ultralytics' export docs name it), then export again"
            ) from e
        raise DistillError(f"export to {fmt} failed: {type(e).__name__}: {e}", EXIT_RUNTIME) from e


def missing_package(error: Exception) -> str | None:
    """The package an import could not find, when it is not installed at all; None for any other error, a broken
    install of a package that is there, or a module missing from ultralytics or torch themselves."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    package = error.name.split(".")[0]
    return None if package in ("ultralytics", "torch") or importlib.util.find_spec(package) else package


class _ExportFailureFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "export failure" not in record.getMessage()


@contextlib.contextmanager
def failure_line_dropped() -> Iterator[None]:
    """Ultralytics' exporter logs its failure before raising it; the command's own error line says it, once."""
    drop = _ExportFailureFilter()
    LOGGER.addFilter(drop)
    try:
        yield
    finally:
        LOGGER.removeFilter(drop)


def check_target(target: Path, named: bool) -> None:
    """Bad input before any work: a target that exists (nothing is overwritten), a folder that cannot be made, or a
    name longer than the filesystem takes."""
    try:
        exists = target.exists() or target.is_symlink()  # a dangling link too: the export would replace it
    except OSError as e:
        raise DistillError(f"--output '{target}': {e.strerror}") from e
    if exists and named and target.is_dir():  # '--output .': no advice to remove the folder
        raise DistillError(f"--output '{target}' is a folder; name a new path in it (DIR/NAME)")
    if exists:
        advice = "remove it or name another --output" if named else "pass --output to write elsewhere"
        raise DistillError(f"'{target}' already exists; {advice} (nothing is overwritten)")
    existing = check_creatable(target.parent, "the export", "--output PATH")
    try:  # a folder the system calls writable that takes no file (/proc) failed after the whole export, exit 3
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise DistillError(f"cannot write the export under '{existing}' ({e.strerror}); use --output PATH") from e
    try:
        longest = os.pathconf(existing, "PC_NAME_MAX")
    except (AttributeError, ValueError, OSError):  # no pathconf (not POSIX), or the filesystem does not say
        longest = 255
    if any(len(os.fsencode(part)) > longest for part in target.parts):
        raise DistillError(f"--output '{target}': a name in it is longer than {longest} bytes")


def sample_input(imgsz: int, image: str | None) -> torch.Tensor:
    if image:
        picture = cv2.imread(image)
        if picture is None:
            raise DistillError(f"cannot read image '{image}'")
    else:
        picture, _ = _draw_image(np.random.default_rng(0), imgsz)
    picture = cv2.resize(picture, (imgsz, imgsz))[:, :, ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
    return torch.from_numpy(np.ascontiguousarray(picture)).float().unsqueeze(0) / 255


def check_onnxruntime() -> None:
    """Bad input before any work: the ONNX check runs the file with onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise DistillError(
            "--format onnx checks the file with onnxruntime, which is not installed here: pip install onnxruntime"
        )


def onnx_parity(weights: str, onnx_file: Path, x: torch.Tensor) -> float:
    import onnxruntime

    model = YOLO(weights, task="detect").model.float().eval().fuse()
    with torch.no_grad():
        reference = model(x)[0].numpy()
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
    return float(np.abs(output - reference).max())
