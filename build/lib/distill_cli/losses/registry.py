"""Name -> loss class. Every method registers itself here; recipes refer to methods by these names."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DistillError

LOSSES: dict[str, type[DistillLoss]] = {}
SCHEDULE_KINDS = ("constant", "linear", "cosine")


@dataclass
class DistillContext:
    """What a loss may need besides the two tensors it compares; built once per step by the criterion.

    ``teacher_conf`` (B, A): the teacher's max sigmoid class score per anchor; ``fg_mask`` (B, A): anchors the
    detection assigner gave a ground-truth box (the student's positives); ``anchors`` (A, 2) anchor centres in grid
    units from ``make_anchors``; ``level_sizes``: (H, W) of each Detect level, to map per-anchor values to feature
    maps; ``gt_boxes`` (n, 4) normalised xywh ground-truth boxes of image ``gt_image`` (n,).
    """

    teacher_conf: torch.Tensor
    fg_mask: torch.Tensor | None
    anchors: torch.Tensor
    level_sizes: list[tuple[int, int]]
    gt_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    gt_image: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def score_map(self, height: int, width: int) -> torch.Tensor:
        """Teacher confidence as a (B, 1, H, W) map; from the Detect level of that size, else resized from P3."""
        maps = self.teacher_conf.split([h * w for h, w in self.level_sizes], dim=1)
        for (h, w), level in zip(self.level_sizes, maps, strict=True):
            if (h, w) == (height, width):
                return level.view(-1, 1, h, w)
        h, w = self.level_sizes[0]
        return nn.functional.interpolate(maps[0].view(-1, 1, h, w), size=(height, width), mode="bilinear")

    def box_mask(self, height: int, width: int) -> torch.Tensor:
        """(B, 1, H, W) mask, 1 where a cell centre lies inside a ground-truth box of that image."""
        device = self.teacher_conf.device
        ys = (torch.arange(height, device=device) + 0.5) / height  # cell centres, normalised
        xs = (torch.arange(width, device=device) + 0.5) / width
        mask = torch.zeros(self.teacher_conf.shape[0], 1, height, width, device=device)
        boxes = self.gt_boxes.to(device)
        half_w, half_h = boxes[:, 2, None, None] / 2, boxes[:, 3, None, None] / 2
        cx, cy = boxes[:, 0, None, None], boxes[:, 1, None, None]
        inside = ((ys[:, None] - cy).abs() <= half_h) & ((xs[None, :] - cx).abs() <= half_w)  # (n, H, W)
        for i in self.gt_image.unique().tolist():
            mask[int(i), 0] = inside[self.gt_image.to(device) == i].any(0).to(mask.dtype)
        return mask


class DistillLoss(nn.Module):
    """Base of all distillation losses. ``level`` says what it compares: ``feature`` maps or head ``output``."""

    level: str = "feature"
    name: str = ""


class FeatureLoss(DistillLoss):
    """Compares one student feature map with one teacher map. Owns the adapter that maps the student's channels to
    the teacher's (a trainable 1x1 conv, or identity when they already match), so adapters train and checkpoint with
    the student."""

    level = "feature"

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.adapter: nn.Module = (
            nn.Identity()
            if student_channels == teacher_channels
            else nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        return self.compare(self.adapter(student), teacher, ctx)

    def compare(self, student: torch.Tensor, teacher: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
        raise NotImplementedError


class OutputLoss(DistillLoss):
    """Compares the Detect head outputs: dicts with ``boxes`` (B, 4*reg_max, A) DFL logits and ``scores``
    (B, nc, A) class logits."""

    level = "output"

    def forward(
        self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], ctx: DistillContext
    ) -> torch.Tensor:
        raise NotImplementedError


def register(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    def wrap(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.name = name
        LOSSES[name] = cls
        return cls

    return wrap


def loss_params(cls: type[DistillLoss]) -> dict[str, object]:
    """The method's own parameters and their defaults (channel counts excluded: they come from probing)."""
    skip = {"self", "student_channels", "teacher_channels"}
    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items() if k not in skip}


def build_loss(spec_type: str, params: dict, student_channels: int = 0, teacher_channels: int = 0) -> DistillLoss:
    cls = LOSSES[spec_type]
    if cls.level == "feature":
        return cls(student_channels, teacher_channels, **params)
    return cls(**params)


def check_loss_spec(name: str, spec) -> None:  # spec: config.LossSpec
    """Reject unknown methods, parameters and schedule kinds, naming the valid choices."""
    if spec.type not in LOSSES:
        raise DistillError(f"unknown loss '{spec.type}' for term '{name}'; valid losses: {', '.join(sorted(LOSSES))}")
    valid = loss_params(LOSSES[spec.type])
    unknown = sorted(set(spec.params) - set(valid))
    if unknown:
        listed = ", ".join(["weight", "schedule", "layers", "type", *valid]) or "none"
        raise DistillError(f"loss '{spec.type}' has no parameter '{unknown[0]}'; valid: {listed}")
    if spec.schedule.kind not in SCHEDULE_KINDS:
        raise DistillError(
            f"term '{name}': schedule kind '{spec.schedule.kind}' unknown; valid: {', '.join(SCHEDULE_KINDS)}"
        )
    if LOSSES[spec.type].level == "output" and spec.layers is not None:
        raise DistillError(f"term '{name}': '{spec.type}' distils head outputs and takes no 'layers'")
