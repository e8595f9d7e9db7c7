"""Output-level distillation on the Detect head: class scores, DFL box distributions, decoded boxes.

Inputs are one branch of the head's raw training outputs: ``scores`` (B, nc, A) class logits and ``boxes``
(B, 4*reg_max, A): DFL logits when ``reg_max > 1``, plain ltrb distances in grid units when ``reg_max == 1``
(YOLO26). Every term is normalised the way ultralytics normalises the matching detection loss, so that a weight
means the same at any image size, batch size and number of classes: class terms sum over anchors and classes and
divide by the assigner's positive count (the class loss divides by the assigned target mass); box terms are
weighted means over the anchors that carry a box (the box and DFL losses are weighted means over positives), except
``bckd``'s, which divides by the positive count as its paper does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.utils.metrics import bbox_iou
from ultralytics.utils.tal import dist2bbox

from ..errors import DistillError
from ..rules import Rule
from .registry import DistillContext, OutputLoss, register

ANCHOR_WEIGHTS = ("none", "teacher_conf", "positives", "positives_conf")
IOU_KINDS = ("iou", "giou", "ciou")


def anchor_weights(mode: str, ctx: DistillContext) -> torch.Tensor:
    """(B, A) weight per anchor: 1, the teacher's max class probability, the assigner's positives, or both."""
    conf = ctx.teacher_conf.float()
    if mode in ("positives", "positives_conf"):
        if ctx.fg_mask is None:
            raise DistillError(f"weight_by: {mode} needs the assigner's positives, which this head does not give")
        fg = ctx.fg_mask.float()
        return fg * conf if mode == "positives_conf" else fg
    return conf if mode == "teacher_conf" else torch.ones_like(conf)


def weighted_mean(per_anchor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_anchor * weight).sum() / weight.sum().clamp(min=1e-6)


def class_divergence(s: torch.Tensor, t: torch.Tensor, mode: str, temperature: float = 1.0) -> torch.Tensor:
    """(B, A) divergence of the student's class logits from the teacher's, summed over classes, times T^2.

    ``bce``: each class its own Bernoulli, ``KL(B(sigma(t/T)) || B(sigma(s/T)))`` = BCE with the teacher's soft
    target minus the teacher's entropy (same gradient, 0 at agreement); ``qfl``: BCE with the teacher's soft target
    times ``|sigma(s) - sigma(t)|`` (the quality-focal form of CrossKD and BCKD: agreement, mostly background,
    weighs nothing); ``kl``: softmax over classes.
    """
    s, t = s.float() / temperature, t.float() / temperature
    if mode == "kl":
        log_p_t = F.log_softmax(t, dim=1)
        return (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=1))).sum(1) * temperature**2
    p_t = t.sigmoid()
    bce = F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
    if mode == "qfl":
        return (bce * (s.sigmoid() - p_t).abs()).sum(1) * temperature**2
    # KL of Bernoullis = BCE(s, p_t) - BCE(t, p_t); logits keep it stable where p is near 0 or 1
    return (bce - F.binary_cross_entropy_with_logits(t, p_t, reduction="none")).sum(1) * temperature**2


def box_divergence(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, A) LD: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` over the DFL bins, averaged over the 4 sides (as
    ultralytics averages its DFL loss over the sides)."""
    b, _, a = s.shape
    log_p_s = F.log_softmax(s.float().view(b, 4, -1, a) / temperature, dim=2)
    log_p_t = F.log_softmax(t.float().view(b, 4, -1, a) / temperature, dim=2)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(2).mean(1) * temperature**2


def distances(boxes: torch.Tensor, reg_max: int) -> torch.Tensor:
    """(B, 4*reg_max, A) head boxes -> (B, A, 4) ltrb distances in grid units (the DFL expectation, or as is)."""
    b, _, a = boxes.shape
    if reg_max == 1:
        return boxes.float().transpose(1, 2)
    probs = boxes.float().view(b, 4, reg_max, a).softmax(2)
    bins = torch.arange(reg_max, device=boxes.device, dtype=probs.dtype)
    return (probs * bins.view(1, 1, -1, 1)).sum(2).transpose(1, 2)


