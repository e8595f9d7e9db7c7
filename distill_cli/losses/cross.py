"""Cross-head distillation: the student's features are judged by the teacher's own head."""

from __future__ import annotations

import torch
from torch import nn

from ..rules import Rule
from .output import (
    ANCHOR_WEIGHTS,
    anchor_weights,
    box_agreement,
    box_divergence,
    class_divergence,
    weighted_mean,
)
from .registry import CrossLoss, DistillContext, register


@register("crosskd")
class CrossKD(CrossLoss):
    """CrossKD: Cross-Head Knowledge Distillation (Wang et al., CVPR 2024, arXiv:2306.11369).

    Each Detect input of the student goes through a 1x1 adapter to the teacher's width, takes the teacher's
    per-channel statistics (``align_scale`` of the official code: ``(x - mean_s) / std_s * std_t + mean_t`` over
    batch and positions) and then runs through the teacher's frozen one-to-many head. (Of an end-to-end head only
    that branch: an end-to-end head keeps its one-to-one branch's gradient out of the features it reads, and through
    the teacher's one-to-one head, called directly, that sparse one-anchor-per-object signal would reach them.)
    (The official code feeds the student's head-internal features to the teacher's last head convs; a YOLO head has
    two convs per branch, and here the whole teacher head reads the student's Detect inputs.)
    Those cross-head predictions are distilled towards the teacher's own: ``L = cls + box_weight * box``, with
    ``cls = sum_{a,c} BCE(x_ac, p_t) |sigma(x_ac) - p_t| / N_pos`` (official weight 1) and ``box`` the weighted mean
    of LD over the DFL bins (official weight 4, temperature 1, all anchors weighted by the teacher's confidence), or
    of 1 - IoU + L1 for reg_max 1 heads (YOLO26). The gradient reaches the student only through the teacher's head:
    it learns features that the teacher's head reads correctly, and its own head keeps the ground-truth targets.
    """

    param_rules = {"temperature": Rule(gt=0), "box_weight": Rule(ge=0), "box_weight_by": Rule(choices=ANCHOR_WEIGHTS)}

    def __init__(
        self,
        channels: list[tuple[int, int]],
        temperature: float = 1.0,
        box_weight: float = 4.0,
        box_weight_by: str = "teacher_conf",
        reg_max: int = 16,
    ) -> None:
        super().__init__(channels)
        self.temperature, self.box_weight, self.reg_max = temperature, box_weight, reg_max
        self.box_weight_by = box_weight_by

    def forward(
        self,
        student_feats: list[torch.Tensor],
        teacher_head: nn.Module,
        teacher: dict[str, dict[str, torch.Tensor]],
        contexts: dict[str, DistillContext],
    ) -> torch.Tensor:
        teacher_feats = next(iter(teacher.values()))["feats"]
        x = [
            align_scale(adapter(f).float(), t.float())
            for adapter, f, t in zip(self.adapters, student_feats, teacher_feats, strict=True)
        ]
        dtype = next(teacher_head.parameters()).dtype  # the teacher runs in bf16/fp16 under AMP
        with torch.autocast(x[0].device.type, dtype=dtype, enabled=dtype != torch.float32):
            cross = teacher_head.forward_head(x, **teacher_head.one2many)
        return self.compare(cross, teacher["one2many"], contexts["one2many"])

    def compare(self, cross: dict, teacher: dict, ctx: DistillContext) -> torch.Tensor:
        cls = class_divergence(cross["scores"], teacher["scores"], "qfl", self.temperature).sum() / ctx.positives
        if self.reg_max > 1:
            box = box_divergence(cross["boxes"], teacher["boxes"], self.temperature)
        else:
            box = box_agreement(cross["boxes"], teacher["boxes"], ctx, self.reg_max, "ciou", 1.0)
        return cls + self.box_weight * weighted_mean(box, anchor_weights(self.box_weight_by, ctx))


def align_scale(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The student map with the teacher's per-channel mean and standard deviation (over batch and positions)."""
    dims = (0, 2, 3)  # population statistics: a single position (P5 of a tiny image) must not give NaN
    mean_s, std_s = student.mean(dims, keepdim=True), student.std(dims, keepdim=True, correction=0)
    mean_t, std_t = teacher.mean(dims, keepdim=True), teacher.std(dims, keepdim=True, correction=0)
    return (student - mean_s) / (std_s + 1e-6) * std_t + mean_t
