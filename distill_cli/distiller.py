"""The student with its trainable distillation parts, and the frozen teacher that feeds it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from ultralytics.utils.tal import make_anchors

from .config import Recipe
from .errors import DistillError
from .features import FeatureHooks, Pair, pair_layers, probe_layers
from .losses import LOSSES, DistillContext, OutputLoss, build_loss
from .models import class_names


@dataclass
class TeacherOutput:
    feats: dict[int, torch.Tensor]  # teacher layer index -> feature map
    head: dict[str, torch.Tensor]  # Detect outputs: boxes, scores, feats


def head_outputs(preds: dict | tuple) -> dict[str, torch.Tensor]:
    """The Detect head's raw dict from a train-mode (dict) or eval-mode ((y, dict)) forward; one-to-many for E2E."""
    preds = preds[1] if isinstance(preds, tuple) else preds
    return preds.get("one2many", preds)


class Teacher:
    """Frozen teacher: eval mode always, no grad, half precision on GPU; never saved, never optimised."""

    def __init__(self, model: nn.Module, layers: list[int], device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = dtype
        self.hooks = FeatureHooks(self.model, layers)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> TeacherOutput:
        preds = self.model(images.to(self.dtype))
        return TeacherOutput(self.hooks.pop(), head_outputs(preds))


class Distiller(nn.Module):
    """Student + adapters/generators: the one module that trains, syncs under DDP and checkpoints.

    ``forward(batch, teacher_out, active)`` runs the student once and returns the detection loss (per image, as
    ultralytics computes it before scaling by batch size), its items, and the named, unweighted distillation terms
    in ``active``. The training loop weights and sums them.
    """

    def __init__(self, student: nn.Module, terms: dict[str, nn.Module], pairs: dict[str, list[Pair]]) -> None:
        super().__init__()
        self.student = student
        self.terms = nn.ModuleDict(terms)
        self.pairs = pairs
        self.hooks = FeatureHooks(student, sorted({p.student for ps in pairs.values() for p in ps}))

    def forward(
        self, batch: dict, teacher: TeacherOutput | None, active: tuple[str, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        preds = self.student(batch["img"])
        feats = self.hooks.pop()
        det_loss, det_items, fg_mask = detection_loss(self.student, preds, batch)
        if teacher is None or not active:
            return det_loss, det_items, {}
        head = head_outputs(preds)
        ctx = make_context(head, teacher.head, fg_mask, batch)
        terms = {}
        for name in active:
            module = self.terms[name]
            if isinstance(module, OutputLoss):
                terms[name] = module(head, teacher.head, ctx)
            else:
                terms[name] = sum(
                    loss(feats[p.student], teacher.feats[p.teacher], ctx)
                    for loss, p in zip(module, self.pairs[name], strict=True)
                )
        return det_loss, det_items, terms


def detection_loss(student: nn.Module, preds: dict, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """ultralytics' own detection loss (per image, unscaled), its items, and the assigner's positive anchors."""
    if getattr(student, "criterion", None) is None:
        student.criterion = student.init_criterion()
    criterion = student.criterion
    if hasattr(criterion, "get_assigned_targets_and_loss"):  # v8/11 loss: also hands out the positives
        assigned, loss, items = criterion.get_assigned_targets_and_loss(criterion.parse_output(preds), batch)
        return loss.sum(), items, assigned[0]
    loss, items = criterion(preds, batch)
    return loss.sum() / batch["img"].shape[0], items, None


def make_context(head: dict, teacher_head: dict, fg_mask: torch.Tensor | None, batch: dict) -> DistillContext:
    feats = head["feats"]
    strides = torch.tensor([batch["img"].shape[2] / f.shape[2] for f in feats], device=feats[0].device)
    anchors, _ = make_anchors(feats, strides, 0.5)
    return DistillContext(
        teacher_conf=teacher_head["scores"].float().sigmoid().amax(1),
        fg_mask=fg_mask,
        anchors=anchors,
        level_sizes=[tuple(f.shape[2:]) for f in feats],
        gt_boxes=batch["bboxes"],
        gt_image=batch["batch_idx"].long(),
    )


def build_terms(
    student: nn.Module, teacher: nn.Module, recipe: Recipe, imgsz: int
) -> tuple[dict[str, nn.Module], dict[str, list[Pair]]]:
    """One loss module per output term; one per layer pair (each with its adapter) per feature term."""
    check_compatible(student, teacher, recipe)
    student_infos, teacher_infos = probe_layers(student, imgsz), probe_layers(teacher, imgsz)
    terms: dict[str, nn.Module] = {}
    pairs: dict[str, list[Pair]] = {}
    for name, spec in recipe.losses.items():
        if LOSSES[spec.type].level == "output":
            terms[name], pairs[name] = build_loss(spec.type, spec.params), []
            continue
        selection = spec.layers if spec.layers is not None else recipe.layers
        pairs[name] = pair_layers(student, teacher, student_infos, teacher_infos, selection)
        terms[name] = nn.ModuleList(
            build_loss(spec.type, spec.params, p.student_channels, p.teacher_channels) for p in pairs[name]
        )
    return terms, pairs


def check_compatible(student: nn.Module, teacher: nn.Module, recipe: Recipe) -> None:
    """Output distillation needs the same classes (and DFL bins); feature distillation only warns on a mismatch."""
    output_terms = [n for n, s in recipe.losses.items() if LOSSES[s.type].level == "output"]
    s_names, t_names = class_names(student), class_names(teacher)
    if s_names != t_names:
        if output_terms:
            raise DistillError(
                f"teacher classes {_short(t_names)} differ from student classes {_short(s_names)}; output distillation "
                f"({', '.join(output_terms)}) needs the same class list: use a teacher trained on this data, "
                f"or a feature-only recipe"
            )
        warnings.warn(
            f"teacher classes {_short(t_names)} differ from student classes {_short(s_names)}; "
            "distilling features only",
            stacklevel=2,
        )
    if output_terms and student.model[-1].reg_max != teacher.model[-1].reg_max:
        raise DistillError("teacher and student Detect heads differ in reg_max; output distillation needs the same")


def _short(names: list[str]) -> str:
    return str(names) if len(names) <= 8 else f"{names[:8]}... ({len(names)} in all)"