def box_agreement(s: torch.Tensor, t: torch.Tensor, ctx: DistillContext, reg_max: int, iou: str, l1: float):
    """(B, A) ``1 - IoU(b_s, b_t) + l1 * mean |d_s - d_t|`` with the teacher's boxes as targets (no gradient; the
    IoU part only where the teacher's box has an area); distances for L1 are image-normalised, as ultralytics' L1
    box loss of DFL-free heads."""
    d_s, d_t = distances(s, reg_max), distances(t, reg_max).detach()
    anchors = ctx.anchors.unsqueeze(0)
    # a reg_max 1 head's raw distances may be negative (early on, on the background): as boxes they would be inside
    # out, and the IoU of an inside-out box can exceed 1, so the IoU sees them clamped at 0. The student's clamp
    # passes its gradient straight through (a side below 0 is still pulled out); where the teacher's clamped box has
    # no area it has no box to teach, and the IoU (0 even at agreement) is left out; L1 pulls every side
    s_box = dist2bbox(d_s + (d_s.clamp(min=0) - d_s).detach(), anchors, xywh=False, dim=-1)
    t_box = dist2bbox(d_t.clamp(min=0), anchors, xywh=False, dim=-1)
    has_box = (t_box[..., 2:] > t_box[..., :2]).all(-1)
    loss = (1.0 - bbox_iou(s_box, t_box, xywh=False, GIoU=iou == "giou", CIoU=iou == "ciou").squeeze(-1)) * has_box
    if l1 > 0:
        scale = ctx.strides.view(1, -1, 1) / torch.tensor(ctx.imgsz * 2, device=s.device)[[1, 0, 1, 0]]
        loss = loss + l1 * ((d_s - d_t) * scale).abs().mean(-1)
    return loss


@register("cls_kd")
class ClassKD(OutputLoss):
    """Class-score distillation (Hinton et al. 2015, arXiv:1503.02531, adapted to sigmoid detectors).

    ``L = sum_a w_a * D_a / N_pos``: ``D_a`` the class divergence of anchor ``a`` (``mode: bce``, each class a
    Bernoulli; ``qfl``, BCE x |p_s - p_t| as in CrossKD/BCKD; ``kl``, softmax over classes; times T^2), ``w_a``
    from ``weight_by`` (none, teacher_conf,
    positives, positives_conf) and ``N_pos`` the assigner's positive count, as ultralytics' class loss sums BCE
    over anchors and classes and divides by the assigned target mass.
    """

    param_rules = {
        "mode": Rule(choices=("bce", "qfl", "kl")),
        "temperature": Rule(gt=0),
        "weight_by": Rule(choices=ANCHOR_WEIGHTS),
    }

    @classmethod
    def check_params(cls, term: str, params: dict) -> None:
        if params.get("mode") == "kl" and params.get("weight_by", "none") == "none":
            raise DistillError(
                f"term '{term}': cls_kd mode kl (a softmax over classes) needs weight_by teacher_conf, positives or "
                f"positives_conf: on the background a softmax of sigmoid class scores means nothing"
            )

    @classmethod
    def check_head(cls, term: str, student_head: nn.Module, teacher_head: nn.Module, params: dict) -> None:
        if params.get("mode") == "kl" and student_head.nc == 1:
            raise DistillError(
                f"term '{term}': cls_kd mode kl is a softmax over the classes, and with one class it is 0 whatever "
                f"the scores; use mode bce"
            )

    def __init__(self, mode: str = "bce", temperature: float = 1.0, weight_by: str = "none") -> None:
        super().__init__()
        self.mode = mode
        self.weight_by = weight_by
        self.temperature = temperature

    def forward(self, student: dict, teacher: dict, ctx: DistillContext) -> torch.Tensor:
        per_anchor = class_divergence(student["scores"], teacher["scores"], self.mode, self.temperature)
        return (per_anchor * anchor_weights(self.weight_by, ctx)).sum() / ctx.positives


