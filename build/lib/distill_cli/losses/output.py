"""Output-level distillation on the Detect head: class scores, DFL box distributions, decoded boxes.

Inputs are the head's raw training outputs: ``scores`` (B, nc, A) class logits and ``boxes`` (B, 4*reg_max, A) DFL
logits over A anchors of all levels. Each loss is a weighted mean over anchors, so it does not grow with the image
size or batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import dist2bbox

from ..errors import DistillError
from .registry import DistillContext, OutputLoss, register

ANCHOR_WEIGHTS = ("none", "teacher_conf", "positives")


def anchor_weights(mode: str, ctx: DistillContext, like: torch.Tensor) -> torch.Tensor:
    """(B, A) weight per anchor: 1, the teacher's max class probability, or the assigner's positives."""
    if mode == "teacher_conf":
        return ctx.teacher_conf.to(like.dtype)
    if mode == "positives":
        if ctx.fg_mask is None:
            return torch.zeros_like(ctx.teacher_conf, dtype=like.dtype)
        return ctx.fg_mask.to(like.dtype)
    return torch.ones_like(ctx.teacher_conf, dtype=like.dtype)


def weighted_mean(per_anchor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_anchor * weight).sum() / weight.sum().clamp(min=1e-6)


def _check_mode(value: str, valid: tuple[str, ...], what: str) -> str:
    if value not in valid:
        raise DistillError(f"{what} '{value}' unknown; valid: {', '.join(valid)}")
    return value


@register("cls_kd")
class ClassKD(OutputLoss):
    """Class-score distillation (Hinton et al. 2015, arXiv:1503.02531, adapted to sigmoid detectors).

    ``mode: bce`` treats each class as its own Bernoulli: ``KL(B(sigma(t/T)) || B(sigma(s/T)))`` summed over
    classes, which is BCE with the teacher's soft targets minus the teacher's entropy (same gradient, and 0 when the
    student equals the teacher). ``mode: kl``: softmax over classes, ``KL(p_t || p_s)``. Both are scaled by
    ``T^2`` and averaged over anchors weighted by ``weight_by`` (none, teacher_conf, positives).
    """

    def __init__(self, mode: str = "bce", temperature: float = 1.0, weight_by: str = "none") -> None:
        super().__init__()
        self.mode = _check_mode(mode, ("bce", "kl"), "cls_kd mode")
        self.weight_by = _check_mode(weight_by, ANCHOR_WEIGHTS, "cls_kd weight_by")
        self.temperature = temperature

    def forward(self, student: dict, teacher: dict, ctx: DistillContext) -> torch.Tensor:
        s = student["scores"].float() / self.temperature
        t = teacher["scores"].float() / self.temperature
        if self.mode == "bce":
            p_t = t.sigmoid()
            # KL of Bernoullis = BCE(s, p_t) - BCE(t, p_t); logits keep it stable where p is near 0 or 1
            kl = F.binary_cross_entropy_with_logits(s, p_t, reduction="none") - F.binary_cross_entropy_with_logits(
                t, p_t, reduction="none"
            )
            per_anchor = kl.sum(1)
        else:
            log_p_t = F.log_softmax(t, dim=1)
            per_anchor = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=1))).sum(1)
        weight = anchor_weights(self.weight_by, ctx, per_anchor)
        return weighted_mean(per_anchor, weight) * self.temperature**2


@register("dfl_kd")
class DFLKD(OutputLoss):
    """Localisation distillation (Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022,
    arXiv:2102.12252).

    Each box side is a distribution over ``reg_max`` bins (DFL); the student matches the teacher's softened one:
    ``T^2 * sum_sides KL(softmax(t/T) || softmax(s/T))``, averaged over anchors weighted by ``weight_by``
    (default teacher_conf: background anchors carry no box to learn).
    """

    def __init__(self, temperature: float = 1.0, weight_by: str = "teacher_conf") -> None:
        super().__init__()
        self.weight_by = _check_mode(weight_by, ANCHOR_WEIGHTS, "dfl_kd weight_by")
        self.temperature = temperature

    def forward(self, student: dict, teacher: dict, ctx: DistillContext) -> torch.Tensor:
        b, _, a = student["boxes"].shape
        s = student["boxes"].float().view(b, 4, -1, a) / self.temperature
        t = teacher["boxes"].float().view(b, 4, -1, a) / self.temperature
        log_p_t = F.log_softmax(t, dim=2)
        per_anchor = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=2))).sum((1, 2))
        weight = anchor_weights(self.weight_by, ctx, per_anchor)
        return weighted_mean(per_anchor, weight) * self.temperature**2


def decode_boxes(boxes: torch.Tensor, ctx: DistillContext) -> torch.Tensor:
    """DFL logits (B, 4*R, A) -> xyxy boxes (B, A, 4) in grid units (the expectation over bins)."""
    b, _, a = boxes.shape
    probs = boxes.float().view(b, 4, -1, a).softmax(2)
    bins = torch.arange(probs.shape[2], device=boxes.device, dtype=probs.dtype)
    distances = (probs * bins.view(1, 1, -1, 1)).sum(2).transpose(1, 2)  # (B, A, 4) ltrb
    return dist2bbox(distances, ctx.anchors.unsqueeze(0), xywh=False, dim=-1)


@register("box_kd")
class BoxKD(OutputLoss):
    """Box distillation: the student's decoded boxes regress onto the teacher's where the teacher is confident.

    ``L = sum_a w_a (1 - IoU(b_s, b_t)) / sum_a w_a`` with ``w_a = conf_a`` if ``conf_a > conf_thresh`` else 0
    (teacher-as-pseudo-label, cf. "Distilling Object Detectors via Decoupled Features" and LD's box branch);
    ``iou: ciou`` (default) or ``giou`` or ``iou``.
    """

    def __init__(self, conf_thresh: float = 0.5, iou: str = "ciou") -> None:
        super().__init__()
        self.iou = _check_mode(iou, ("iou", "giou", "ciou"), "box_kd iou")
        self.conf_thresh = conf_thresh

    def forward(self, student: dict, teacher: dict, ctx: DistillContext) -> torch.Tensor:
        conf = ctx.teacher_conf.float()
        weight = conf * (conf > self.conf_thresh)
        s_box = decode_boxes(student["boxes"], ctx)
        with torch.no_grad():
            t_box = decode_boxes(teacher["boxes"], ctx)
        iou = bbox_iou(s_box, t_box, xywh=False, GIoU=self.iou == "giou", CIoU=self.iou == "ciou").squeeze(-1)
        return weighted_mean(1.0 - iou, weight)
