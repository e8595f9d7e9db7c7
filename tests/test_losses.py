"""Loss math against hand-computed values, zero at agreement, gradients, autocast, registry errors."""

from __future__ import annotations

import math

import pytest
import torch

from distill_cli.config import recipe_from_dict
from distill_cli.errors import DistillError
from distill_cli.losses import LOSSES, DistillContext, build_loss


def context(batch: int = 1, anchors: int = 4, conf: float | torch.Tensor = 1.0, level=(2, 2)) -> DistillContext:
    teacher_conf = conf if isinstance(conf, torch.Tensor) else torch.full((batch, anchors), conf)
    grid = torch.stack(torch.meshgrid(torch.arange(level[1]) + 0.5, torch.arange(level[0]) + 0.5, indexing="xy"), -1)
    return DistillContext(
        teacher_conf=teacher_conf,
        fg_mask=torch.ones(batch, anchors, dtype=torch.bool),
        anchors=grid.view(-1, 2).float(),
        level_sizes=[level],
        strides=torch.full((anchors,), 8.0),
        imgsz=(8 * level[0], 8 * level[1]),
    )


def identity_adapter(loss: torch.nn.Module) -> torch.nn.Module:
    assert isinstance(loss.adapter, torch.nn.Identity)
    return loss


def test_mimic_matches_hand_value() -> None:
    s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    t = torch.tensor([0.0, 2.0, 5.0, 4.0]).view(1, 1, 2, 2)
    loss = identity_adapter(build_loss("mimic", {}, 1, 1))(s, t, context())
    assert loss.item() == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_sl2_reads_the_teacher_scores_in_the_teachers_own_layout() -> None:
    """A teacher with other Detect levels than the student (here one 4x4 level against the student's 2x2 map):
    its scores are split by its own level sizes and resized, not by the student's (which raised)."""
    from distill_cli.distiller import make_context

    batch = {"img": torch.zeros(1, 3, 16, 16), "bboxes": torch.zeros(0, 4), "batch_idx": torch.zeros(0)}
    student_head = {"feats": [torch.zeros(1, 1, 2, 2)]}
    teacher_head = {"feats": [torch.zeros(1, 1, 4, 4)], "scores": torch.full((1, 3, 16), 20.0)}
    ctx = make_context(student_head, teacher_head, None, batch)
    s, t = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert build_loss("sl2", {}, 1, 1)(s, t, ctx).item() == pytest.approx(1.0)


def test_sl2_weights_by_teacher_score() -> None:
    s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    t = torch.zeros(1, 1, 2, 2)
    conf = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    loss = build_loss("sl2", {}, 1, 1)(s, t, context(conf=conf))
    assert loss.item() == pytest.approx((1 * 1 + 0.5 * 9) / (1.5 * 1))


def test_cwd_matches_hand_value() -> None:
    s = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    t = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    tau = 2.0
    p_t = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    p_s = p_t[::-1]
    expected = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True)) * tau**2 / (1 * 1)
    loss = build_loss("cwd", {"tau": tau}, 1, 1)(s, t, context(level=(1, 2)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_pkd_is_one_minus_pearson() -> None:
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4)
    t = 5 * s + 2  # perfectly correlated, other scale and offset
    pkd = build_loss("pkd", {}, 3, 3)
    assert pkd(s, t, context()).item() == pytest.approx(0.0, abs=1e-6)
    assert pkd(s, -t, context()).item() == pytest.approx(2.0, rel=1e-4)  # r = -1 -> (1 - r) = 2


def test_mgd_matches_its_formula() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mgd = build_loss("mgd", {"alpha": 0.5, "ratio": 0.5}, 4, 4)
    torch.manual_seed(1)
    loss = mgd(s, t, context())
    torch.manual_seed(1)
    keep = (torch.rand(2, 1, 3, 3) >= 0.5).float()
    expected = 0.5 * (mgd.generator(s * keep) - t).pow(2).sum() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_attention_transfer_hand_value_and_zero() -> None:
    s = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    t = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    at = build_loss("at", {}, 1, 1)
    assert at(s, t, context()).item() == pytest.approx(2.0)  # ||e1 - e2||^2
    assert at(t, t, context()).item() == pytest.approx(0.0)


def test_cls_kd_bce_is_binary_kl() -> None:
    s_logit, t_logit = torch.tensor(0.0), torch.tensor(math.log(3.0))  # p_s = 0.5, p_t = 0.75
    student = {"scores": s_logit.view(1, 1, 1)}
    teacher = {"scores": t_logit.view(1, 1, 1)}
    loss = build_loss("cls_kd", {"mode": "bce"})(student, teacher, context(anchors=1))
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cls_kd_kl_with_temperature() -> None:
    s = torch.tensor([0.0, 0.0]).view(1, 2, 1)
    t = torch.tensor([2.0, 0.0]).view(1, 2, 1)
    kl = {"mode": "kl", "temperature": 2.0, "weight_by": "positives"}
    loss = build_loss("cls_kd", kl)({"scores": s}, {"scores": t}, context(anchors=1))
    p_t = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    expected = (p_t * (p_t.log() - math.log(0.5))).sum() * 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cls_kd_weighting_by_teacher_confidence_and_positive_count() -> None:
    s = torch.zeros(1, 1, 2)
    t = torch.tensor([[[10.0, -10.0]]])
    conf = torch.tensor([[0.0, 1.0]])  # only the second anchor counts
    ctx = context(anchors=2, conf=conf)
    loss = build_loss("cls_kd", {"weight_by": "teacher_conf"})({"scores": s}, {"scores": t}, ctx)
    p = torch.sigmoid(torch.tensor(-10.0))
    expected = p * torch.log(p / 0.5) + (1 - p) * torch.log((1 - p) / 0.5)
    assert loss.item() == pytest.approx(expected.item() / 2, rel=1e-4)  # divided by the 2 positives
    ctx.fg_mask = torch.tensor([[True, False]])
    loss = build_loss("cls_kd", {"weight_by": "teacher_conf"})({"scores": s}, {"scores": t}, ctx)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)  # 1 positive


