"""A student built from a yaml starts from a selection of its teacher's weights instead of random ones.

Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024, arXiv:2311.18823): every tensor of
the student takes the elements of the teacher's tensor of the same name at an even spread along each dimension.
The paper spreads by rounding ``linspace(0, T-1, S)``; here element ``floor(i * T / S)`` of a teacher dimension of
size T for a student one of size S, which is every k-th element where the teacher is k times wider (YOLOv8s -> v8n:
twice) and keeps the selection consistent across concatenations whose parts share one width ratio: the channels a
layer keeps are those the next one reads, through C2f splits and neck concatenations too. Attention blocks lay their
channels out per head (``[q, k, v]`` of each head in turn), so there whole heads are kept with their parts spread
within, and the same head map serves the layers that read those channels. The teacher needs the student's layers
(one family, one depth), kernels, classes and box bins; otherwise the student keeps its random start.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from ultralytics.nn.modules.block import AAttn, Attention

from .models import class_names

Indices = dict[int, torch.Tensor]  # dimension -> the teacher's elements kept along it (elsewhere: the even spread)
CALIBRATION_IMAGES = 128


def spread(size: int, t_size: int) -> torch.Tensor:
    """The ``size`` of ``t_size`` elements kept: ``floor(i * t_size / size)``."""
    return torch.arange(size) * t_size // size


def selection_problem(student: nn.Module, teacher: nn.Module) -> str | None:
    """Why the teacher's weights cannot seed this student (None when they can)."""
    s_head, t_head = student.model[-1], teacher.model[-1]
    if s_head.reg_max != t_head.reg_max or class_names(student) != class_names(teacher):
        return "the teacher's head predicts other classes or box bins than the student's"
    s_state, t_state = student.state_dict(), teacher.state_dict()
    if s_state.keys() != t_state.keys():
        return "the teacher's layers differ from the student's (another family or depth)"
    for name, s in s_state.items():
        t = t_state[name]
        fits = s.dim() == t.dim() and all(a <= b for a, b in zip(s.shape, t.shape, strict=True))
        if not fits or s.shape[2:] != t.shape[2:]:  # kernels: a spread of a wider one would take off-centre taps
            return f"{name} is {tuple(t.shape)} in the teacher against {tuple(s.shape)} in the student"
    t_modules = dict(teacher.named_modules())
    for name, module in student.named_modules():
        parts = ("num_heads", "head_dim", "key_dim")  # AAttn has no key_dim: its q and k are head_dim wide
        if isinstance(module, (Attention, AAttn)) and any(
            getattr(t_modules[name], part, 0) < getattr(module, part, 0) for part in parts
        ):
            return f"{name} has fewer or narrower attention heads in the teacher than in the student"
    return None


def head_rows(s_heads: int, t_heads: int, s_parts: tuple[int, ...], t_parts: tuple[int, ...]) -> torch.Tensor:
    """The teacher channels kept from a per-head layout (``parts`` of each head in turn): whole heads at an even
    spread, each part spread within its head."""
    rows = []
    for head in spread(s_heads, t_heads).tolist():
        start = head * sum(t_parts)
        for s_part, t_part in zip(s_parts, t_parts, strict=True):
            rows.append(start + spread(s_part, t_part))
            start += t_part
    return torch.cat(rows)


def attention_indices(student: nn.Module, teacher: nn.Module) -> dict[str, Indices]:
    """Per tensor of each attention block: the rows of its q/k/v projection, and the value channels that its
    positional conv writes and its output projection reads, kept head by head."""
    t_modules = dict(teacher.named_modules())
    chosen: dict[str, Indices] = {}
    for name, s in student.named_modules():
        if not isinstance(s, (Attention, AAttn)):
            continue
        t = t_modules[name]
        qk_s, qk_t = (s.key_dim, t.key_dim) if isinstance(s, Attention) else (s.head_dim, t.head_dim)
        qkv = head_rows(s.num_heads, t.num_heads, (qk_s, qk_s, s.head_dim), (qk_t, qk_t, t.head_dim))
        values = head_rows(s.num_heads, t.num_heads, (s.head_dim,), (t.head_dim,))
        for key, tensor in s.state_dict().items():
            if tensor.dim() and key.startswith(("qkv.", "pe.")):
                chosen[f"{name}.{key}"] = {0: qkv if key.startswith("qkv.") else values}
        chosen[f"{name}.proj.conv.weight"] = {1: values}
    return chosen


def selection_indices(student: nn.Module, teacher: nn.Module) -> dict[str, list[torch.Tensor]]:
    """For every student tensor, the teacher's elements it takes along each of its dimensions."""
    special = attention_indices(student, teacher)
    t_state = teacher.state_dict()
    return {
        name: [
            special.get(name, {}).get(dim, spread(size, t_size))
            for dim, (size, t_size) in enumerate(zip(s.shape, t_state[name].shape, strict=True))
        ]
        for name, s in student.state_dict().items()
    }


def select_weights(student: nn.Module, teacher: nn.Module) -> None:
    """Copy into the student the teacher's selected elements of every tensor (parameters and BatchNorm statistics;
    :func:`selection_problem` must have found none)."""
    t_state = teacher.state_dict()
    selected = {}
    for name, per_dim in selection_indices(student, teacher).items():
        t = t_state[name]
        for dim, kept in enumerate(per_dim):
            t = t.index_select(dim, kept.to(t.device))
        selected[name] = t
    student.load_state_dict(selected)  # copies into the student's own dtype and device


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images: Iterable[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``images``. The teacher's,
    selected, describe sums over all of its input channels: a student's conv sums over a share of them, and its
    outputs come out with a fraction of that variance, so eval-mode forwards (the first validation, the report's
    "student before", frozen statistics) would normalise by the wrong scale until training had replaced them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches seen
    training = model.training
    model.train()
    for img in images:
        model(img)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.train(training)
