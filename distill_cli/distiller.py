"""The student with its trainable distillation parts, and the frozen teacher that feeds it."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.utils.loss import E2ELoss
from ultralytics.utils.tal import make_anchors

from .config import Recipe
from .errors import DistillError
from .features import FeatureHooks, Pair, pair_layers, probe_layers
from .keep_start import with_start
from .losses import LOSSES, CrossLoss, DistillContext, OutputLoss, build_loss
from .losses.output import distances
from .models import class_names
from .teacher_scale import averaged, scale_problem, scaled_head, two_hot, upsamples, view_size

Head = dict[str, dict[str, torch.Tensor]]  # branch ("one2many", and "one2one" for end-to-end heads) -> raw outputs


@dataclass
class TeacherOutput:
    feats: dict[int, torch.Tensor]  # teacher layer index -> feature map
    head: Head  # Detect outputs per branch: boxes, scores, feats
    start: Head | None = None  # the student as given, on the same batch (recipe keep_start), else None


@dataclass
class DetectionLoss:
    """ultralytics' detection loss (per image, unscaled) with what output distillation needs from it."""

    total: torch.Tensor
    items: dict[str, torch.Tensor]
    gains: dict[str, float]  # branch -> its weight in the detection loss (E2E: o2m / o2o, decayed per epoch)
    positives: dict[str, torch.Tensor]  # branch -> (B, A) anchors the task-aligned assigner gave a box


def head_branches(preds: dict | tuple) -> Head:
    """The Detect head's raw outputs per branch, from a train-mode (dict) or eval-mode ((y, dict)) forward."""
    preds = preds[1] if isinstance(preds, tuple) else preds
    if "one2one" in preds:
        return {"one2many": preds["one2many"], "one2one": preds["one2one"]}
    return {"one2many": preds}


def as_float(head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A head dict in fp32: the loss decodes boxes through a matmul, which bf16 would round (see README, AMP)."""
    return {k: [f.float() for f in v] if k == "feats" else v.float() for k, v in head.items()}


def inference_copy(model: nn.Module) -> nn.Module:
    """A Conv+BN-fused copy for the teacher's forward passes; both branches of an end-to-end head are kept (they
    are both distilled), so the Detect head's own fuse, which drops one, is skipped."""
    runner = copy.deepcopy(model)
    head = runner.model[-1]
    head.fuse = lambda: None  # an instance attribute shadows Detect.fuse for the duration of the call
    try:
        runner.fuse(verbose=False)
    finally:
        del head.fuse
    return runner


def weight_sum(model: nn.Module) -> float:
    """The sum of |w| over a model's floating-point weights and buffers, in float64."""
    return float(sum(t.double().abs().sum() for t in model.state_dict().values() if t.is_floating_point()))