def test_cls_kd_keeps_its_scale_when_the_anchor_grid_grows() -> None:
    """The old mean over every anchor faded as imgsz grew; normalised by positives, more background anchors that
    agree with the teacher change nothing."""
    torch.manual_seed(0)
    s, t = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    ctx = context(anchors=4)
    small = build_loss("cls_kd", {})({"scores": s}, {"scores": t}, ctx)
    background = torch.full((1, 3, 60), -12.0)
    big_ctx = context(anchors=64, level=(8, 8))
    big_ctx.fg_mask[:, 4:] = False
    big = build_loss("cls_kd", {})(
        {"scores": torch.cat([s, background], 2)}, {"scores": torch.cat([t, background], 2)}, big_ctx
    )
    assert big.item() == pytest.approx(small.item(), rel=1e-4)


def test_qfl_mode_hand_value() -> None:
    """CrossKD/BCKD's class term: sum BCE(x, sigma(t)) * |sigma(x) - sigma(t)| / N_pos (values hand-computed)."""
    x = torch.tensor([[0.0, -1.0], [1.0, 0.5]]).T.unsqueeze(0)  # (1, nc=2, A=2)
    t = torch.tensor([[2.0, -2.0], [0.0, 1.0]]).T.unsqueeze(0)
    ctx = context(anchors=2)
    ctx.fg_mask = torch.tensor([[True, False]])  # N_pos = 1
    loss = build_loss("cls_kd", {"mode": "qfl"})({"scores": x}, {"scores": t}, ctx)
    assert loss.item() == pytest.approx(0.582704, rel=1e-5)


def test_dfl_kd_hand_value() -> None:
    # one anchor, reg_max 2: each side has logits (0, 0) for the student and (log 3, 0) for the teacher
    s = torch.zeros(1, 8, 1)
    t = torch.tensor([math.log(3.0), 0.0] * 4).view(1, 8, 1)
    loss = build_loss("dfl_kd", {"weight_by": "none"})({"boxes": s}, {"boxes": t}, context(anchors=1))
    side = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert loss.item() == pytest.approx(side, rel=1e-5)  # the mean over the 4 sides, as ultralytics' DFL


def test_dfl_kd_temperature_hand_value() -> None:
    """LD at T = 10 (toy 2 bins): teacher (0, 0), student (0, 10 ln 3): KL((.5,.5) || (.25,.75)) x T^2."""
    s = torch.tensor([0.0, 10 * math.log(3.0)] * 4).view(1, 8, 1)
    t = torch.zeros(1, 8, 1)
    loss = build_loss("dfl_kd", {"temperature": 10.0, "weight_by": "none"})({"boxes": s}, {"boxes": t}, context(1))
    assert loss.item() == pytest.approx(0.143841 * 100, rel=1e-4)


