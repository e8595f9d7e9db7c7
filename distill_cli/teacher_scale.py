"""A teacher that looks at the batch at up to twice the student's image size (recipe ``teacher_scale``).

Why: a detector sees each object at the scale of the image it is given. A teacher trained at 512 px and run on the
student's 256-px batch sees every object at half the size it learned; the student, fine-tuned at 256, learns from that
weakened teacher. On BCCD's val split the shared YOLOv8s teacher scores 0.544 mAP50-95 at 256 px and **0.625** on the
same 256-px images upsampled to 512 (bilinear, as here): the information is in the small image, the scale is not.

How: the teacher runs once, on the batch upsampled ``s`` times (1 < s <= 2; each side rounded to its largest stride).
Its level ``l + 1`` then has a grid ``s / 2`` times the student's level ``l`` (the same grid at 2, where it sees the
objects the student's level ``l`` sees); its level ``l`` has ``s`` times the student's grid and sees objects up to an
octave smaller, such as the smallest ones, which no coarser level would catch. Each is resampled onto the student's
grid of level ``l`` (each teacher cell goes to the student cell that holds its centre, which keeps the most
confident), and the more confident of the two (the largest class probability; first one whose box can be written
as DFL distances from the student's anchor) gives the anchor's class logits and its box: decoded, brought into the
student's pixels (each axis by its size over the view's) and written again relative to the student's anchor, as a
two-hot distribution over the DFL bins whose expectation is the distance (plain distances for a head without bins).
``cls_kd``, ``box_kd`` and ``bckd`` then read it as any teacher's head; with other terms or an end-to-end head
``auto`` keeps the teacher at 1 and a scale above 1 is refused (``scale_problem``).

Views joined by + (``1+2``): the teacher runs once per view, and their answers on the student's anchors are averaged:
per anchor and class the mean probability, and the box as the mean of the views' distances weighted by each view's
largest class probability there. ``auto`` picks 2, 1+2 or 1 (``LEAST_AUTO_SCALE``, ``LEAST_VIEWS_SCALE``).

Version 0.3.10 ran a second pass at 1x, whose last level gave candidates for the student's last level (the view's
largest objects may be up to 1.25x larger than the teacher learned); on BCCD they never won, and without them the
teacher's mAP is the same to every digit.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn
from ultralytics.utils.tal import dist2bbox, make_anchors

from .config import Recipe
from .losses.output import distances

# auto picks 2 where the size the teacher was trained at is at least this many times the student's (a 2x view of at
# most 1.25 x that size): the 512-px BCCD teacher, read as a training step reads it (square batches, this mapping),
# gains from twice the size at 256 and 288 px (+0.069, +0.030 mAP50-95), is level at 320 (-0.004) and loses at 352 and
# above (-0.026 to -0.089); the students at 320 px still gain from 2 (benchmarks/RESULTS.md, sessions 13-14). At its
# own size (x1.6 at 320 px) the teacher scores higher (0.616 against 0.600 at 1 and 0.596 at 2), yet taught the
# students less than 2 in 9 of 10 cells of seed 0 at 288 and 320 px (session 15): a number below 2 is an option only
LEAST_AUTO_SCALE = 1.6
# auto picks 1+2 where that size is at least this many times the student's (and below LEAST_AUTO_SCALE): with the
# 512-px teacher at 352 and 384 px (x1.45, x1.33) the averaged views taught the students above no distillation and the
# teacher at 1 in every cell run, where 1 alone and 2 alone each missed some; at 416 px (x1.23, its view at 2 the worst)
# they taught less than 1 in all 4 cells (benchmarks/RESULTS.md, session 17); there and below, 1
LEAST_VIEWS_SCALE = 1.3


# the terms that read only the teacher's class logits and its decoded boxes, which the mapping carries; dfl_kd reads
# the box distributions, which it replaces with a two-hot (a softened one would pull towards the middle bin), and the
# mapped head's feats hold only the student's grid shapes, no features (crosskd would read them)
REMAPPED_TERMS = ("cls_kd", "box_kd", "bckd")


def scale_problem(recipe: Recipe, teacher_head: nn.Module) -> str | None:
    """Why a teacher at a scale above 1 cannot teach with this recipe and head, or None."""
    if getattr(teacher_head, "one2one_cv2", None) is not None:
        return "an end-to-end head (YOLO26) would have its one-to-one branch taught two anchors per object"
    other = sorted(name for name, spec in recipe.losses.items() if spec.type not in REMAPPED_TERMS)
    if other:
        taken = ", ".join(REMAPPED_TERMS)
        return f"term(s) {', '.join(other)} read more of the teacher than its class scores and boxes ({taken})"
    return None


def resolved(recipe: Recipe, imgsz: int, teacher: nn.Module | None) -> Recipe:
    """The recipe with ``teacher_scale: auto`` made 2, 1+2 or 1, by the size the teacher was trained at (its
    checkpoint's ``imgsz``) over the student's: 2 from ``LEAST_AUTO_SCALE``, 1+2 from ``LEAST_VIEWS_SCALE``, where
    ``scale_problem`` finds none; 1 otherwise, or when that size is unknown."""
    if recipe.teacher_scale != "auto":
        return recipe
    trained = trained_imgsz(teacher)
    usable = trained is not None and scale_problem(recipe, teacher.model[-1]) is None
    ratio = trained / imgsz if usable else 0.0
    scale = "2" if ratio >= LEAST_AUTO_SCALE else "1+2" if ratio >= LEAST_VIEWS_SCALE else "1"
    return replace(recipe, teacher_scale=scale)


def view_scales(teacher_scale: str) -> tuple[float, ...]:
    """A resolved ``teacher_scale`` ("1.5", "1+2") as its views' scales."""
    return tuple(float(view) for view in teacher_scale.split("+"))


def upsamples(recipe: Recipe) -> bool:
    """Whether the recipe asks for a teacher view above 1 (auto not yet resolved: not known)."""
    return recipe.teacher_scale != "auto" and max(view_scales(recipe.teacher_scale)) > 1


def trained_imgsz(teacher: nn.Module | None) -> float | None:
    """The image size a checkpoint was trained at (its ``train_args``; the larger side of a pair), or None."""
    trained = (getattr(teacher, "args", None) or {}).get("imgsz")
    sides = [v for v in (trained if isinstance(trained, (list, tuple)) else [trained]) if is_size(v)]
    return max(sides) if sides else None


def is_size(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


# one level as maps: class logits (B, nc, H, W), xyxy boxes (B, 4, H, W), largest class probability (B, 1, H, W)
Level = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def view_size(size: tuple[int, int], scale: float, stride: int) -> tuple[int, int]:
    """The batch's (H, W) times ``scale``, each side rounded (half up) to a multiple of ``stride`` (the head's
    largest) and never below the batch's own (a scale that rounds back to it runs the teacher as at 1)."""
    height, width = (max(math.floor(side * scale / stride + 0.5) * stride, side) for side in size)
    return height, width


def level_maps(head: dict, reg_max: int, view: tuple[int, int], size: tuple[int, int]) -> list[Level]:
    """Per level of one head branch run on a ``view``-sized batch: class logits, boxes in the pixels of the
    student's ``size`` and the largest class probability, all as (B, C, H, W) maps."""
    feats = head["feats"]
    strides = torch.tensor([view[0] / f.shape[2] for f in feats], device=feats[0].device)
    anchors, anchor_strides = make_anchors([torch.empty(0, 0, *f.shape[2:], device=f.device) for f in feats], strides)
    boxes = dist2bbox(distances(head["boxes"], reg_max), anchors.unsqueeze(0), xywh=False, dim=-1)
    to_student = torch.tensor([size[1] / view[1], size[0] / view[0]] * 2, device=boxes.device)
    boxes = boxes * anchor_strides.unsqueeze(0) * to_student
    sizes = [f.shape[2] * f.shape[3] for f in feats]
    levels = []
    for logits, box, f in zip(head["scores"].float().split(sizes, -1), boxes.split(sizes, 1), feats, strict=True):
        grid = (f.shape[0], -1, *f.shape[2:])
        logits = logits.reshape(grid)
        levels.append((logits, box.transpose(1, 2).reshape(grid), logits.sigmoid().amax(1, keepdim=True)))
    return levels


def resample(level: Level, size: tuple[int, int]) -> Level:
    """A level on the grid ``size``: each teacher cell goes to the one cell that holds its centre, which keeps the most
    confident of those it is given (on ties the first); a cell given none (from a coarser grid) gets a class probability
    of -2, below any candidate's. Each teacher answer lands once, as on the teacher's own grid: spread over the cells a
    window overlaps, it would teach the student to fire on up to four anchors where the teacher fires on one."""
    logits, boxes, conf = level
    height, width = conf.shape[2:]
    if (height, width) == tuple(size):
        return level
    rows = ((torch.arange(height, device=conf.device) + 0.5) * size[0] / height).long()
    cols = ((torch.arange(width, device=conf.device) + 0.5) * size[1] / width).long()
    target = (rows.view(-1, 1) * size[1] + cols.view(1, -1)).flatten().expand(*conf.shape[:2], -1)
    flat = conf.flatten(2)
    best = flat.new_full((*flat.shape[:2], size[0] * size[1]), -2.0).scatter_reduce(2, target, flat, "amax")
    cells = torch.arange(flat.shape[2], device=conf.device).expand_as(flat)
    winners = torch.where(flat == best.gather(2, target), cells, flat.shape[2])
    index = torch.full_like(best, flat.shape[2], dtype=torch.long).scatter_reduce(2, target, winners, "amin")
    index = index.clamp(max=flat.shape[2] - 1)

    def take(maps: torch.Tensor) -> torch.Tensor:
        return maps.flatten(2).gather(2, index.expand(-1, maps.shape[1], -1)).view(*maps.shape[:2], *size)

    return take(logits), take(boxes), best.view(*conf.shape[:2], *size)


def most_confident(candidates: list[Level]) -> Level:
    """Per cell, the candidate with the largest class probability."""
    pick = torch.stack([c[2] for c in candidates]).argmax(0, keepdim=True)  # (1, B, 1, H, W)
    chosen = []
    for part in range(3):
        maps = torch.stack([c[part] for c in candidates])
        chosen.append(maps.gather(0, pick.expand(-1, -1, maps.shape[2], -1, -1))[0])
    return chosen[0], chosen[1], chosen[2]


def two_hot(dist: torch.Tensor, reg_max: int) -> torch.Tensor:
    """(B, 4, A) distances in grid units -> (B, 4 * reg_max, A) DFL logits whose softmax has that expectation
    (clamped to the bins); a head without bins (``reg_max`` 1) takes the distances as they are."""
    if reg_max == 1:
        return dist
    dist = dist.clamp(0, reg_max - 1 - 1e-3)
    low = dist.floor().long()
    upper = (dist - low).unsqueeze(2)
    probs = torch.zeros(*dist.shape[:2], reg_max, dist.shape[2], device=dist.device)
    probs.scatter_(2, low.unsqueeze(2), 1 - upper).scatter_add_(2, low.unsqueeze(2) + 1, upper)
    return (probs + 1e-6).log().flatten(1, 2)


def scaled_head(seen: dict, reg_max: int, view: tuple[int, int], size: tuple[int, int], strides: list[int]) -> dict:
    """One branch of the teacher's head run on the ``view``-sized batch, answered on the anchors of the student's
    ``size`` (levels of ``strides``) as the module docstring says. Its ``feats`` give only the student's grids."""
    levels = level_maps(seen, reg_max, view, size)
    scores, boxes, grids = [], [], []
    for level, stride in enumerate(strides):
        grid = (size[0] // stride, size[1] // stride)
        cy = (torch.arange(grid[0], device=seen["scores"].device) + 0.5).view(-1, 1) * stride
        cx = (torch.arange(grid[1], device=seen["scores"].device) + 0.5).view(1, -1) * stride
        candidates = [
            against_anchors(resample(levels[m], grid), cx, cy, stride, reg_max)
            for m in (level, level + 1)
            if m < len(levels)
        ]
        logits, ltrb, _ = most_confident(candidates)
        scores.append(logits.flatten(2))
        boxes.append(two_hot(ltrb.flatten(2), reg_max))
        grids.append(logits.new_empty(logits.shape[0], 0, *grid))
    return {"scores": torch.cat(scores, -1), "boxes": torch.cat(boxes, -1), "feats": grids}


def against_anchors(level: Level, cx: torch.Tensor, cy: torch.Tensor, stride: int, reg_max: int) -> Level:
    """The level with its boxes as distances (ltrb, in strides) from the student's anchor centres (``cx``, ``cy``) and
    its confidence raised by 1 where all four fit the DFL bins (above 0 and below ``reg_max - 1``; above 0 without
    bins), so that such a candidate wins over one that does not: a box beside the anchor would need a negative side,
    and a coarser level's large box (``2 / s`` of the student's strides a bin) may reach past the last bin."""
    logits, boxes, conf = level
    ltrb = torch.stack([cx - boxes[:, 0], cy - boxes[:, 1], boxes[:, 2] - cx, boxes[:, 3] - cy], 1) / stride
    fits = (ltrb > 0).all(1, keepdim=True)
    if reg_max > 1:
        fits &= (ltrb < reg_max - 1).all(1, keepdim=True)
    return logits, ltrb, conf + fits


def averaged(heads: list[dict], reg_max: int, shares: list[float] | None = None) -> dict:
    """One branch's answers from several views (or models), all on the student's anchors and in its encoding, as
    one teacher's: per anchor and class the probability averaged with ``shares`` (equal when None; they sum to 1,
    as a logit), and the box as the mean of their ltrb distances weighted by each share times that head's largest
    class probability there (a head that sees nothing at an anchor moves its box little), as a two-hot."""
    probs = torch.stack([head["scores"].float().sigmoid() for head in heads])  # (V, B, nc, A)
    weights = probs.amax(2, keepdim=True)  # (V, B, 1, A)
    prob = probs.mean(0)
    if shares is not None:
        share = probs.new_tensor(shares).view(-1, 1, 1, 1)
        weights, prob = share * weights, (share * probs).sum(0)
    ltrb = torch.stack([distances(head["boxes"], reg_max).transpose(1, 2) for head in heads])  # (V, B, 4, A)
    ltrb = (weights * ltrb).sum(0) / weights.sum(0).clamp(min=1e-6)  # the floor: only where all views see ~nothing
    grids = [f.new_empty(f.shape[0], 0, *f.shape[2:]) for f in heads[0]["feats"]]
    prob = prob.clamp(1e-6, 1 - 1e-6)
    return {"scores": prob.log() - (1 - prob).log(), "boxes": two_hot(ltrb, reg_max), "feats": grids}
