"""Load teachers and students (checkpoint or yaml) safely; write student-only checkpoints atomically."""

from __future__ import annotations

import io
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from copy import deepcopy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics import __version__ as ULTRALYTICS_VERSION
from ultralytics import utils as ultralytics_utils
from ultralytics.nn.tasks import BaseModel, DetectionModel, guess_model_task, torch_safe_load
from ultralytics.utils import downloads

from . import __version__
from .errors import EXIT_RUNTIME, DistillError
from .features import blank_forward
from .rules import found, is_file, not_a_file, shown


def is_model_yaml(spec: str | Path) -> bool:
    """A model given as its yaml (built, untrained), not as a checkpoint."""
    return str(spec).endswith((".yaml", ".yml"))


def load_model(spec: str | Path, role: str = "model", nc: int | None = None, trust: bool = False) -> DetectionModel:
    """A float32 detection model from an ultralytics checkpoint (``.pt``) or a model yaml (``yolov8n.yaml``).

    Checkpoints load with ``torch.load(weights_only=True)`` against ultralytics' allow-list of model classes, so a
    crafted pickle cannot run code; ``trust=True`` opts into a full (unsafe) load.
    """
    spec = str(spec)
    if is_model_yaml(spec):
        return _build_from_yaml(spec, role, nc)
    path = fetch_named_model(spec, role) or Path(spec)
    if not is_file(path):
        advice = "a .pt checkpoint" + ("" if role == "weights" else " or a model yaml such as yolov8n.yaml")
        raise DistillError(f"{role} '{spec}' {not_a_file(path)}; give {advice}")
    if path.suffix != ".pt":
        raise DistillError(f"{role} '{spec}' is not a .pt checkpoint or a .yaml model definition")
    ckpt = read_checkpoint(path, role, trust)
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, nn.Module):
        raise DistillError(f"{role} '{spec}' holds no model; is it an ultralytics checkpoint?")
    if not isinstance(model, BaseModel):  # torch.save(model): ultralytics' loader keeps the model's layers alone
        raise DistillError(
            f"{role} '{spec}' is not an ultralytics checkpoint (a model saved with torch.save(model)?); save it with "
            "YOLO(...).save(path), or give a run's weights/best.pt"
        )
    if type(model) is not DetectionModel:  # Segmentation/Pose/OBB models subclass DetectionModel
        task = getattr(model, "task", None) or guess_model_task(model)
        raise DistillError(f"{role} '{spec}' is a {task} model; yolodistill distils detection models (task=detect)")
    missing = missing_part(model)
    if missing:
        problem = f"{role} '{spec}' holds a model without {missing} (an edited or damaged file)"
        raise DistillError(f"{problem}; use an intact copy")
    model = runs_forward(model, f"{role} '{spec}'")
    if not all_finite(model.state_dict().values()):
        raise DistillError(f"{role} '{spec}' holds NaN or infinite weights: no model to train, distil or evaluate")
    model.args = {**ckpt.get("train_args", {})} if isinstance(ckpt.get("train_args"), dict) else {}
    model.criterion = None
    return model


def missing_part(model: DetectionModel) -> str | None:
    """The part every detection model has and this one lacks or holds as something else (a checkpoint edited after
    it was saved), named for the error line; None when all are there."""
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    parts = {
        "its layers": head is not None,
        "its model definition (yaml)": isinstance(getattr(model, "yaml", None), dict),
        "its strides": isinstance(getattr(model, "stride", None), torch.Tensor),
        "its head's strides": isinstance(getattr(head, "stride", None), torch.Tensor),
        "class names for its head's classes": isinstance(names := getattr(model, "names", None), (dict, list))
        and len(names) == getattr(head, "nc", None),
    }
    return next((part for part, there in parts.items() if not there), None)


def runs_forward(model: DetectionModel, named: str) -> DetectionModel:
    """The model in float32, once it has run a forward pass on a small blank image: a checkpoint edited in a way no
    list of parts foresees (a head's ``reg_max`` or ``nc`` of None, a layer removed) fails here, as bad input, and
    not later inside ultralytics with a raw TypeError."""
    try:
        model = model.float()
        blank_forward(model, 2 * int(model.stride.max()))  # the coarsest maps 2 x 2: every layer runs, at little cost
    except Exception as e:  # an edited model can fail in any way: TypeError, AttributeError, RuntimeError, ...
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise DistillError(f"{named} holds a model that does not run (an edited or damaged file: {cause})") from e
    return model


def all_finite(tensors: Iterable[torch.Tensor], bound: float = math.inf) -> bool:
    """Whether every floating-point tensor holds only finite values, of magnitude at most ``bound`` if one is given
    (NaN fails both), in one read from the device."""
    checks = [
        t.isfinite().all() if bound == math.inf else t.detach().abs().amax() <= bound
        for t in tensors
        if t.is_floating_point() and t.numel()
    ]
    return bool(torch.stack(checks).all()) if checks else True