def test_dfl_kd_refuses_a_head_without_dfl_bins() -> None:
    from types import SimpleNamespace

    from distill_cli.losses import LOSSES

    yolo26 = SimpleNamespace(reg_max=1)
    with pytest.raises(DistillError, match="reg_max 1.*use box_kd"):
        LOSSES["dfl_kd"].check_head("dfl_kd", yolo26, yolo26, {})
    for method in ("box_kd", "bckd", "cls_kd", "crosskd"):
        LOSSES[method].check_head(method, yolo26, yolo26, {})  # these apply to plain distances


def test_bckd_hand_value_on_plain_distances() -> None:
    """BCKD on a reg_max 1 head (boxes are ltrb distances): class term 0.582704 + 4 x the IoU-weighted GIoU term
    ((0.380797 * 2/3 + 0.231059 * 8/9) = 0.459250), both over N_pos = 1 (values hand-computed)."""
    s_cls = torch.tensor([[0.0, -1.0], [1.0, 0.5]]).T.unsqueeze(0)
    t_cls = torch.tensor([[2.0, -2.0], [0.0, 1.0]]).T.unsqueeze(0)
    s_box = torch.tensor([[1.0, 1, 1, 1], [0.5, 0.5, 0.5, 0.5]]).T.unsqueeze(0)  # (1, 4, A=2)
    t_box = torch.tensor([[0.0, 1, 2, 1], [1.5, 1.5, 1.5, 1.5]]).T.unsqueeze(0)
    ctx = context(anchors=2)
    ctx.anchors = torch.tensor([[1.0, 1.0], [1.5, 1.5]])
    ctx.fg_mask = torch.tensor([[True, False]])
    loss = build_loss("bckd", {}, reg_max=1)({"scores": s_cls, "boxes": s_box}, {"scores": t_cls, "boxes": t_box}, ctx)
    assert loss.item() == pytest.approx(0.582704 + 4 * 0.459250, rel=1e-4)


def test_box_kd_on_plain_distances_is_iou_plus_l1() -> None:
    """reg_max 1 (YOLO26): 1 - CIoU + image-normalised L1 of the ltrb distances; not a silent zero."""
    s = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 4, 1)
    t = torch.tensor([2.0, 2.0, 2.0, 2.0]).view(1, 4, 1)
    ctx = context(anchors=1, level=(1, 1))
    ctx.anchors = torch.tensor([[4.0, 4.0]])
    loss = build_loss("box_kd", {"iou": "iou", "conf_thresh": 0.0}, reg_max=1)({"boxes": s}, {"boxes": t}, ctx)
    iou = 4 / 16  # a 2x2 box inside a 4x4 box with the same centre
    l1 = 1.0 * 8 / 8  # |1 - 2| grid units x stride 8 / imgsz 8, the same for all four sides
    assert loss.item() == pytest.approx(1 - iou + l1, rel=1e-5)


@pytest.mark.parametrize("name", ["cls_kd", "dfl_kd", "box_kd", "bckd"])
def test_output_losses_are_zero_when_student_equals_teacher(name: str) -> None:
    torch.manual_seed(0)
    head = {"scores": torch.randn(2, 3, 4), "boxes": torch.randn(2, 64, 4)}
    loss = build_loss(name, {"conf_thresh": 0.0} if name == "box_kd" else {})(head, head, context(batch=2, conf=0.9))
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", ["mimic", "sl2", "cwd", "pkd", "at"])
def test_feature_losses_are_zero_when_student_equals_teacher(name: str) -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 4, 2, 2)
    assert build_loss(name, {}, 4, 4)(t, t, context(batch=2)).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", ["mimic", "sl2", "mgd", "cwd", "pkd", "at"])
def test_gradients_reach_student_and_adapter_not_teacher(name: str, teacher_net: torch.nn.Module) -> None:
    from distill_cli.distiller import Teacher

    torch.manual_seed(0)
    teacher = Teacher(teacher_net, [15], torch.device("cpu"), torch.float32)
    t = teacher(torch.rand(2, 3, 64, 64)).feats[15]  # (2, 64, 8, 8), as the training loop gets it
    s = torch.randn(2, 32, 8, 8, requires_grad=True)  # 32 -> 64 channels: a 1x1 conv adapter
    loss_fn = build_loss(name, {}, 32, 64)
    loss_fn(s, t, context(batch=2, anchors=64, level=(8, 8))).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert loss_fn.adapter.weight.grad is not None and loss_fn.adapter.weight.grad.abs().sum() > 0
    assert not t.requires_grad and all(p.grad is None for p in teacher_net.parameters())
    teacher.hooks.remove()


