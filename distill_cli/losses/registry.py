"""Name -> loss class. Every method registers itself here; recipes refer to methods by these names."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import SCHEDULE_KINDS  # noqa: F401  (re-exported)
from ..errors import DistillError
from ..rules import Rule, checked

LOSSES: dict[str, type[DistillLoss]] = {}


@dataclass
class DistillContext:
    """What a loss may need besides the two tensors it compares; built once per step by the criterion.

    ``teacher_conf`` (B, A): the teacher's max sigmoid class score per anchor; ``fg_mask`` (B, A): anchors the
    detection assigner gave a ground-truth box (the student's positives); ``anchors`` (A, 2) anchor centres in grid
    units from ``make_anchors``; ``level_sizes``: (H, W) of each of the teacher's Detect levels, to map
    ``teacher_conf`` to feature maps; ``gt_boxes`` (n, 4) normalised xywh ground-truth boxes of image ``gt_image``
    (n,); ``strides`` (A,) each anchor's stride in pixels; ``imgsz`` (H, W) of the batch.
    """

    teacher_conf: torch.Tensor
    fg_mask: torch.Tensor | None
    anchors: torch.Tensor
    level_sizes: list[tuple[int, int]]
    gt_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    gt_image: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    strides: torch.Tensor | None = None
    imgsz: tuple[int, int] = (0, 0)

    @property
    def positives(self) -> torch.Tensor:
        """Anchors the assigner made positive, at least 1 per image (the avg_factor of BCKD/CrossKD): the count output
        terms are normalised by, as ultralytics normalises its class loss by the assigned target mass rather than by
        the anchor grid; an image without objects still counts 1, so a background-only batch does not spike."""
        if self.fg_mask is None:
            return torch.full((), float(self.teacher_conf.shape[0]), device=self.teacher_conf.device)
        return self.fg_mask.sum(1).clamp(min=1).sum().to(self.teacher_conf.dtype)

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
    """Base of all distillation losses. ``level`` says what it compares: ``feature`` maps, head ``output``, or
    ``cross``: student features run through the teacher's head."""

    level: str = "feature"
    name: str = ""
    # valid values of the method's parameters, checked when a recipe is read; a bool parameter needs none
    param_rules: ClassVar[dict[str, Rule]] = {}

    @classmethod
    def check_head(cls, term: str, student_head: nn.Module, teacher_head: nn.Module, params: dict[str, Any]) -> None:
        """Raise DistillError when this method, with the term's ``params``, cannot apply to these Detect heads (e.g.
        no DFL bins)."""

    @classmethod
    def check_params(cls, term: str, params: dict[str, Any]) -> None:
        """Raise DistillError for parameter values that are each valid but make no sense together."""


class FeatureLoss(DistillLoss):
    """Compares one student feature map with one teacher map. Owns the adapter that maps the student's channels to
    the teacher's (a trainable 1x1 conv, or identity when they already match), so adapters train and checkpoint with
    the student. A new run starts each conv as the least-squares map between the two layers (``adapter_fit.py``)."""

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


class CrossLoss(DistillLoss):
    """Runs the student's Detect inputs, each through an adapter to the teacher's width, through the teacher's
    frozen head, and compares those predictions with the teacher's own. Owns one adapter per Detect level, fitted
    at the start of a new run as the feature terms' are (``adapter_fit.py``)."""

    level = "cross"

    def __init__(self, channels: list[tuple[int, int]]) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(nn.Identity() if s == t else nn.Conv2d(s, t, kernel_size=1) for s, t in channels)

    def forward(
        self,
        student_feats: list[torch.Tensor],
        teacher_head: nn.Module,
        teacher: dict[str, dict[str, torch.Tensor]],
        contexts: dict[str, DistillContext],
    ) -> torch.Tensor:
        raise NotImplementedError


def register(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    def wrap(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.name = name
        LOSSES[name] = cls
        return cls

    return wrap


BUILT_IN = {"self", "student_channels", "teacher_channels", "channels", "reg_max"}  # filled by the distiller


def loss_params(cls: type[DistillLoss]) -> dict[str, object]:
    """The method's own parameters and their defaults (channels and reg_max excluded: they come from probing)."""
    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items() if k not in BUILT_IN}


def build_loss(
    spec_type: str, params: dict, student_channels: int = 0, teacher_channels: int = 0, **probed: object
) -> DistillLoss:
    """An instance of method ``spec_type`` with ``params`` checked against its rules; ``probed`` passes what the
    distiller measured (``channels`` of each Detect input for cross-head methods, the head's ``reg_max``) to the
    methods that take it."""
    cls = LOSSES[spec_type]
    params = checked_params(spec_type, params, spec_type)
    accepted = inspect.signature(cls.__init__).parameters
    extra = {k: v for k, v in probed.items() if k in accepted}
    if cls.level == "feature":
        return cls(student_channels, teacher_channels, **params, **extra)
    return cls(**params, **extra)


def checked_params(method: str, params: dict, where: str) -> dict:
    """``params`` of method ``method``, each checked against the type of its default and its rule; an unknown
    parameter is an error that lists the valid ones."""
    valid = loss_params(LOSSES[method])
    unknown = sorted(set(params) - set(valid), key=str)  # YAML keys may be ints beside strings
    if unknown:
        listed = ", ".join(["weight", "schedule", "layers", "type", *valid]) or "none"
        raise DistillError(f"loss '{method}' has no parameter '{unknown[0]}'; valid: {listed}")
    rules = LOSSES[method].param_rules
    return {k: checked(type(valid[k]), v, f"{where}.{k}", rules.get(k)) for k, v in params.items()}


def check_loss_spec(name: str, spec) -> None:  # spec: config.LossSpec
    """Reject unknown methods and parameters, naming the valid choices, and parameter values outside their rules,
    and a term name the terms' module dict cannot hold."""
    if not name or "." in name or hasattr(nn.ModuleDict(), name):  # ModuleDict's own KeyError, after the data scan
        raise DistillError(
            f"term name '{name}' cannot be used: a term name is a word without '.', and not one of torch's module "
            "attributes (training, forward, eval, keys, ...); rename it"
        )
    if spec.type not in LOSSES:
        raise DistillError(f"unknown loss '{spec.type}' for term '{name}'; valid losses: {', '.join(sorted(LOSSES))}")
    spec.params = checked_params(spec.type, spec.params, f"losses.{name}")
    LOSSES[spec.type].check_params(name, spec.params)
    if LOSSES[spec.type].level != "feature" and spec.layers is not None:
        raise DistillError(f"term '{name}': '{spec.type}' distils head outputs and takes no 'layers'")