def fetch_named_model(spec: str, role: str) -> Path | None:
    """An ultralytics model name (``yolo26n.pt``) with no such local file: ultralytics' weights dir, else its own
    download helper when online; offline, one line that says what to do. None for anything else."""
    if found(spec) is not None or Path(spec).name != spec or spec not in downloads.GITHUB_ASSETS_NAMES:
        return None
    cached = Path(ultralytics_utils.SETTINGS["weights_dir"]) / spec
    if cached.is_file():
        return cached
    if ultralytics_utils.env_bool("YOLO_OFFLINE") or not ultralytics_utils.is_online():
        raise DistillError(
            f"{role} '{spec}' is an ultralytics model name, but no such file is here and this machine is offline "
            f"(YOLO_OFFLINE=1 or no network): fetch it once online (unset YOLO_OFFLINE), or pass the path of a copy"
        )
    try:
        path = Path(downloads.attempt_download_asset(spec))
    except Exception as e:  # network errors come in many kinds
        raise DistillError(f"{role} '{spec}' could not be downloaded ({e}); pass the path of a local copy") from e
    if not path.is_file():
        raise DistillError(f"{role} '{spec}' could not be downloaded; pass the path of a local copy")
    return path


TRUST_ADVICE = "if you trust its author, pass --trust-checkpoint"


def read_checkpoint(path: Path, role: str, trust: bool, advice: str = TRUST_ADVICE) -> Any:
    """The unpickled file; ``advice`` says what to do with a file that references code outside the allow-list."""
    if trust:
        warnings.warn(
            f"loading {role} '{path}' with a full unpickle (--trust-checkpoint): it can run code", stacklevel=3
        )
    if not zipfile.is_zipfile(path):
        raise DistillError(
            f"{role} '{path}' is not a checkpoint (not a torch zip archive: truncated, text or another format)"
        )
    try:
        entry = damaged_entry(path)  # torch reads a file's bytes without checking them: a flipped bit loads
        if entry:
            raise DistillError(
                f"{role} '{path}' is damaged: its part '{entry}' does not match its checksum (a bad copy or disk); "
                f"use an intact copy"
            )
        return torch_safe_load(str(path), safe_only=not trust)[0]
    except TypeError as e:
        cause = e.__cause__  # the safe unpickler's refusal of a class, or its failure on damaged bytes
        if isinstance(cause, pickle.UnpicklingError) and "Weights only load failed" not in str(cause):
            raise DistillError(f"{role} '{path}' is not a loadable checkpoint (damaged: {cause})") from e
        if "outside the supported" in str(e):
            raise DistillError(
                f"{role} '{path}' references code outside the ultralytics/torch model classes and was not loaded; "
                f"{advice}"
            ) from e
        raise DistillError(f"{role} '{path}' is not a loadable checkpoint: {str(e).splitlines()[0]}") from e
    # AttributeError: ultralytics reads .model of whatever the file holds when it is not a dict (a bare tensor)
    except (
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        OSError,
        ModuleNotFoundError,
        AttributeError,
    ) as e:
        raise DistillError(f"{role} '{path}' is not a loadable checkpoint ({type(e).__name__}: {e})") from e


def damaged_entry(path: Path) -> str | None:
    """The first part of a torch zip archive whose bytes fail their stored CRC-32, or None; None too for a file
    written without checksums (``torch.serialization.set_crc32_options(False)`` stores 0 for every part)."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip() if any(info.CRC for info in archive.infolist()) else None


def stride_multiple(imgsz: int, stride: int) -> int:
    """``imgsz`` rounded up to a multiple of the models' largest stride, with a warning when that changes it."""
    size = max(stride, math.ceil(imgsz / stride) * stride)
    if size != imgsz:
        warnings.warn(f"imgsz {imgsz} is not a multiple of the stride {stride}; using {size}", stacklevel=2)
    return size


def _build_from_yaml(spec: str, role: str, nc: int | None) -> DetectionModel:
    try:
        model = DetectionModel(spec, nc=nc, verbose=False)
    except FileNotFoundError as e:
        known = "ultralytics knows e.g. yolov8n.yaml, yolo11s.yaml"
        raise DistillError(f"{role} yaml {shown(spec)} not found; {known}") from e
    except Exception as e:  # ultralytics raises many kinds for a malformed model yaml
        raise DistillError(f"{role} yaml '{spec}' does not build a model: {type(e).__name__}: {e}") from e
    task = guess_model_task(model)  # a classify/segment/pose/obb yaml builds a DetectionModel with another head
    if type(model) is not DetectionModel or task != "detect":
        raise DistillError(
            f"{role} yaml '{spec}' builds a {task or 'non-detection'} model; yolodistill distils detection models"
        )
    model.args = {}
    return model


def class_names(model: nn.Module) -> list[str]:
    names = getattr(model, "names", None) or {}
    return [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


UMASK = os.umask(0o022)  # read once (it can only be read by setting it), then put back
os.umask(UMASK)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; the file gets the mode any other new file would
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C or MemoryError: no temp file is left behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DistillError(
                f"could not write '{path}' ({e.strerror or e}); the previous file is intact", EXIT_RUNTIME
            ) from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_student(
    path: Path, model: nn.Module, train_args: dict, distill_meta: dict, resume: dict | None = None
) -> None:
    """A standard ultralytics checkpoint holding only the student (fp16), loadable with ``YOLO(path)``.

    ``train_args`` and ``distill_meta`` (teacher, recipe, our version, metrics) are plain data; ``resume`` (optimizer,
    adapters, EMA counters, RNG) is only present in an unfinished run's ``last.pt``.
    """
    student = deepcopy(model).half()
    student.criterion = None
    for module in student.modules():  # the live student carries the Distiller's feature hooks: not for a file
        module._forward_hooks.clear()
    student.args = dict(train_args)
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(),
        "version": ULTRALYTICS_VERSION,
        "model": student,
        "train_args": dict(train_args),
        "distill": {**distill_meta, "yolodistill_version": __version__},
    }
    if resume is not None:
        ckpt["resume"] = resume
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