@pytest.mark.parametrize("name", sorted(n for n in LOSSES if LOSSES[n].level != "cross"))
def test_every_loss_is_finite_under_bf16_autocast(name: str) -> None:
    torch.manual_seed(0)
    if LOSSES[name].level == "feature":
        s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
        loss_fn = build_loss(name, {}, 8, 16)
        args = (s, t)
    else:
        loss_fn = build_loss(name, {})
        args = (
            {"scores": torch.randn(2, 3, 16), "boxes": torch.randn(2, 64, 16)},
            {"scores": torch.randn(2, 3, 16), "boxes": torch.randn(2, 64, 16)},
        )
    ctx = context(batch=2, anchors=16, conf=0.8, level=(4, 4))
    ctx.gt_boxes, ctx.gt_image = torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(*args, ctx)
    assert torch.isfinite(loss)


def test_attention_focal_mask_uses_ground_truth_boxes() -> None:
    ctx = context(batch=1, anchors=16, level=(4, 4))
    ctx.gt_boxes, ctx.gt_image = torch.tensor([[0.25, 0.25, 0.5, 0.5]]), torch.tensor([0])
    mask = ctx.box_mask(4, 4)[0, 0]
    assert mask[:2, :2].eq(1).all() and mask.sum() == 4


def test_unknown_loss_and_parameter_list_valid_names() -> None:
    with pytest.raises(DistillError, match="valid losses: at, bckd, box_kd, cls_kd, crosskd, cwd"):
        recipe_from_dict({"losses": {"kd": {"weight": 1}}})
    with pytest.raises(DistillError, match="has no parameter 'temp'.*tau"):
        recipe_from_dict({"losses": {"cwd": {"temp": 2}}})
    with pytest.raises(DistillError, match="'cls_kd.mode' must be one of: bce, qfl, kl, got 'soft'"):
        build_loss("cls_kd", {"mode": "soft"})


def test_weighted_mean_ignores_zero_weight_anchors() -> None:
    s = torch.tensor([[[0.0, 5.0]]])
    t = torch.tensor([[[0.0, -5.0]]])
    conf = torch.tensor([[1.0, 0.0]])
    loss = build_loss("cls_kd", {"weight_by": "teacher_conf"})(
        {"scores": s}, {"scores": t}, context(anchors=2, conf=conf)
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    unweighted = build_loss("cls_kd", {})({"scores": s}, {"scores": t}, context(anchors=2, conf=conf))
    assert unweighted.item() > 1.0  # the zero above comes from the weighting, not from agreement


def test_cls_kd_softmax_mode_needs_an_anchor_weighting() -> None:
    with pytest.raises(DistillError, match="mode kl .* needs weight_by"):
        recipe_from_dict({"losses": {"cls_kd": {"mode": "kl"}}})
    recipe_from_dict({"losses": {"cls_kd": {"mode": "kl", "weight_by": "positives"}}})


def test_box_terms_on_plain_distances_are_zero_at_agreement_where_the_teacher_has_no_box() -> None:
    """reg_max 1 (YOLO26) distances may be negative: a box with no area along an axis after the clamp had IoU 0, so
    box_kd cost ~1 where the student equals the teacher; the teacher has no box to teach there."""
    ctx = context(anchors=1, level=(1, 1))
    ctx.anchors = torch.tensor([[4.0, 4.0]])
    head = {"boxes": torch.tensor([3.0, -0.5, 1.0, -4.0]).view(1, 4, 1)}  # top and bottom below 0: no height
    for name in ("box_kd", "bckd"):
        params = {"conf_thresh": 0.0} if name == "box_kd" else {}
        scores = {"scores": torch.zeros(1, 3, 1)}
        loss = build_loss(name, params, reg_max=1)({**head, **scores}, {**head, **scores}, ctx)
        assert loss.item() == pytest.approx(0.0, abs=1e-6), name


def test_a_student_side_below_zero_is_still_pulled_out_by_the_iou() -> None:
    """The IoU sees a negative side clamped at 0, but the clamp passes its gradient straight through: without L1
    (bckd's box part) a side below 0 used to get no gradient at all."""
    ctx = context(anchors=1, level=(1, 1))
    ctx.anchors = torch.tensor([[4.0, 4.0]])
    s = torch.tensor([-1.0, 2.0, 2.0, 2.0]).view(1, 4, 1).requires_grad_(True)
    t = torch.tensor([2.0, 2.0, 2.0, 2.0]).view(1, 4, 1)
    box_kd = build_loss("box_kd", {"conf_thresh": 0.0, "l1": 0.0, "iou": "iou"}, reg_max=1)
    box_kd({"boxes": s}, {"boxes": t}, ctx).backward()
    assert s.grad[0, 0, 0] < 0  # growing the left side raises the IoU
