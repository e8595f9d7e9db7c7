"""Feature capture and layer pairing, shared by ``probe-channels`` and ``train``.

Layers are addressed by their index in ``model.model`` (the numbers ultralytics prints in its model summary).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from ultralytics.nn.modules.head import Detect

from .errors import DistillError

LAYER_GROUPS = ("head_inputs", "neck", "backbone", "all")


class FeatureHooks:
    """Forward hooks on ``model.model[i]`` that keep a *reference* to each output, keyed by layer index.

    Use ``pop()`` once per forward to take the outputs and leave the store empty (no tensor outlives its step).
    Register on the live student after its EMA copy is made: a deepcopy of hooked modules would copy the store.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int]) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = [model.model[i].register_forward_hook(self._hook(i)) for i in sorted(set(layers))]

    def _hook(self, index: int):
        def store(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[index] = output

        return store

    def pop(self) -> dict[int, torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs = {}

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def as_rows(feature: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C): each position is a sample, channels its features."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


@dataclass
class LayerInfo:
    index: int
    module: str
    channels: int
    height: int
    width: int
    stride: int
    section: str  # backbone | neck


@dataclass
class Pair:
    student: int
    teacher: int
    student_channels: int
    teacher_channels: int
    stride: int

    @property
    def adapter(self) -> str:
        if self.student_channels == self.teacher_channels:
            return f"{self.student_channels} -> {self.teacher_channels}, identity"
        return f"{self.student_channels} -> {self.teacher_channels}, 1x1 conv"

    def as_dict(self) -> dict:
        return {**asdict(self), "adapter": self.adapter}


def detect_head(model: nn.Module) -> Detect:
    head = model.model[-1]
    if not isinstance(head, Detect):
        raise DistillError(f"model's last layer is {type(head).__name__}, not a Detect head")
    return head


@torch.no_grad()
def blank_forward(model: nn.Module, size: int) -> Any:
    """The output of one eval-mode forward of a blank ``size`` x ``size`` image, in the model's dtype and on its
    device; every module's train/eval mode is put back after it (a frozen BatchNorm stays in eval), also on failure."""
    modes = {module: module.training for module in model.modules()}
    param = next(model.parameters())
    try:
        return model.eval()(torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
    finally:
        for module, training in modes.items():
            module.train(training)


def probe_layers(model: nn.Module, imgsz: int) -> list[LayerInfo]:
    """One dummy forward with hooks on every layer; returns each layer that yields a single 4D feature map."""
    head = detect_head(model)
    backbone_len = len(getattr(model, "yaml", {}).get("backbone", [])) or head.f[0]
    layers = range(len(model.model) - 1)
    with FeatureHooks(model, layers) as hooks:
        blank_forward(model, imgsz)
        outputs = hooks.pop()
    infos = []
    for i in layers:
        out = outputs.get(i)
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            _, c, h, w = out.shape
            section = "backbone" if i < backbone_len else "neck"
            infos.append(LayerInfo(i, type(model.model[i]).__name__, c, h, w, imgsz // h, section))
    return infos


def select_layers(model: nn.Module, infos: list[LayerInfo], selection: str | list) -> list[LayerInfo]:
    """Layers named by a group (head_inputs, neck, backbone, all) or a list of indices."""
    by_index = {info.index: info for info in infos}
    if isinstance(selection, str):
        if selection not in LAYER_GROUPS:
            raise DistillError(
                f"unknown layer group '{selection}'; valid: {', '.join(LAYER_GROUPS)} or a list of indices"
            )
        if selection == "head_inputs":
            return [by_index[i] for i in detect_head(model).f]
        return [info for info in infos if selection in ("all", info.section)]
    missing = [i for i in selection if int(i) not in by_index]
    if missing:
        raise DistillError(f"layer {missing[0]} has no feature map; candidates: {', '.join(map(str, by_index))}")
    return [by_index[int(i)] for i in selection]


def pair_layers(
    student: nn.Module,
    teacher: nn.Module,
    student_infos: list[LayerInfo],
    teacher_infos: list[LayerInfo],
    selection: str | list,
) -> list[Pair]:
    """Pair each selected student layer with a teacher layer of the same stride.

    Detect inputs pair level by level. Otherwise each student layer takes the teacher layer of equal stride (and
    size) whose relative depth in its model is closest; this holds across families (v8 <-> 11) and widths.
    """
    chosen = select_layers(student, student_infos, selection)
    if selection == "head_inputs":
        partners = select_layers(teacher, teacher_infos, selection)
        if len(partners) != len(chosen):
            raise DistillError("teacher and student Detect heads have a different number of levels; pick --layers")
    else:
        partners = [_closest_partner(info, len(student.model), teacher_infos, len(teacher.model)) for info in chosen]
    pairs = []
    for s, t in zip(chosen, partners, strict=True):
        if (s.height, s.width) != (t.height, t.width):
            raise DistillError(
                f"student layer {s.index} ({s.height}x{s.width}) and teacher layer {t.index} "
                f"({t.height}x{t.width}) differ in size; pick layers of equal stride"
            )
        pairs.append(Pair(s.index, t.index, s.channels, t.channels, s.stride))
    return pairs


def _closest_partner(info: LayerInfo, student_depth: int, teacher_infos: list[LayerInfo], teacher_depth: int):
    same_size = [t for t in teacher_infos if (t.height, t.width) == (info.height, info.width)]
    if not same_size:
        raise DistillError(f"teacher has no layer at stride {info.stride} to pair with student layer {info.index}")
    return min(same_size, key=lambda t: abs(t.index / teacher_depth - info.index / student_depth))


def parse_layers(text: str | None) -> str | list[int] | None:
    """CLI form: a group name or comma-separated indices ("15,18,21")."""
    if text is None:
        return None
    text = text.strip()
    if text in LAYER_GROUPS:
        return text
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch("-?[0-9]+", part) for part in parts):  # int() also reads "1_5" and fullwidth digits
        raise DistillError(f"--layers '{text}': give a group ({', '.join(LAYER_GROUPS)}) or indices like 15,18,21")
    return [int(part) for part in parts]
