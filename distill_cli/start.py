"""What a run starts from: the teacher (when the recipe uses one) and the student, with the data's classes and its
first weights (its own when trained, else random or a selection of the teacher's: weight_selection.py)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from ultralytics.data.build import build_yolo_dataset
from ultralytics.utils import IterableSimpleNamespace

from .config import RunConfig
from .engine import preprocess
from .errors import DistillError
from .features import Pair
from .keep_start import SHORT_RUN_STEPS
from .models import class_names, is_model_yaml, load_model
from .options import file_identity
from .partial_selection import seeded_part, select_shared
from .teacher_scale import LEAST_VIEWS_SCALE, trained_imgsz, upsamples
from .weight_selection import (
    CALIBRATION_IMAGES,
    calibrate_batchnorm,
    select_weights,
    selection_problem,
)


def fine_tunes(cfg: RunConfig) -> bool:
    """A trained .pt student is fine-tuned; a model yaml trains from scratch."""
    return str(cfg.student).endswith(".pt")


def load_models(cfg: RunConfig, data: dict, resuming: bool) -> tuple[nn.Module | None, nn.Module, bool]:
    """(teacher, or None when the recipe neither distils nor seeds the student; student with the data's classes;
    whether it is a trained student that came with those classes: a start the recipe's keep_start can keep)."""
    names = data["names"]
    wanted = needs_teacher(cfg) and not (resuming and not cfg.recipe.losses)  # a resumed run was seeded already
    if wanted and is_model_yaml(cfg.teacher):
        if not cfg.allow_untrained_teacher:
            raise DistillError(
                f"teacher '{cfg.teacher}' is a model yaml, so it would be untrained; give its trained .pt "
                f"(for a smoke test only: --set allow_untrained_teacher=true)"
            )
        warnings.warn("the teacher is built from a yaml, so it is untrained", stacklevel=2)
    if cfg.teacher and not needs_teacher(cfg) and not resuming:  # a mistyped path or recipe would go unnoticed
        warnings.warn(
            f"recipe '{cfg.recipe_name}' neither distils nor starts the student from the teacher: the teacher "
            f"({cfg.teacher}) is not used",
            stacklevel=2,
        )
    teacher = load_model(cfg.teacher, "teacher", trust=cfg.trust_checkpoint) if wanted else None
    student = load_model(cfg.student, "student", nc=len(names), trust=cfg.trust_checkpoint)
    # one file given as both (a link included; not a yaml name): self-distillation is allowed, but rarely meant
    identity = file_identity(cfg.teacher) if teacher is not None and not resuming else None
    if isinstance(identity, tuple) and identity == file_identity(cfg.student):
        warnings.warn(
            f"the teacher and the student are the same file ({cfg.teacher}): the student learns from itself",
            stacklevel=2,
        )
    names = dict(names)  # in id order (load_data): the student's own copy
    has_start = fine_tunes(cfg) and class_names(student) == list(names.values())
    if fine_tunes(cfg) and not has_start:
        student = with_classes(student, names)
    student.names = names
    for name, param in student.named_parameters():  # saved checkpoints come frozen; the DFL decoder stays fixed
        param.requires_grad_(".dfl" not in name)
    return teacher, student, has_start


def freeze_layers(student: nn.Module, count: int, pairs: dict[str, list[Pair]]) -> None:
    """Keep the student's first ``count`` layers fixed (ultralytics' ``freeze=N``): no gradient reaches them, so the
    optimizer skips them and the backward pass stops above them. A freeze that would fix a layer a feature or
    cross-head term distils is refused: that term would have nothing but its adapter to train."""
    layers = len(student.model)
    if count >= layers:
        raise DistillError(
            f"freeze {count} leaves nothing to train: the student has {layers} layers; freeze <= {layers - 1}"
        )
    distilled = sorted((p.student, term) for term, term_pairs in pairs.items() for p in term_pairs if p.student < count)
    if distilled:
        layer, term = distilled[0]
        raise DistillError(f"freeze {count} would fix student layer {layer}, which '{term}' distils; freeze <= {layer}")
    for module in student.model[:count]:
        module.requires_grad_(False)


def seeds_from_teacher(cfg: RunConfig) -> bool:
    """The recipe starts a yaml student from a selection of the teacher's weights (a .pt student keeps its own)."""
    return cfg.recipe.init == "teacher" and not fine_tunes(cfg)


def needs_teacher(cfg: RunConfig) -> bool:
    return bool(cfg.recipe.losses) or seeds_from_teacher(cfg)


def seed_student(
    cfg: RunConfig, student: nn.Module, teacher: nn.Module | None, resuming: bool = False
) -> tuple[RunConfig, str | None]:
    """Select the teacher's weights into a yaml student when the recipe asks. Where the pair differs beyond widths
    (another family, other box bins), the layers they share take the teacher's weights where their blocks match
    (:mod:`partial_selection`) and the rest stay random: said in a warning, and returned as the start-up line's
    words. Where nothing matches, say why and record ``init: random`` in the config (config.yaml then says how the
    run started). ``resuming``: only the start-up line's words (the weights come from the checkpoint)."""
    if teacher is None or not seeds_from_teacher(cfg):
        return cfg, None
    problem = selection_problem(student, teacher)
    if not problem:
        if not resuming:
            select_weights(student, teacher)
        return cfg, None
    aligned, names = select_shared(student, teacher)
    if not names:  # a resumed run's config.yaml says init: random already
        warnings.warn(f"the student starts from random weights, not from the teacher's: {problem}", stacklevel=3)
        return replace(cfg, recipe=replace(cfg.recipe, init="random")), None
    part = seeded_part(student, names)
    if not resuming:
        select_weights(student, aligned, names)
        warnings.warn(f"{part} start from the teacher's weights, the rest at random: {problem}", stacklevel=3)
    return cfg, f"weight selection from the teacher for {part}, random elsewhere"


def calibrate_selected(student: nn.Module, data: dict, hyp, batch: int, stride: int, device: torch.device) -> None:
    """BatchNorm statistics for the selected weights, from the first train images (within ``fraction``) letterboxed
    to the square training size, without augmentation; never cached (``cache`` would load the whole split again)."""
    calibrate_batchnorm(student, first_train_images(data, hyp, batch, stride, device))


def first_train_images(data: dict, hyp, batch: int, stride: int, device: torch.device):
    """Batches of the first train images (within ``fraction``) letterboxed to the square training size, without
    augmentation; never cached (``cache`` would load the whole split again)."""
    settings = IterableSimpleNamespace(**{**vars(hyp), "cache": False})
    dataset = build_yolo_dataset(settings, data["train"], batch, data, mode="val", rect=False, stride=stride)
    count = min(CALIBRATION_IMAGES, max(1, round(len(dataset) * hyp.fraction)))
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch, collate_fn=dataset.collate_fn)
    return (preprocess(b, device)["img"] for b in loader)


