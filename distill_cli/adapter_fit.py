"""Adapters that start fitted: each 1x1 adapter of a feature or cross-head term begins as the least-squares map from
the student's layer to the teacher's, so the term's first steps teach what no linear map explains instead of pulling
the student towards a random projection of its own features.

Measured on the shared BCCD pair (YOLOv8n -> YOLOv8s, Detect inputs, 416 px, images not used by the fit): a random
adapter explains less of the teacher's maps than their mean does (R^2 -0.5 / -0.8 / -1.0 at P3 / P4 / P5), the fitted
one 0.53 / 0.75 / 0.85; the CWD loss at the start falls from 1.22 / 1.48 / 0.15 to 0.43 / 0.19 / 0.02
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .config import RunConfig
from .distiller import Distiller, Teacher
from .engine import student_train_mode
from .features import as_rows
from .losses import CrossLoss
from .models import all_finite

RIDGE = 1e-3  # of the mean variance of the student's channels: keeps the solve stable when channels are collinear


def adapter_targets(distiller: Distiller) -> list[tuple[nn.Conv2d, int, int]]:
    """Every 1x1 adapter (identities excluded) with the student and teacher layer indices it maps between."""
    found = []
    for name, module in distiller.terms.items():
        if isinstance(module, CrossLoss):
            adapters = list(module.adapters)
        elif isinstance(module, nn.ModuleList):  # a feature term: one loss, with its adapter, per layer pair
            adapters = [loss.adapter for loss in module]
        else:
            continue
        for adapter, pair in zip(adapters, distiller.pairs[name], strict=True):
            if isinstance(adapter, nn.Conv2d):
                found.append((adapter, pair.student, pair.teacher))
    return found


@torch.no_grad()
def fit_adapters(distiller: Distiller, teacher: Teacher, images: Iterable[torch.Tensor], cfg: RunConfig) -> None:
    """Set each adapter to the ridge regression of the teacher's map on the student's, over every position of every
    image: ``W = C_ts (C_ss + lambda I)^-1``, ``b = mean_t - W mean_s``, with ``C`` the (co)variances over positions
    and ``lambda = RIDGE * tr(C_ss) / C_s``; sums in fp64. The student computes its maps as in a training step
    (BatchNorm on batch statistics unless ``bn_stats`` freezes it: a random student's running statistics would
    shrink its maps ~1e5-fold), and every buffer it has is put back afterwards."""
    targets = adapter_targets(distiller)
    student, was_training = distiller.student, distiller.student.training
    buffers = {name: buffer.clone() for name, buffer in student.named_buffers()}
    sums: list[dict[str, torch.Tensor]] = [{} for _ in targets]
    student_train_mode(student, cfg)
    try:
        for batch in images:
            student(batch)
            student_maps, teacher_maps = distiller.hooks.pop(), teacher.features(batch)
            for acc, (_, s, t) in zip(sums, targets, strict=True):
                for s_map, t_map in zip(student_maps[s], teacher_maps[t], strict=True):  # image by image: memory
                    accumulate(acc, as_rows(s_map[None]).double(), as_rows(t_map[None]).double())
    finally:
        for name, buffer in student.named_buffers():
            buffer.copy_(buffers[name])
        student.train(was_training)
    for acc, (conv, s, t) in zip(sums, targets, strict=True):
        weight, bias = ridge_solution(acc)
        if not all_finite((weight, bias)):  # a non-finite map: the step guard's business
            warnings.warn(f"adapter {s}->{t}: the maps are not finite, so it starts at random", stacklevel=2)
            continue
        conv.weight.copy_(weight.view_as(conv.weight))
        if conv.bias is not None:
            conv.bias.copy_(bias)


def accumulate(acc: dict[str, torch.Tensor], s: torch.Tensor, t: torch.Tensor) -> None:
    """Add the count, sums and cross-products of the rows ``s`` (N, C_s) and ``t`` (N, C_t) to ``acc``."""
    parts = {"n": s.new_tensor(s.shape[0]), "s": s.sum(0), "t": t.sum(0), "ss": s.T @ s, "ts": t.T @ s}
    for key, value in parts.items():
        acc[key] = acc[key] + value if key in acc else value


def ridge_solution(acc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (C_t, C_s) and bias (C_t) of the ridge regression whose sums ``acc`` holds."""
    n = acc["n"]
    mean_s, mean_t = acc["s"] / n, acc["t"] / n
    cov_ss = acc["ss"] / n - torch.outer(mean_s, mean_s)
    cov_ts = acc["ts"] / n - torch.outer(mean_t, mean_s)
    variance = cov_ss.diagonal().mean()
    ridge = RIDGE * variance if variance > 0 else 1.0  # constant maps: C_ts = 0, so W = 0 for any ridge
    eye = torch.eye(len(mean_s), dtype=cov_ss.dtype, device=cov_ss.device)
    weight = torch.linalg.solve(cov_ss + ridge * eye, cov_ts.T).T  # C_ss is symmetric: solve for W^T
    return weight, mean_t - weight @ mean_s
