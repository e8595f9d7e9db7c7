"""teacher_scale above 1: the teacher sees the batch upsampled (up to 2x), its head mapped onto the student's grid."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from ultralytics.nn.tasks import DetectionModel

from distill_cli.config import load_recipe
from distill_cli.distiller import Teacher
from distill_cli.errors import DistillError
from distill_cli.losses.output import distances
from distill_cli.probe import probe_channels
from distill_cli.teacher_scale import averaged, resample, resolved, scaled_head, two_hot, view_size
from distill_cli.training import train

from .conftest import saved_teacher

NC = 2


def plain_head(grids: list[int], batch: int = 1) -> dict:
    """A head without DFL bins (reg_max 1): every anchor background (logit -9) with distances of 1 grid unit."""
    anchors = sum(g * g for g in grids)
    return {
        "scores": torch.full((batch, NC, anchors), -9.0),
        "boxes": torch.ones(batch, 4, anchors),
        "feats": [torch.zeros(batch, 1, g, g) for g in grids],
    }


def put(head: dict, grids: list[int], level: int, row: int, col: int, logit: float, ltrb: list[float]) -> None:
    index = sum(g * g for g in grids[:level]) + row * grids[level] + col
    head["scores"][0, 1, index] = logit
    head["boxes"][0, :, index] = torch.tensor(ltrb)


def at(head: dict, grids: list[int], level: int, row: int, col: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = sum(g * g for g in grids[:level]) + row * grids[level] + col
    return head["scores"][0, :, index], head["boxes"][0, :, index]


def test_two_hot_logits_have_the_distance_as_their_expectation() -> None:
    dist = torch.tensor([[[0.0, 2.25, 7.5, 14.9, 20.0, -1.0]]]).expand(1, 4, 6)
    logits = two_hot(dist, 16)
    assert logits.shape == (1, 64, 6)
    expected = torch.tensor([0.0, 2.25, 7.5, 14.9, 15 - 1e-3, 0.0])  # clamped to the bins
    assert torch.allclose(distances(logits, 16)[0, :, 0], expected, atol=1e-3)
    assert two_hot(dist, 1) is dist  # a head without bins keeps its distances


def test_resampling_gives_each_teacher_cell_to_the_cell_that_holds_its_centre() -> None:
    conf = torch.zeros(1, 1, 4, 4)
    conf[0, 0, 1, 0], conf[0, 0, 2, 3] = 0.9, 0.7
    logits = torch.arange(16.0).view(1, 1, 4, 4)
    boxes = torch.arange(64.0).view(1, 4, 4, 4)
    pooled_logits, pooled_boxes, pooled_conf = resample((logits, boxes, conf), (2, 2))
    # blocks: (1, 0) the 0.9; all zero, so the first cell (0, 2); all zero, (2, 0); (2, 3) the 0.7
    assert pooled_logits[0, 0].tolist() == [[4.0, 2.0], [8.0, 11.0]]
    assert pooled_boxes[0, 1, 1, 1].item() == 16 + 11
    assert torch.allclose(pooled_conf[0, 0], torch.tensor([[0.9, 0.0], [0.0, 0.7]]))
    # 4 -> 3 cells a side: centres at 0.375, 1.125, 1.875 and 2.625 cells, so row 1 holds teacher rows 1 and 2 (the
    # 0.9 at (1, 0) wins it), rows 0 and 2 one each; (2, 3) lands in (1, 2) only
    three, _, three_conf = resample((logits, boxes, conf), (3, 3))
    assert three[0, 0, :, 0].tolist() == [0.0, 4.0, 12.0]
    assert three_conf[0, 0, 1, 2].item() == pytest.approx(0.7) and three_conf[0, 0, 2, 2].item() == 0.0
    # 2 -> 3 (a coarser grid): centres at 0.75 and 2.25 cells; the middle cell gets nothing, so -2 (any candidate wins)
    coarse = (torch.tensor([[[[1.0, 2.0]]]]).transpose(2, 3), torch.zeros(1, 4, 2, 1), torch.tensor([[[[0.1], [0.2]]]]))
    spread_logits, _, spread_conf = resample(coarse, (3, 1))
    assert spread_logits.flatten()[[0, 2]].tolist() == [1.0, 2.0]
    assert spread_conf.flatten().tolist() == pytest.approx([0.1, -2.0, 0.2])


def test_the_view_is_each_side_times_the_scale_rounded_to_the_largest_stride() -> None:
    assert view_size((256, 256), 2.0, 32) == (512, 512)
    assert view_size((320, 320), 1.6, 32) == (512, 512)
    assert view_size((288, 288), float(f"{512 / 288:g}"), 32) == (512, 512)  # auto's scale as the recipe keeps it
    assert view_size((256, 192), 1.6, 32) == (416, 320)  # 409.6 and 307.2
    assert view_size((72, 72), 1.05, 32) == (72, 72)  # 75.6 rounds to 64: never below the batch, which runs as at 1


def test_each_student_anchor_takes_the_most_confident_scale_matched_teacher_anchor() -> None:
    """Student at 64 px (grids 8, 4, 2); the 2x teacher has grids 16, 8, 4; boxes worked out by hand."""
    student_grids, big_grids = [8, 4, 2], [16, 8, 4]
    big = plain_head(big_grids)
    # 2x level 1 (stride 16 at 2x = 8 student px, the student's level 0 grid): distances carry over unchanged
    put(big, big_grids, 1, 3, 5, 2.0, [1.0, 2.0, 3.0, 0.5])
    # 2x level 0 cell (1, 1): stride 8 at 2x = 4 student px, centre (6, 6) px, sides 2 units = 8 px: box -2..14 px;
    # pooled into student cell (0, 0) of level 0, centre (4, 4): ltrb (4 - -2, 4 - -2, 14 - 4, 14 - 4) / 8
    put(big, big_grids, 0, 1, 1, 3.0, [2.0, 2.0, 2.0, 2.0])
    put(big, big_grids, 1, 0, 0, 1.0, [9.0, 9.0, 9.0, 9.0])  # less confident than the pooled one: loses
    # the last level has only the 2x last level, pooled: cell (2, 1) of 4x4 (stride 32 at 2x = 16 student px) centre
    # (24, 40) px, sides 1 unit = 16 px: box 8..40 x 24..56; student cell (1, 0), centre (16, 48): ltrb / 32
    put(big, big_grids, 2, 2, 1, 0.5, [1.0, 1.0, 1.0, 1.0])
    out = scaled_head(big, reg_max=1, view=(128, 128), size=(64, 64), strides=[8, 16, 32])
    assert out["scores"].shape == out["boxes"].shape[:1] + (NC, 84)
    assert [tuple(f.shape[2:]) for f in out["feats"]] == [(8, 8), (4, 4), (2, 2)]  # the student's grids
    logits, box = at(out, student_grids, 0, 3, 5)
    assert logits[1].item() == 2.0 and box.tolist() == pytest.approx([1.0, 2.0, 3.0, 0.5])
    logits, box = at(out, student_grids, 0, 0, 0)
    assert logits[1].item() == 3.0 and box.tolist() == pytest.approx([0.75, 0.75, 1.25, 1.25])
    logits, box = at(out, student_grids, 2, 1, 0)
    assert logits[1].item() == 0.5 and box.tolist() == pytest.approx([8 / 32, 24 / 32, 24 / 32, 8 / 32])
    logits, _ = at(out, student_grids, 1, 0, 0)  # 2x level 1 also pools into the student's level 1
    assert logits[1].item() == 1.0
    logits, _ = at(out, student_grids, 1, 3, 3)  # nothing there: background stays background
    assert logits.tolist() == [-9.0, -9.0]


def test_a_scale_between_1_and_2_gives_a_coarser_teacher_cell_to_one_student_cell() -> None:
    """Student at 96 px (grids 12, 6, 3), the teacher at 160 px (x 5/3: grids 20, 10, 5); worked out by hand."""
    student_grids, view_grids = [12, 6, 3], [20, 10, 5]
    seen = plain_head(view_grids)
    # view level 1 cell (4, 7): stride 16, centre (120, 72) view px, sides 1 unit: box 104..136 x 56..88 view px,
    # x 0.6 = 62.4..81.6 x 33.6..52.8 student px
    put(seen, view_grids, 1, 4, 7, 2.0, [1.0, 1.0, 1.0, 1.0])
    out = scaled_head(seen, reg_max=1, view=(160, 160), size=(96, 96), strides=[8, 16, 32])
    # onto the student's level 0 (10 -> 12 cells a side) the centre of teacher cell (4, 7), at (4.5, 7.5) x 1.2 = (5.4,
    # 9) student cells, lands in cell (5, 9) alone: centre (76, 44) px, ltrb (13.6, 10.4, 5.6, 8.8) / 8
    logits, box = at(out, student_grids, 0, 5, 9)
    assert logits[1].item() == 2.0 and box.tolist() == pytest.approx([1.7, 1.3, 0.7, 1.1], abs=1e-5)
    hit = [(r, c) for r in range(12) for c in range(12) if at(out, student_grids, 0, r, c)[0][1] == 2.0]
    assert hit == [(5, 9)]


def test_each_axis_of_a_box_is_brought_to_the_students_pixels_by_its_own_ratio() -> None:
    """Student 64 x 96 (H x W; level 0 grid 8 x 12), view 96 x 160 (x 1.5 down, x 5/3 across; grid 12 x 20)."""
    view_grids = [(12, 20), (6, 10), (3, 5)]
    anchors = sum(h * w for h, w in view_grids)
    seen = {
        "scores": torch.full((1, NC, anchors), -9.0),
        "boxes": torch.ones(1, 4, anchors),
        "feats": [torch.zeros(1, 1, h, w) for h, w in view_grids],
    }
    # view level 0 cell (5, 9): centre (76, 44) view px, sides 8 px: x 68..84 (x 0.6: 40.8..50.4), y 36..52 (x 2/3:
    # 24..34.67); that centre is in student cell (3, 5), centre (44, 28): ltrb (3.2, 4, 6.4, 6.67) / 8
    seen["scores"][0, 1, 5 * 20 + 9] = 2.0
    out = scaled_head(seen, reg_max=1, view=(96, 160), size=(64, 96), strides=[8, 16, 32])
    assert out["scores"][0, 1, 3 * 12 + 5].item() == 2.0
    assert out["boxes"][0, :, 3 * 12 + 5].tolist() == pytest.approx([0.4, 0.5, 0.8, 5 / 6])


def test_a_candidate_whose_box_holds_the_students_anchor_wins_over_a_more_confident_one_that_does_not() -> None:
    """Student 64 px, 2x view: for student level 0 cell (0, 0) (centre (4, 4) px) the pooled level 0 cell holds a
    confident box beside the anchor (x 6..10 px), the level 1 cell a less confident box around it."""
    student_grids, big_grids = [8, 4, 2], [16, 8, 4]
    big = plain_head(big_grids)
    put(big, big_grids, 0, 0, 1, 3.0, [0.25, 0.25, 0.25, 0.25])  # centre (6, 2) px, x 5..7, y 1..3 student px
    put(big, big_grids, 1, 0, 0, 1.0, [0.5, 0.5, 0.5, 0.5])  # centre (4, 4), sides 4 px: holds the anchor
    out = scaled_head(big, reg_max=1, view=(128, 128), size=(64, 64), strides=[8, 16, 32])
    logits, box = at(out, student_grids, 0, 0, 0)
    assert logits[1].item() == 1.0 and box.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5])


def test_a_candidate_whose_box_would_reach_past_the_last_dfl_bin_loses_to_one_that_fits() -> None:
    """Student 64 px (grids 8, 4, 2), view 96 (x 1.5: grids 12, 6, 3), 16 DFL bins; student level 0 cell (4, 4) has
    centre (36, 36) px. Its coarser candidate, view level 1 cell (3, 3), is confident with 12 bins a side (192 view px =
    128 student px = 16 of the student's strides, past the last bin); its finer one, view level 0 cell (6, 6) (centre
    (52, 52) view px = (34.67, 34.67)), has 2 bins a side (16 view px = 10.67 px): box 24..45.33, ltrb (12, 12, 9.33,
    9.33) / 8."""
    grids = [12, 6, 3]
    dist = torch.ones(1, 4, sum(g * g for g in grids))
    scores = torch.full((1, NC, dist.shape[2]), -9.0)
    for level, cell, logit, bins in ((1, 3 * 6 + 3, 3.0, 12.0), (0, 6 * 12 + 6, 1.0, 2.0)):
        index = sum(g * g for g in grids[:level]) + cell
        scores[0, 1, index], dist[0, :, index] = logit, bins
    seen = {"scores": scores, "boxes": two_hot(dist, 16), "feats": [torch.zeros(1, 1, g, g) for g in grids]}
    out = scaled_head(seen, reg_max=16, view=(96, 96), size=(64, 64), strides=[8, 16, 32])
    index = 4 * 8 + 4
    assert out["scores"][0, 1, index].item() == 1.0
    assert distances(out["boxes"], 16)[0, index].tolist() == pytest.approx([1.5, 1.5, 7 / 6, 7 / 6], abs=1e-3)


@pytest.mark.parametrize(("yaml", "scale", "view"), [("yolov8n.yaml", 2.0, 128), ("yolo26n.yaml", 1.6, 96)])
def test_a_scaled_teacher_runs_once_at_its_view_and_answers_on_the_students_anchors(
    yaml: str, scale: float, view: int
) -> None:
    """DFL bins and plain distances on two branches; 64 px x 1.6 = 102.4, rounded to the stride 32: 96."""
    torch.manual_seed(0)
    model = DetectionModel(yaml, nc=NC, verbose=False)
    images = torch.rand(2, 3, 64, 64)
    plain = Teacher(model, [], torch.device("cpu"), torch.float32)(images).head
    calls = []
    scaled = Teacher(model, [], torch.device("cpu"), torch.float32, scales=(scale,))
    scaled.runner.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-1]))
    head = scaled(images).head
    assert calls == [view] and head.keys() == plain.keys()
    for branch in head:
        assert head[branch]["scores"].shape == plain[branch]["scores"].shape
        assert head[branch]["boxes"].shape == plain[branch]["boxes"].shape
        assert torch.isfinite(head[branch]["boxes"]).all()
        assert not torch.equal(head[branch]["scores"], plain[branch]["scores"])


def test_views_are_averaged_per_anchor_probabilities_by_mean_boxes_weighted_by_each_views_confidence() -> None:
    """Two views on 2 anchors, 16 DFL bins; worked out by hand. Anchor 0: class 1 at p 0.5 with sides 2 in one view,
    p 0.9 with sides 4 in the other (its class 0 at 0.3): p 0.7, sides (0.5 * 2 + 0.9 * 4) / 1.4, the weights each
    view's largest probability, not its mean. Anchor 1: seen by the first view only (p 0.8, sides 6; the other view's
    class 0 at p 0.2 is its largest probability there, sides 10)."""

    def view(p: list[list[float]], sides: list[float]) -> dict:
        dist = torch.tensor(sides).view(1, 1, 2).expand(1, 4, 2).clone()
        return {
            "scores": torch.logit(torch.tensor([p])),
            "boxes": two_hot(dist, 16),
            "feats": [torch.zeros(1, 5, 1, 2)],
        }

    first = view([[1e-3, 1e-3], [0.5, 0.8]], [2.0, 6.0])
    second = view([[0.3, 0.2], [0.9, 1e-3]], [4.0, 10.0])
    out = averaged([first, second], reg_max=16)
    assert out["scores"].sigmoid()[0].flatten().tolist() == pytest.approx([0.1505, 0.1005, 0.7, 0.4005], abs=1e-5)
    sides = distances(out["boxes"], 16)[0]  # (A, 4)
    assert sides[0].tolist() == pytest.approx([4.6 / 1.4] * 4, abs=5e-4)
    assert sides[1].tolist() == pytest.approx([(0.8 * 6 + 0.2 * 10) / 1.0] * 4, abs=5e-4)
    assert [tuple(f.shape) for f in out["feats"]] == [(1, 0, 1, 2)]  # the grid's shape, no features


def test_a_teacher_with_two_views_runs_once_per_view_and_answers_their_average() -> None:
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=NC, verbose=False)
    images = torch.rand(2, 3, 64, 64)
    calls = []
    both = Teacher(model, [], torch.device("cpu"), torch.float32, scales=(1.0, 2.0))
    both.runner.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-1]))
    head = both(images).head["one2many"]
    assert calls == [64, 128]
    views = [Teacher(model, [], torch.device("cpu"), torch.float32, (s,))(images).head["one2many"] for s in (1, 2)]
    expected = averaged(views, reg_max=16)
    assert torch.allclose(head["scores"], expected["scores"]) and torch.allclose(head["boxes"], expected["boxes"])
    with pytest.raises(ValueError, match="hooks no layer"):
        Teacher(model, [4], torch.device("cpu"), torch.float32, scales=(1.0, 2.0))
    in_bf16 = Teacher(model, [], torch.device("cpu"), torch.bfloat16, scales=(1.0, 2.0))(images).head["one2many"]
    assert in_bf16["scores"].dtype == in_bf16["boxes"].dtype == torch.float32  # the 1x view's bf16 head joins fp32
    assert torch.isfinite(in_bf16["scores"]).all() and torch.isfinite(in_bf16["boxes"]).all()


@pytest.mark.parametrize(("trained", "scale"), [(128, "2"), (96, "1+2")])  # the student at 64 px: x2, x1.5
def test_the_default_picks_its_view_by_the_teachers_training_size_and_a_feature_term_refuses_it(
    run_kwargs: dict, tmp_path: Path, trained: int, scale: str
) -> None:
    teacher = saved_teacher(tmp_path / f"teacher{trained}.pt", "yolov8s.yaml", trained)
    result = train(recipe="default", report=False, **{**run_kwargs, "teacher": str(teacher)})  # at 64 px
    assert result.best.is_file()
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["recipe"]["teacher_scale"] == scale
    with pytest.raises(DistillError, match=f"teacher_scale {re.escape(scale)}: term.s. cwd read more of the teacher"):
        train(recipe="cwd", report=False, teacher_scale=scale, **{**run_kwargs, "name": "cwd"})


def test_what_cannot_take_a_view_above_1_refuses_it(run_kwargs: dict, tmp_path: Path) -> None:
    e2e = {
        "name": "e2e",
        "student": "yolo26n.yaml",
        "teacher": str(saved_teacher(tmp_path / "e2e.pt", "yolo26s.yaml", 128)),
    }
    with pytest.raises(DistillError, match="teacher_scale 2: an end-to-end head"):
        train(recipe="default", report=False, teacher_scale=2, **{**run_kwargs, **e2e})
    with pytest.raises(DistillError, match="teacher_scale"):
        train(recipe="default", report=False, teacher_scale=3, **{**run_kwargs, "name": "three"})


@pytest.mark.parametrize(
    ("imgsz", "trained", "recipe", "yaml", "expected"),
    [
        (256, 512, "default", "yolov8s.yaml", "2"),  # 512 is 2x: the teacher sees the objects at the size it learned
        (320, 512, "default", "yolov8s.yaml", "2"),  # 640 = 1.25 x 512: the largest view auto picks alone
        (352, 512, "default", "yolov8s.yaml", "1+2"),  # x1.45: the views at 1 and 2 averaged
        (384, 512, "default", "yolov8s.yaml", "1+2"),  # x1.33
        (416, 512, "default", "yolov8s.yaml", "1"),  # x1.23: its view at 2 is the worst, the average taught less
        (512, 512, "default", "yolov8s.yaml", "1"),  # the teacher's own size
        (160, 512, "default", "yolov8s.yaml", "2"),  # never more than 2, which the mapping pairs levels for
        (256, None, "default", "yolov8s.yaml", "1"),  # a teacher whose training size is unknown
        (256, [512, 512], "cwd", "yolov8s.yaml", "1"),  # a feature term: its maps would not line up
        (256, 512, "logits", "yolov8s.yaml", "1"),  # dfl_kd: the mapped boxes are two-hot, not the teacher's bins
        (256, 512, "default", "yolo26s.yaml", "1"),  # end to end: the one-to-one branch would get two anchors
    ],
)
def test_auto_picks_twice_the_size_or_both_views_where_they_suit_the_teacher_and_the_recipe(
    imgsz: int, trained: object, recipe: str, yaml: str, expected: str
) -> None:
    teacher = DetectionModel(yaml, nc=NC, verbose=False)
    teacher.args = {"imgsz": trained} if trained else {}
    auto = replace(load_recipe(recipe), teacher_scale="auto")
    assert resolved(auto, imgsz, teacher).teacher_scale == expected
    assert resolved(replace(auto, teacher_scale="1.5"), 384, teacher).teacher_scale == "1.5"  # as given: kept
    assert resolved(replace(auto, teacher_scale="1+1.5"), 384, teacher).teacher_scale == "1+1.5"


def test_probe_channels_says_what_the_given_recipe_does_with_the_teacher_scale(tmp_path: Path) -> None:
    teacher = str(saved_teacher(tmp_path / "teacher512.pt", "yolov8s.yaml", 512))
    verdict = {
        recipe: probe_channels(teacher, "yolov8n.yaml", imgsz=256, recipe=recipe)["teacher_scale"]
        for recipe in (None, "logits", "cwd")
    }
    assert verdict[None] == "2 (auto; imgsz 256, the teacher trained at 512)"  # the default recipe's auto
    assert verdict["logits"] == "1 (the recipe's teacher_scale; imgsz 256, the teacher trained at 512)"
    assert verdict["cwd"] == "1 (the recipe's teacher_scale; imgsz 256, the teacher trained at 512)"
    recipe = tmp_path / "cwd2.yaml"
    recipe.write_text(yaml.safe_dump({"teacher_scale": "2", "losses": {"cwd": {"weight": 1}}}))
    refused = probe_channels(teacher, "yolov8n.yaml", imgsz=256, recipe=str(recipe))["teacher_scale"]
    assert refused.startswith("refused: term(s) cwd read more of the teacher")
    assert probe_channels(teacher, "yolov8n.yaml", imgsz=256, recipe="none")["teacher_scale"].startswith("no teacher")