def frozen_copy(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A fused, channels-last copy of ``model`` in ``dtype``, in eval mode without gradients (inference_copy)."""
    runner = inference_copy(model).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return runner.eval().requires_grad_(False)


class Teacher:
    """Frozen teacher: eval mode always, no grad, never saved, never optimised.

    ``model`` is the teacher as loaded (fp32, used to validate it); ``runner`` is a private Conv+BN-fused copy in
    ``dtype`` (bf16/fp16 under AMP) and channels_last, which runs every training step. With a scale above 1 its head
    outputs are those of the batch seen at that multiple of its size, mapped onto the student's anchors; with several
    ``scales``, one pass per view and their answers averaged (teacher_scale.py). With a ``start`` (the student as
    given, for ``keep_start``), a fused copy of it answers the same batch beside the teacher (keep_start.py).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[int],
        device: torch.device,
        dtype: torch.dtype,
        scales: tuple[float, ...] = (1.0,),
        start: nn.Module | None = None,
    ) -> None:
        if tuple(scales) != (1.0,) and layers:
            raise ValueError("a teacher at a scale above 1 hooks no layer: its maps would not match the student's")
        self.model = model.to(device).eval().requires_grad_(False)
        self.runner = frozen_copy(self.model, device, dtype)
        self.start = None if start is None else frozen_copy(start, device, dtype)
        # the weights as loaded (fp32, unfused: the same on any device and precision), for a resume to compare
        self.fingerprint = [weight_sum(m) for m in (model, start) if m is not None]
        self.dtype, self.scales = dtype, tuple(scales)
        self.strides = [int(stride) for stride in self.head.stride]  # the head's level strides, read once
        self.hooks = FeatureHooks(self.runner, layers)

    @property
    def head(self) -> nn.Module:
        return self.runner.model[-1]

    def run(self, images: torch.Tensor, runner: nn.Module | None = None) -> dict | tuple:
        return (self.runner if runner is None else runner)(
            images.to(self.dtype).contiguous(memory_format=torch.channels_last)
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> TeacherOutput:
        heads = [self.view(images, scale) for scale in self.scales]
        if len(heads) > 1:
            heads = [{b: averaged([h[b] for h in heads], self.head.reg_max) for b in heads[0]}]
        start = None if self.start is None else head_branches(self.run(images, self.start))
        return TeacherOutput(self.hooks.pop(), heads[0], start)  # popped after the passes, which fill the hooks

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """The hooked layers' maps alone, for what reads no answer (the adapter fit, the report's check): one pass
        of the teacher at its own size, none of the kept start."""
        self.run(images)
        return self.hooks.pop()

    def view(self, images: torch.Tensor, scale: float) -> Head:
        """The head's answers to the batch seen at ``scale`` times its size, on the student's anchors."""
        size = (images.shape[2], images.shape[3])
        view = view_size(size, scale, max(self.strides))
        if view == size:
            return head_branches(self.run(images))
        # only terms that read the head take a scale (scale_problem), so no layer is hooked
        seen = head_branches(self.run(F.interpolate(images.float(), size=view, mode="bilinear")))
        return {b: scaled_head(seen[b], self.head.reg_max, view, size, self.strides) for b in seen}


class Distiller(nn.Module):
    """Student + adapters/generators: the one module that trains, syncs under DDP and checkpoints.

    ``forward(batch, teacher_out, active)`` runs the student once and returns the detection loss, and the named,
    unweighted distillation terms in ``active``. The training loop weights and sums them. Output terms of an
    end-to-end head are computed on both branches and combined with the detection loss's own branch gains; with
    ``keep_start`` and the start's answers in the teacher output, they read both models' answers mixed and count
    ``1 + keep_start`` times (keep_start.py).
    """

    def __init__(
        self, student: nn.Module, terms: dict[str, nn.Module], pairs: dict[str, list[Pair]], keep_start: float = 0.0
    ) -> None:
        super().__init__()
        self.student, self.keep_start = student, keep_start
        self.terms = nn.ModuleDict(terms)
        self.pairs = pairs
        self.hooks = FeatureHooks(student, sorted({p.student for ps in pairs.values() for p in ps}))
        self.teacher_head: nn.Module | None = None  # set by bind_teacher for cross-head terms; not a submodule

    def bind_teacher(self, teacher: Teacher) -> None:
        """Cross-head terms run the teacher's frozen Detect head; kept outside the module tree (never trained,
        saved or wrapped by DDP)."""
        self.__dict__["teacher_head"] = teacher.head

    def forward(
        self, batch: dict, teacher: TeacherOutput | None, active: tuple[str, ...]
    ) -> tuple[DetectionLoss, dict[str, torch.Tensor]]:
        preds = self.student(batch["img"])
        feats = self.hooks.pop()
        with torch.autocast(batch["img"].device.type, enabled=False):
            det = detection_loss(self.student, preds, batch)
        if teacher is None or not active:
            return det, {}
        head, gains = head_branches(preds), shared_gains(det.gains, teacher.head)
        contexts = {b: make_context(head[b], teacher.head[b], det.positives[b], batch) for b in gains}
        reg_max = self.student.model[-1].reg_max
        answers = in_encoding(teacher.head, reg_max)  # cross-head terms read the teacher's own
        outputs, count, output_contexts = answers, 1.0, contexts  # what output terms learn from, how many times
        if teacher.start is not None and self.keep_start > 0:
            outputs, count = with_start(answers, teacher.start, self.keep_start, reg_max), 1.0 + self.keep_start
            output_contexts = {b: make_context(head[b], outputs[b], det.positives[b], batch) for b in gains}
        terms = {}
        for name in active:
            module = self.terms[name]
            if isinstance(module, OutputLoss):
                parts = (g * module(head[b], outputs[b], output_contexts[b]) for b, g in gains.items())
                terms[name] = count * sum(parts)
            elif isinstance(module, CrossLoss):
                inputs = [feats[p.student] for p in self.pairs[name]]
                terms[name] = module(inputs, self.teacher_head, teacher.head, contexts)
            else:
                terms[name] = sum(
                    loss(feats[p.student], teacher.feats[p.teacher], contexts["one2many"])
                    for loss, p in zip(module, self.pairs[name], strict=True)
                )
        return det, terms


def in_encoding(head: Head, reg_max: int) -> Head:
    """The teacher's branches with their boxes in the student's encoding, ``reg_max`` DFL bins (a two-hot of the
    teacher's distances, clamped to the bins) or plain distances at 1, so that a YOLO26 student learns a YOLOv8
    teacher's boxes and back; as they are where the encodings agree."""
    encoded = {}
    for branch, answers in head.items():
        bins = answers["boxes"].shape[1] // 4
        if bins != reg_max:
            answers = {**answers, "boxes": two_hot(distances(answers["boxes"], bins).transpose(1, 2), reg_max)}
        encoded[branch] = answers
    return encoded


def shared_gains(gains: dict[str, float], teacher_head: Head) -> dict[str, float]:
    """The branches both heads have, weighted as in the detection loss; a branch the teacher lacks is not
    distilled (a one-to-many teacher would teach a one-to-one branch to fire on many anchors per object), and the
    remaining branch then counts fully."""
    shared = {b: g for b, g in gains.items() if b in teacher_head}
    return shared if len(shared) == len(gains) else dict.fromkeys(shared, 1.0)


def detection_loss(student: nn.Module, preds: dict | tuple, batch: dict) -> DetectionLoss:
    """ultralytics' own detection loss in fp32, per branch, with the assigner's positives of each branch.

    For an end-to-end head this is ``E2ELoss``: ``o2m * loss(one2many) + o2o * loss(one2one)``, items from the
    one-to-one branch, computed here branch by branch so that the positives of each are at hand.
    """
    if getattr(student, "criterion", None) is None:
        student.criterion = student.init_criterion()
    criterion, head = student.criterion, head_branches(preds)
    if isinstance(criterion, E2ELoss):
        parts = {"one2many": (criterion.one2many, criterion.o2m), "one2one": (criterion.one2one, criterion.o2o)}
    else:
        parts = {"one2many": (criterion, 1.0)}
    total, items, positives = torch.zeros((), device=batch["img"].device), {}, {}
    for branch, (branch_criterion, gain) in parts.items():
        assigned, loss, items = branch_criterion.get_assigned_targets_and_loss(as_float(head[branch]), batch)
        total = total + gain * loss.sum()
        positives[branch] = assigned[0]
    return DetectionLoss(total, items, {b: g for b, (_, g) in parts.items()}, positives)


def make_context(head: dict, teacher_head: dict, fg_mask: torch.Tensor | None, batch: dict) -> DistillContext:
    feats = head["feats"]
    imgsz = batch["img"].shape[2:]
    strides = torch.tensor([imgsz[0] / f.shape[2] for f in feats], device=feats[0].device)
    shapes = [torch.empty(0, 0, *f.shape[2:], device=f.device) for f in feats]  # fp32 anchors, no copy of the maps
    anchors, anchor_strides = make_anchors(shapes, strides, 0.5)
    return DistillContext(
        teacher_conf=teacher_head["scores"].float().sigmoid().amax(1),
        fg_mask=fg_mask,
        anchors=anchors,
        level_sizes=[tuple(f.shape[2:]) for f in teacher_head["feats"]],  # teacher_conf's layout, maybe not ours
        gt_boxes=batch["bboxes"],
        gt_image=batch["batch_idx"].long(),
        strides=anchor_strides.squeeze(-1),
        imgsz=(int(imgsz[0]), int(imgsz[1])),
    )


def build_terms(
    student: nn.Module, teacher: nn.Module, recipe: Recipe, imgsz: int
) -> tuple[dict[str, nn.Module], dict[str, list[Pair]]]:
    """One loss module per output term; one per layer pair (each with its adapter) per feature term; one per
    cross-head term, with an adapter per Detect input."""
    check_compatible(student, teacher, recipe)
    student_infos, teacher_infos = probe_layers(student, imgsz), probe_layers(teacher, imgsz)
    terms: dict[str, nn.Module] = {}
    pairs: dict[str, list[Pair]] = {}
    for name, spec in recipe.losses.items():
        level = LOSSES[spec.type].level
        if level == "output":
            terms[name], pairs[name] = build_loss(spec.type, spec.params, reg_max=student.model[-1].reg_max), []
            continue
        selection = "head_inputs" if level == "cross" else spec.layers if spec.layers is not None else recipe.layers
        pairs[name] = pair_layers(student, teacher, student_infos, teacher_infos, selection)
        channels = [(p.student_channels, p.teacher_channels) for p in pairs[name]]
        if level == "cross":
            # the cross head is the teacher's: its predictions are in the teacher's encoding
            terms[name] = build_loss(spec.type, spec.params, channels=channels, reg_max=teacher.model[-1].reg_max)
        else:
            terms[name] = nn.ModuleList(build_loss(spec.type, spec.params, s, t) for s, t in channels)
    return terms, pairs


def uses_recipe_layers(recipe: Recipe) -> bool:
    """Whether some term distils the recipe's ``layers``: a feature term without layers of its own."""
    return any(LOSSES[spec.type].level == "feature" and spec.layers is None for spec in recipe.losses.values())


def check_compatible(student: nn.Module, teacher: nn.Module, recipe: Recipe) -> None:
    """Output and cross-head terms must apply to this pair of heads (see ``output_problem``); feature distillation
    only warns on a class mismatch."""
    for name, spec in recipe.losses.items():
        output = LOSSES[spec.type].level != "feature"
        if output and (problem := output_problem(spec.type, student, teacher, name, spec.params)):
            raise DistillError(problem)
    if upsamples(recipe) and (problem := scale_problem(recipe, teacher.model[-1])):
        raise DistillError(f"teacher_scale {recipe.teacher_scale}: {problem}; use teacher_scale 1 or auto")
    s_names, t_names = class_names(student), class_names(teacher)
    if s_names != t_names:
        warnings.warn(
            f"teacher classes {_short(t_names)} differ from student classes {_short(s_names)}; "
            "distilling features only",
            stacklevel=2,
        )


def output_problem(
    method: str, student: nn.Module, teacher: nn.Module, term: str | None = None, params: dict | None = None
) -> str | None:
    """Why output or cross-head method ``method`` (with the term's ``params``; the defaults when None) cannot distil
    this teacher into this student, or None: it needs the same class list and strides (boxes are compared in the
    student's encoding: ``in_encoding``), and what the method itself needs (``check_head``)."""
    term = term or method
    s_names, t_names = class_names(student), class_names(teacher)
    if s_names != t_names:
        return (
            f"term '{term}': teacher classes {_short(t_names)} differ from student classes {_short(s_names)}; output "
            f"distillation needs the same class list: use a teacher trained on this data, or a feature-only recipe"
        )
    s_head, t_head = student.model[-1], teacher.model[-1]
    if s_head.stride.tolist() != t_head.stride.tolist():
        return f"term '{term}': teacher and student Detect heads have different strides; use a feature-only recipe"
    try:
        LOSSES[method].check_head(term, s_head, t_head, params or {})
    except DistillError as e:
        return e.message
    return None


def _short(names: list[str]) -> str:
    return str(names) if len(names) <= 8 else f"{names[:8]}... ({len(names)} in all)"