@register("dfl_kd")
class DFLKD(OutputLoss):
    """Localisation distillation (Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022,
    arXiv:2102.12252).

    Each box side is a distribution over the DFL bins; the student matches the teacher's softened one:
    ``L = sum_a w_a * T^2 * mean_sides KL(softmax(t/T) || softmax(s/T)) / sum_a w_a``, a weighted mean over anchors
    like ultralytics' DFL loss (the paper uses T = 10 on the positives; its code averages the KL over the bins,
    i.e. 1/reg_max of this true KL, and normalises by nothing: a weight here is not the paper's weight).
    ``weight_by`` picks the region and weighting (positives_conf: the assigner's positives weighted by the teacher's
    confidence). Needs DFL bins: a head with ``reg_max: 1`` (YOLO26) predicts plain distances; distil its boxes
    with ``box_kd``.
    """

    param_rules = {"temperature": Rule(gt=0), "weight_by": Rule(choices=ANCHOR_WEIGHTS)}

    def __init__(self, temperature: float = 1.0, weight_by: str = "teacher_conf") -> None:
        super().__init__()
        self.weight_by = weight_by
        self.temperature = temperature

    @classmethod
    def check_head(cls, term: str, student_head: nn.Module, teacher_head: nn.Module, params: dict) -> None:
        if student_head.reg_max <= 1:
            raise DistillError(
                f"term '{term}' ({cls.name}) distils DFL box distributions, but this Detect head has reg_max 1 "
                f"(plain box distances, as in YOLO26): use box_kd for its boxes"
            )

    def forward(self, student: dict, teacher: dict, ctx: DistillContext) -> torch.Tensor:
        per_anchor = box_divergence(student["boxes"], teacher["boxes"], self.temperature)
        return weighted_mean(per_anchor, anchor_weights(self.weight_by, ctx))


@register("box_kd")
class BoxKD(OutputLoss):
    """Box distillation: the student's decoded boxes regress onto the teacher's where the teacher is confident.

    ``L = sum_a w_a [1 - IoU(b_s, b_t) + l1 * |d_s - d_t|_1 / 4] / sum_a w_a`` with ``w_a = conf_a`` where
    ``conf_a > conf_thresh`` (else 0): the teacher's boxes as pseudo-targets, as in LD's box branch and
    ultralytics' own CIoU + L1 box loss for DFL-free heads (``d``: image-normalised ltrb distances). Works on DFL
    heads (the expectation over bins) and on reg_max 1 heads (YOLO26) alike. ``iou``: ciou, giou or iou.
    """

    param_rules = {"conf_thresh": Rule(ge=0, lt=1), "iou": Rule(choices=IOU_KINDS), "l1": Rule(ge=0)}

    def __init__(self, conf_thresh: float = 0.5, iou: str = "ciou", l1: float = 1.0, reg_max: int = 16) -> None:
        super().__init__()
        self.iou = iou
        self.conf_thresh, self.l1, self.reg_max = conf_thresh, l1, reg_max

    def forward(self, student: dict, teacher: dict, ctx: DistillContext) -> torch.Tensor:
        conf = ctx.teacher_conf.float()
        weight = conf * (conf > self.conf_thresh)
        per_anchor = box_agreement(student["boxes"], teacher["boxes"], ctx, self.reg_max, self.iou, self.l1)
        return weighted_mean(per_anchor, weight)


@register("bckd")
class BCKD(OutputLoss):
    """Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object Detection (Yang et al., ICCV
    2023, arXiv:2308.14286).

    Classification as each class's own binary problem, matching the sigmoid protocol of the head:
    ``L_cls = sum_{a,c} BCE(s_ac, p_t) * |sigma(s_ac) - p_t| / N_pos`` over all anchors. Localisation by IoU:
    ``L_loc = sum_a w_a (1 - GIoU(b_s, b_t)) / N_pos`` with ``w_a = max_c |sigma(t_ac) - sigma(s_ac)|`` (detached):
    anchors where the two disagree on some class carry the box lesson. ``L = L_cls + box_weight * L_loc``
    (official weights 1 and 4). Boxes are compared decoded, so it works on reg_max 1 heads (YOLO26) too.
    """

    param_rules = {"box_weight": Rule(ge=0), "iou": Rule(choices=IOU_KINDS)}

    def __init__(self, box_weight: float = 4.0, iou: str = "giou", reg_max: int = 16) -> None:
        super().__init__()
        self.iou = iou
        self.box_weight, self.reg_max = box_weight, reg_max

    def forward(self, student: dict, teacher: dict, ctx: DistillContext) -> torch.Tensor:
        s, t = student["scores"].float(), teacher["scores"].float()
        cls = class_divergence(s, t, "qfl").sum()
        with torch.no_grad():
            weight = (t.sigmoid() - s.sigmoid()).abs().amax(1)
        loc = box_agreement(student["boxes"], teacher["boxes"], ctx, self.reg_max, self.iou, l1=0.0)
        return (cls + self.box_weight * (loc * weight).sum()) / ctx.positives
