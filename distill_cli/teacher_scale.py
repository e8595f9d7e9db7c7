"""A teacher that looks at the batch at twice the student's image size (recipe ``teacher_scale: 2``).

Why: a detector sees each object at the scale of the image it is given. A teacher trained at 512 px and run on the
student's 256-px batch sees every object at half the size it learned; the student, fine-tuned at 256, learns from that
weakened teacher. On BCCD's val split the shared YOLOv8s teacher scores 0.544 mAP50-95 at 256 px and **0.625** on the
same 256-px images upsampled to 512 (bilinear, as here): the information is in the small image, the scale is not.

How: the teacher runs on the batch upsampled 2x (and once at 1x). At 2x its level ``l + 1`` has the student's grid of
level ``l`` and sees the objects the student's level ``l`` sees; its level ``l`` has twice that grid and objects an
octave smaller, such as the smallest ones, which no 2x level of the student's grid would catch. For each student
anchor the candidates are the 2x teacher's level ``l + 1`` and its level ``l`` (2x2 cells pooled to the most confident
one); the last level, which has no ``l + 1``, takes the 1x teacher's instead. The most confident candidate
(the largest class probability) gives the anchor's class logits and its box: decoded, halved into the student's pixels
and written again relative to the student's anchor, as a two-hot distribution over the DFL bins whose expectation is
the distance (plain distances for a head without bins). ``cls_kd``, ``box_kd`` and ``bckd`` then read it as any
teacher's head; with other terms or an end-to-end head ``auto`` keeps the teacher at 1x and 2 is refused
(``scale_problem``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.utils.tal import dist2bbox, make_anchors

from .config import Recipe
from .losses.output import distances

# how far the 2x view may go past the size the teacher was trained at: the 512-px BCCD teacher, on val images shrunk to
# the student's size, gains from twice the size at 256, 288 and 320 px (+0.080, +0.041, +0.011 mAP50-95; 640 is 1.25
# x 512) and loses at 352, 384 and 416 (-0.011, -0.040, -0.085): objects larger than it learned cost it more than
# objects as much smaller. Read as a training step reads it (square batches, this mapping) the gains are +0.069,
# +0.030 and -0.004: at 1.25 the teacher is level, and the limit rests on the students' results at 320 px there
# (benchmarks/RESULTS.md, sessions 13-14)
LARGEST_VIEW = 1.25


# the terms that read only the teacher's class logits and its decoded boxes, which the mapping carries; dfl_kd reads
# the box distributions, which it replaces with a two-hot (a softened one would pull towards the middle bin)
REMAPPED_TERMS = ("cls_kd", "box_kd", "bckd")


def scale_problem(recipe: Recipe, teacher_head: nn.Module) -> str | None:
    """Why a teacher at twice the size cannot teach with this recipe and head, or None."""
    if getattr(teacher_head, "one2one_cv2", None) is not None:
        return "an end-to-end head (YOLO26) would have its one-to-one branch taught two anchors per object"
    other = sorted(name for name, spec in recipe.losses.items() if spec.type not in REMAPPED_TERMS)
    if other:
        taken = ", ".join(REMAPPED_TERMS)
        return f"term(s) {', '.join(other)} read more of the teacher than its class scores and boxes ({taken})"
    return None


def resolved(recipe: Recipe, imgsz: int, teacher: nn.Module | None) -> Recipe:
    """The recipe with ``teacher_scale: auto`` made 1 or 2: 2 where twice the student's size is at most
    ``LARGEST_VIEW`` x the size the teacher was trained at (its checkpoint's ``imgsz``) and ``scale_problem`` finds
    none; 1 otherwise, or when that size is unknown."""
    if recipe.teacher_scale != "auto":
        return recipe
    trained = trained_imgsz(teacher)
    fits = trained is not None and 2 * imgsz <= LARGEST_VIEW * trained
    usable = teacher is not None and scale_problem(recipe, teacher.model[-1]) is None
    return replace(recipe, teacher_scale="2" if fits and usable else "1")


def trained_imgsz(teacher: nn.Module | None) -> float | None:
    """The image size a checkpoint was trained at (its ``train_args``; the larger side of a pair), or None."""
    trained = (getattr(teacher, "args", None) or {}).get("imgsz")
    sides = [v for v in (trained if isinstance(trained, (list, tuple)) else [trained]) if is_size(v)]
    return max(sides) if sides else None


def is_size(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


# one level as maps: class logits (B, nc, H, W), xyxy boxes (B, 4, H, W), largest class probability (B, 1, H, W)
Level = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def level_maps(head: dict, reg_max: int, imgsz: int, scale: int) -> list[Level]:
    """Per level of one head branch: class logits, boxes in the student's pixels (the head's own divided by
    ``scale``) and the largest class probability, all as (B, C, H, W) maps."""
    feats = head["feats"]
    strides = torch.tensor([imgsz * scale / f.shape[2] for f in feats], device=feats[0].device)
    anchors, anchor_strides = make_anchors([torch.empty(0, 0, *f.shape[2:], device=f.device) for f in feats], strides)
    boxes = dist2bbox(distances(head["boxes"], reg_max), anchors.unsqueeze(0), xywh=False, dim=-1)
    boxes = boxes * anchor_strides.unsqueeze(0) / scale
    sizes = [f.shape[2] * f.shape[3] for f in feats]
    levels = []
    for logits, box, f in zip(head["scores"].float().split(sizes, -1), boxes.split(sizes, 1), feats, strict=True):
        grid = (f.shape[0], -1, *f.shape[2:])
        logits = logits.reshape(grid)
        levels.append((logits, box.transpose(1, 2).reshape(grid), logits.sigmoid().amax(1, keepdim=True)))
    return levels


def pool_to(level: Level, size: tuple[int, int]) -> Level:
    """A level on a grid ``k`` times finer than ``size``: each k x k block keeps its most confident cell."""
    logits, boxes, conf = level
    k = conf.shape[2] // size[0]
    if k == 1:
        return level
    best, index = F.max_pool2d(conf, k, k, return_indices=True)
    index = index.flatten(2)

    def take(maps: torch.Tensor) -> torch.Tensor:
        return maps.flatten(2).gather(2, index.expand(-1, maps.shape[1], -1)).view(*maps.shape[:2], *size)

    return take(logits), take(boxes), best


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


def scaled_head(big: dict, small: dict, reg_max: int, imgsz: int) -> dict:
    """One branch of the teacher's head as if it had run at the student's image size with the 2x view's eyes
    (module docstring): ``big`` from the 2x batch, ``small`` from the 1x batch, ``imgsz`` the student's."""
    at_2x, at_1x = level_maps(big, reg_max, imgsz, 2), level_maps(small, reg_max, imgsz, 1)
    scores, boxes = [], []
    for level, own in enumerate(at_1x):
        size = own[0].shape[2:]
        same_grid = at_2x[level + 1] if level + 1 < len(at_2x) else own
        logits, box, _ = most_confident([pool_to(at_2x[level], size), same_grid])
        stride = imgsz / size[0]
        cy = (torch.arange(size[0], device=box.device) + 0.5).view(-1, 1) * stride
        cx = (torch.arange(size[1], device=box.device) + 0.5).view(1, -1) * stride
        ltrb = torch.stack([cx - box[:, 0], cy - box[:, 1], box[:, 2] - cx, box[:, 3] - cy], 1) / stride
        scores.append(logits.flatten(2))
        boxes.append(two_hot(ltrb.flatten(2), reg_max))
    return {"scores": torch.cat(scores, -1), "boxes": torch.cat(boxes, -1), "feats": small["feats"]}