def init_note(cfg: RunConfig, adapters: bool, partly_seeded: str | None = None) -> str:
    """The start-up line on the student's weights (``partly_seeded``: :func:`seed_student`'s words where the teacher
    seeded a part of it)."""
    if fine_tunes(cfg):
        start = "its trained weights"
    else:
        start = "weight selection from the teacher" if seeds_from_teacher(cfg) else "random"
        start = partly_seeded or start
    frozen = f"; layers 0-{cfg.freeze - 1} frozen" if cfg.freeze else ""
    kept = f"; distilled beside the teacher (keep_start {cfg.recipe.keep_start})" if cfg.recipe.keeps_start else ""
    return f"student init: {start}{kept}{frozen}" + (f"; adapters: {cfg.recipe.adapters}" if adapters else "")


def warn_if_short(cfg: RunConfig, teacher: nn.Module | None, optimizer_steps: int) -> None:
    """Say, before a fine-tune starts, that it is in the regime where the default recipe without ``keep_start`` was
    measured to lose: a class term, the teacher at 1 and trained at the run's image size to under 1.3x it, few
    optimizer steps, and the student as given not kept. There (416-512 px for the 512-px BCCD pair) such runs ended
    below plain fine-tuning in 13 of 40 cells; above the size the teacher was trained at (576 and 640 px, the teacher
    at 1 too) in 2 of 28, finetune9's, over four settings of 39-90 steps (benchmarks/RESULTS.md, sessions 26 and 36),
    and keeping the start cost the test split at 640 px (session 32): no warning there."""
    trained = trained_imgsz(teacher)
    trained_near = trained is not None and 1 <= trained / cfg.imgsz < LEAST_VIEWS_SCALE
    class_term = any(spec.type == "cls_kd" for spec in cfg.recipe.losses.values())
    at_1 = trained_near and not upsamples(cfg.recipe)
    if fine_tunes(cfg) and class_term and at_1 and not cfg.recipe.keeps_start and optimizer_steps < SHORT_RUN_STEPS:
        warnings.warn(
            f"{optimizer_steps} optimizer steps, with the teacher at 1 and trained at this size to under "
            f"{LEAST_VIEWS_SCALE:g}x it, and keep_start 0: in each of four such BCCD fine-tunes under "
            f"{SHORT_RUN_STEPS} steps (416-512 px), the default recipe without keep_start ended below plain "
            f"fine-tuning in 1 to 7 of 10 cells; with 130 steps or more, in 3 of 32 cells (README, 'Run longer near "
            f"the student's size'). More epochs give distillation room, and keep_start 1 in the recipe keeps the "
            f"student you gave beside the teacher",
            stacklevel=2,
        )


def with_classes(pretrained: nn.Module, names: dict[int, str]) -> nn.Module:
    """A pretrained student (e.g. COCO's 80 classes) for data with other classes, as ultralytics fine-tunes one: the
    same architecture built for the data's classes, every tensor whose shape still fits copied over, and the class
    rows of classes both lists name (any case) carried over by name."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(pretrained.yaml, nc=len(names), verbose=False)
    model.names = names  # read by ultralytics' load to remap the class rows by name
    model.load(pretrained, verbose=False)
    shared = {n.strip().lower() for n in class_names(pretrained)} & {n.strip().lower() for n in names.values()}
    warnings.warn(
        f"the student was trained for {pretrained.model[-1].nc} classes {_first(class_names(pretrained))} and the data "
        f"has {len(names)} {_first(list(names.values()))}: its last class layers start afresh"
        + (f", but for the {len(shared)} classes both name" if shared else "")
        + " (the hidden class layers carry over, as in ultralytics' fine-tune)",
        stacklevel=3,
    )
    return model


def _first(names: list[str]) -> str:
    return str(names) if len(names) <= 4 else f"{names[:4]}..."
