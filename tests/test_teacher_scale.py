"""teacher_scale 2: the teacher sees the batch at twice its size, its head mapped onto the student's anchors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from ultralytics.nn.tasks import DetectionModel

from distill_cli.config import load_recipe
from distill_cli.data import SYNTHETIC_CLASSES
from distill_cli.distiller import Teacher
from distill_cli.errors import DistillError
from distill_cli.losses.output import distances
from distill_cli.models import save_student
from distill_cli.probe import probe_channels
from distill_cli.teacher_scale import pool_to, resolved, scaled_head, two_hot
from distill_cli.training import train

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


def test_pooling_keeps_the_most_confident_cell_of_each_block() -> None:
    conf = torch.zeros(1, 1, 4, 4)
    conf[0, 0, 1, 0], conf[0, 0, 2, 3] = 0.9, 0.7
    logits = torch.arange(16.0).view(1, 1, 4, 4)
    boxes = torch.arange(64.0).view(1, 4, 4, 4)
    pooled_logits, pooled_boxes, pooled_conf = pool_to((logits, boxes, conf), (2, 2))
    # blocks: (1, 0) the 0.9; all zero, so the first cell (0, 2); all zero, (2, 0); (2, 3) the 0.7
    assert pooled_logits[0, 0].tolist() == [[4.0, 2.0], [8.0, 11.0]]
    assert pooled_boxes[0, 1, 1, 1].item() == 16 + 11
    assert torch.allclose(pooled_conf[0, 0], torch.tensor([[0.9, 0.0], [0.0, 0.7]]))


def test_each_student_anchor_takes_the_most_confident_scale_matched_teacher_anchor() -> None:
    """Student at 64 px (grids 8, 4, 2); the 2x teacher has grids 16, 8, 4; boxes worked out by hand."""
    student_grids, big_grids = [8, 4, 2], [16, 8, 4]
    big, small = plain_head(big_grids), plain_head(student_grids)
    # 2x level 1 (stride 16 at 2x = 8 student px, the student's level 0 grid): distances carry over unchanged
    put(big, big_grids, 1, 3, 5, 2.0, [1.0, 2.0, 3.0, 0.5])
    # 2x level 0 cell (1, 1): stride 8 at 2x = 4 student px, centre (6, 6) px, sides 2 units = 8 px: box -2..14 px;
    # pooled into student cell (0, 0) of level 0, centre (4, 4): ltrb (4 - -2, 4 - -2, 14 - 4, 14 - 4) / 8
    put(big, big_grids, 0, 1, 1, 3.0, [2.0, 2.0, 2.0, 2.0])
    put(big, big_grids, 1, 0, 0, 1.0, [9.0, 9.0, 9.0, 9.0])  # less confident than the pooled one: loses
    # the last level: the 1x teacher's own anchor beats a weaker 2x one on the same student cell
    put(small, student_grids, 2, 1, 0, 4.0, [0.25, 0.5, 0.75, 1.0])
    put(big, big_grids, 2, 2, 1, 0.5, [5.0, 5.0, 5.0, 5.0])
    out = scaled_head(big, small, reg_max=1, imgsz=64)
    assert out["scores"].shape == out["boxes"].shape[:1] + (NC, 84) and out["feats"] is small["feats"]
    logits, box = at(out, student_grids, 0, 3, 5)
    assert logits[1].item() == 2.0 and box.tolist() == pytest.approx([1.0, 2.0, 3.0, 0.5])
    logits, box = at(out, student_grids, 0, 0, 0)
    assert logits[1].item() == 3.0 and box.tolist() == pytest.approx([0.75, 0.75, 1.25, 1.25])
    logits, box = at(out, student_grids, 2, 1, 0)
    assert logits[1].item() == 4.0 and box.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    logits, _ = at(out, student_grids, 1, 0, 0)  # 2x level 1 also pools into the student's level 1
    assert logits[1].item() == 1.0
    logits, _ = at(out, student_grids, 1, 3, 3)  # nothing there: background stays background
    assert logits.tolist() == [-9.0, -9.0]


@pytest.mark.parametrize("yaml", ["yolov8n.yaml", "yolo26n.yaml"])  # DFL bins; plain distances on two branches
def test_the_teacher_at_scale_2_runs_twice_and_answers_on_the_students_anchors(yaml: str) -> None:
    torch.manual_seed(0)
    model = DetectionModel(yaml, nc=NC, verbose=False)
    images = torch.rand(2, 3, 64, 64)
    plain = Teacher(model, [], torch.device("cpu"), torch.float32)(images).head
    calls = []
    scaled = Teacher(model, [], torch.device("cpu"), torch.float32, scale=2)
    scaled.runner.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-1]))
    head = scaled(images).head
    assert calls == [64, 128] and head.keys() == plain.keys()
    for branch in head:
        assert head[branch]["scores"].shape == plain[branch]["scores"].shape
        assert head[branch]["boxes"].shape == plain[branch]["boxes"].shape
        assert torch.isfinite(head[branch]["boxes"]).all()
        assert not torch.equal(head[branch]["scores"], plain[branch]["scores"])


def saved_teacher(path: Path, yaml_file: str, imgsz: int) -> Path:
    """A checkpoint of an untrained teacher with the synthetic classes, trained (its train_args say) at ``imgsz``."""
    torch.manual_seed(0)
    model = DetectionModel(yaml_file, nc=3, verbose=False)
    model.names = dict(enumerate(SYNTHETIC_CLASSES))
    save_student(path, model, {"task": "detect", "imgsz": imgsz}, {"teacher": "", "recipe": "test"})
    return path


def test_the_default_picks_2_for_a_teacher_trained_at_twice_the_size_and_what_cannot_take_2_refuses_it(
    run_kwargs: dict, tmp_path: Path
) -> None:
    teacher = saved_teacher(tmp_path / "teacher128.pt", "yolov8s.yaml", 128)
    result = train(recipe="default", report=False, **{**run_kwargs, "teacher": str(teacher)})  # at 64 px
    assert result.best.is_file()
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["recipe"]["teacher_scale"] == "2"
    with pytest.raises(DistillError, match="teacher_scale 2: term.s. cwd read more of the teacher"):
        train(recipe="cwd", report=False, teacher_scale=2, **{**run_kwargs, "name": "cwd"})
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
        (320, 512, "default", "yolov8s.yaml", "2"),  # 640 = 1.25 x 512: the largest view allowed
        (352, 512, "default", "yolov8s.yaml", "1"),  # 704 > 640: objects too large for it
        (256, None, "default", "yolov8s.yaml", "1"),  # a teacher whose training size is unknown
        (256, [512, 512], "cwd", "yolov8s.yaml", "1"),  # a feature term: its maps would not line up
        (256, 512, "logits", "yolov8s.yaml", "1"),  # dfl_kd: the mapped boxes are two-hot, not the teacher's bins
        (256, 512, "default", "yolo26s.yaml", "1"),  # end to end: the one-to-one branch would get two anchors
    ],
)
def test_auto_picks_twice_the_size_where_that_view_suits_the_teacher_and_the_recipe(
    imgsz: int, trained: object, recipe: str, yaml: str, expected: str
) -> None:
    teacher = DetectionModel(yaml, nc=NC, verbose=False)
    teacher.args = {"imgsz": trained} if trained else {}
    auto = replace(load_recipe(recipe), teacher_scale="auto")
    assert resolved(auto, imgsz, teacher).teacher_scale == expected
    assert resolved(replace(auto, teacher_scale="2"), 384, teacher).teacher_scale == "2"  # as given: kept


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
