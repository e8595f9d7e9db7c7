"""The options of the commands other than ``train`` (whose options are :class:`config.RunConfig`'s fields): one
dataclass each, checked by the same rules at the boundary (:func:`rules.validated`), and the valid values of every
schema in words (``describe_rules``, the README's safety section)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import (
    LAYERS,
    MAX_IMGSZ,
    Balance,
    LossSpec,
    Recipe,
    RunConfig,
    Schedule,
    blank_problem,
    imgsz_field,
    ranged,
)
from .rules import Rule, device_problem, is_file, rule

OUT_FOLDER = "a folder whose last part is a plain name (taken: out2...; not a file)"


def checkpoint_problem(value: str) -> str | None:
    return None if value.endswith(".pt") else "must be a .pt checkpoint (a model yaml would be untrained)"


def checkpoints_problem(value: list[str]) -> str | None:
    if not value:
        return "must name at least one checkpoint"
    problem = next(filter(None, map(checkpoint_problem, value)), None)
    if problem:
        return problem
    seen = [file_identity(v) for v in value]  # the same file twice would be one row, one curve, twice the time
    again = next((i for i, s in enumerate(seen) if s in seen[:i]), None)
    return None if again is None else f"names one file twice ('{value[seen.index(seen[again])]}', '{value[again]}')"


def file_identity(path: str) -> tuple[int, int] | str:
    """What makes two names one file: device and inode where it exists (a link or symlink is the file it names;
    without inodes, the path with symlinks resolved), else the absolute path."""
    try:
        stat = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return (stat.st_dev, stat.st_ino) if stat.st_ino else os.path.realpath(path)  # 0: no inodes on that filesystem


def image_file_problem(value: str) -> str | None:
    return None if is_file(value) else "must be an image file that exists"


def output_file_problem(value: str) -> str | None:
    """An export's target: a file's path (a blank or a path ending in / would export under another name)."""
    if not value.strip():
        return "must not be empty (leave it out to write beside the weights)"
    return "must name a file, not a folder (dir/model.onnx)" if value.endswith(("/", os.sep)) else None


def out_name_problem(value: str) -> str | None:
    return Rule(name=True).problem(Path(value).name) if value.strip() else "must not be empty"


@dataclass
class ProbeOptions:
    """``probe-channels`` / :func:`probe.probe_channels`."""

    teacher: str
    student: str
    imgsz: int = imgsz_field(640)
    layers: str | list[int] | None = field(default=None, metadata=LAYERS)
    recipe: str | None = None
    trust_checkpoint: bool = False


@dataclass
class EvalOptions:
    """``eval`` / :func:`evaluation.evaluate`."""

    weights: list[str] = field(metadata=rule(check=checkpoints_problem, text="one or more .pt checkpoints"))
    data: str = field(metadata=rule(check=blank_problem, text="a data yaml"))
    imgsz: int = imgsz_field(640)
    batch: int = ranged(16, ge=1)
    device: str = ranged("", check=device_problem, text="cpu, cuda, 0, cuda:1")
    split: str = ranged("val", name=True)
    trust_checkpoint: bool = False
    allow_class_mismatch: bool = False  # evaluate on a data yaml whose class list differs from the weights'
    details: bool = False  # per-class AP and the PR curve (eval)


@dataclass
class CompareOptions(EvalOptions):
    """``compare`` / :func:`comparison.compare`: the eval options plus the report folder."""

    out: str = ranged("runs/compare/exp", check=out_name_problem, text=OUT_FOLDER)
    samples: int = ranged(4, ge=0, le=64)


def _export_formats() -> tuple[str, ...]:
    from ultralytics.engine.exporter import export_formats  # late: ultralytics imports torch

    return tuple(f for f in export_formats()["Argument"] if f != "-")


@dataclass
class ExportOptions:
    """``export`` / :func:`exporter.export`."""

    weights: str = field(metadata=rule(check=checkpoint_problem, text="a .pt checkpoint"))
    format: str = ranged("onnx", choices=_export_formats, text="an ultralytics export format")
    imgsz: int = imgsz_field(640)
    output: str | None = field(default=None, metadata=rule(check=output_file_problem, text="a file path"))
    image: str | None = field(default=None, metadata=rule(check=image_file_problem, text="an image file"))
    trust_checkpoint: bool = False
    device: str = ranged("cpu", check=device_problem, text="cpu, cuda, 0, cuda:1")  # engine (TensorRT) needs a GPU


@dataclass
class DemoOptions:
    """``demo`` / :func:`demo.run_demo`."""

    out: str = ranged("runs/demo", check=out_name_problem, text=OUT_FOLDER)
    epochs: int = ranged(20, ge=1)
    n_train: int = ranged(256, ge=1)
    n_val: int = ranged(64, ge=1)
    imgsz: int = ranged(64, ge=64, le=MAX_IMGSZ)  # its students' coarsest maps (stride 32) train from 2x2 up
    seed: int = ranged(0, ge=0, le=2**31 - 1)


@dataclass
class SyntheticOptions:
    """:func:`data.make_synthetic_dataset` (the demo's data; Python API)."""

    root: str = ranged("", check=blank_problem, text="a new or empty folder")
    n_train: int = ranged(64, ge=1)
    n_val: int = ranged(16, ge=1)
    size: int = imgsz_field(128)
    seed: int = ranged(0, ge=0, le=2**31 - 1)


SCHEMA = {
    "train (`RunConfig`; every field through `--set`)": RunConfig,
    "recipe (`Recipe`)": Recipe,
    "each recipe term (`LossSpec`, `losses.NAME.*`)": LossSpec,
    "a term's schedule (`Schedule`, `losses.NAME.schedule.*`)": Schedule,
    "automatic balance (`Balance`, `balance.*`)": Balance,
    "probe-channels": ProbeOptions,
    "eval": EvalOptions,
    "compare": CompareOptions,
    "export": ExportOptions,
    "demo": DemoOptions,
    "make_synthetic_dataset (Python API)": SyntheticOptions,
}


def describe_rules() -> list[str]:
    """The valid values of every ranged field and loss parameter, one markdown line per schema (README, safety)."""
    from .losses import LOSSES, loss_params  # late: losses import torch

    def line(title: str, rules: dict[str, tuple[str, Rule]]) -> str:
        return f"- {title}: " + "; ".join(f"`{k}` ({tp}) {r.summary()}" for k, (tp, r) in rules.items())

    lines = [
        line(
            title, {f.name: (str(f.type), f.metadata["rule"]) for f in dataclasses.fields(cls) if "rule" in f.metadata}
        )
        for title, cls in SCHEMA.items()
    ]
    for name, cls in sorted(LOSSES.items()):
        if cls.param_rules:
            types = {k: type(v).__name__ for k, v in loss_params(cls).items()}
            lines.append(line(f"method `{name}`", {k: (types[k], r) for k, r in cls.param_rules.items()}))
    return lines
