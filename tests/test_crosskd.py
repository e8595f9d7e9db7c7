"""CrossKD (Wang et al., CVPR 2024): the student's Detect inputs through the teacher's frozen head, against its
formula, zero at agreement, and where its gradients go."""

from __future__ import annotations

import copy

import pytest
import torch

from distill_cli.losses import build_loss


def cross_inputs(teacher_net: torch.nn.Module):
    """A Teacher over ``teacher_net``, its head's outputs on random Detect inputs (an untrained network's own
    features are nearly constant), and per-branch contexts."""
    from distill_cli.distiller import Teacher, make_context

    torch.manual_seed(0)
    teacher = Teacher(copy.deepcopy(teacher_net), [], torch.device("cpu"), torch.float32)
    feats = [torch.randn(2, c, s, s) for c, s in ((64, 8), (128, 4), (256, 2))]
    with torch.no_grad():
        out = {"one2many": teacher.head.forward_head(feats, **teacher.head.one2many)}
    batch = {"img": torch.rand(2, 3, 64, 64), "bboxes": torch.zeros(0, 4), "batch_idx": torch.zeros(0)}
    fg = torch.zeros(2, out["one2many"]["scores"].shape[2], dtype=torch.bool)
    fg[:, :5] = True
    contexts = {"one2many": make_context(out["one2many"], out["one2many"], fg, batch)}
    return teacher, out, contexts


def test_crosskd_is_zero_when_the_student_feeds_the_teachers_own_inputs(teacher_net: torch.nn.Module) -> None:
    teacher, out, contexts = cross_inputs(teacher_net)
    feats = [f.clone() for f in out["one2many"]["feats"]]
    channels = [(f.shape[1], f.shape[1]) for f in feats]
    loss = build_loss("crosskd", {}, channels=channels)(feats, teacher.head, out, contexts)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)


def test_crosskd_trains_student_and_adapters_through_the_frozen_teacher_head(teacher_net: torch.nn.Module) -> None:
    teacher, out, contexts = cross_inputs(teacher_net)
    feats = [torch.randn(2, f.shape[1] // 2, *f.shape[2:], requires_grad=True) for f in out["one2many"]["feats"]]
    channels = [(f.shape[1], f.shape[1] * 2) for f in feats]
    crosskd = build_loss("crosskd", {}, channels=channels)
    loss = crosskd(feats, teacher.head, out, contexts)
    loss.backward()
    assert loss.item() > 0 and all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert all(a.weight.grad.abs().sum() > 0 for a in crosskd.adapters)
    assert all(p.grad is None and not p.requires_grad for p in teacher.head.parameters())


def test_align_scale_gives_the_student_map_the_teachers_channel_statistics() -> None:
    from distill_cli.losses.cross import align_scale

    s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    t = 10 * s + 5  # per channel: mean 30, std 10 x that of s
    assert torch.allclose(align_scale(s, t), t, atol=1e-4)
    assert torch.allclose(align_scale(-s, t), t.flip(-1).flip(-2), atol=1e-4)  # the pattern stays the student's


def test_crosskd_is_its_formula_on_the_teachers_head(teacher_net: torch.nn.Module) -> None:
    """cls = sum BCE(x, p_t) |sigma(x) - p_t| / N_pos and box = LD weighted by the teacher's confidence, on the
    predictions of the teacher's own head fed the adapted, statistics-aligned student maps."""
    from distill_cli.losses.cross import align_scale
    from distill_cli.losses.output import box_divergence, class_divergence

    teacher, out, contexts = cross_inputs(teacher_net)
    torch.manual_seed(1)
    feats = [torch.randn(2, f.shape[1] // 2, *f.shape[2:]) for f in out["one2many"]["feats"]]
    crosskd = build_loss("crosskd", {"box_weight": 2.0}, channels=[(f.shape[1], 2 * f.shape[1]) for f in feats])
    with torch.no_grad():
        loss = crosskd(feats, teacher.head, out, contexts)
        maps = zip(crosskd.adapters, feats, out["one2many"]["feats"], strict=True)
        aligned = [align_scale(adapter(f), t) for adapter, f, t in maps]
        cross = teacher.head.forward_head(aligned, **teacher.head.one2many)
    t, ctx = out["one2many"], contexts["one2many"]
    cls = class_divergence(cross["scores"], t["scores"], "qfl").sum() / 10  # 5 positives in each of 2 images
    box = (box_divergence(cross["boxes"], t["boxes"], 1.0) * ctx.teacher_conf).sum() / ctx.teacher_conf.sum()
    assert loss.item() == pytest.approx((cls + 2.0 * box).item(), rel=1e-5)


def test_align_scale_of_a_single_position_is_finite() -> None:
    from distill_cli.losses.cross import align_scale

    assert torch.isfinite(align_scale(torch.ones(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))).all()
