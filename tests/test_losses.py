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
    )


def identity_adapter(loss: torch.nn.Module) -> torch.nn.Module:
    assert isinstance(loss.adapter, torch.nn.Identity)
    return loss


def test_mimic_matches_hand_value() -> None:
    s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    t = torch.tensor([0.0, 2.0, 5.0, 4.0]).view(1, 1, 2, 2)
    loss = identity_adapter(build_loss("mimic", {}, 1, 1))(s, t, context())
    assert loss.item() == pytest.approx((1 + 0 + 4 + 0) / 4)


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
    loss = build_loss("cls_kd", {"mode": "kl", "temperature": 2.0})({"scores": s}, {"scores": t}, context(anchors=1))
    p_t = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    expected = (p_t * (p_t.log() - math.log(0.5))).sum() * 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cls_kd_weighting_by_teacher_confidence() -> None:
    s = torch.zeros(1, 1, 2)
    t = torch.tensor([[[10.0, -10.0]]])
    conf = torch.tensor([[0.0, 1.0]])  # only the second anchor counts
    loss = build_loss("cls_kd", {"weight_by": "teacher_conf"})(
        {"scores": s}, {"scores": t}, context(anchors=2, conf=conf)
    )
    p = torch.sigmoid(torch.tensor(-10.0))
    expected = p * torch.log(p / 0.5) + (1 - p) * torch.log((1 - p) / 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_dfl_kd_hand_value() -> None:
    # one anchor, reg_max 2: each side has logits (0, 0) for the student and (log 3, 0) for the teacher
    s = torch.zeros(1, 8, 1)
    t = torch.tensor([math.log(3.0), 0.0] * 4).view(1, 8, 1)
    loss = build_loss("dfl_kd", {"weight_by": "none"})({"boxes": s}, {"boxes": t}, context(anchors=1))
    side = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert loss.item() == pytest.approx(4 * side, rel=1e-5)


@pytest.mark.parametrize("name", ["cls_kd", "dfl_kd", "box_kd"])
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


@pytest.fixture(scope="module")
def teacher_net() -> torch.nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", nc=3, verbose=False)


@pytest.mark.parametrize("name", sorted(LOSSES))
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
    with pytest.raises(DistillError, match="valid losses: at, box_kd, cls_kd, cwd"):
        recipe_from_dict({"losses": {"kd": {"weight": 1}}})
    with pytest.raises(DistillError, match="has no parameter 'temp'.*tau"):
        recipe_from_dict({"losses": {"cwd": {"temp": 2}}})
    with pytest.raises(DistillError, match="cls_kd mode 'soft' unknown"):
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
