"""keep_start: in a fine-tune the output terms also distil the student as given (Learning without Forgetting)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from ultralytics.nn.tasks import DetectionModel

from distill_cli import keep_start
from distill_cli.config import Recipe, load_recipe, recipe_from_dict
from distill_cli.data import hyperparameters
from distill_cli.distiller import Distiller, Teacher, TeacherOutput, build_terms
from distill_cli.errors import DistillError
from distill_cli.keep_start import checked_keep, resolved_keep, with_start
from distill_cli.losses import DistillContext, build_loss
from distill_cli.losses.output import distances
from distill_cli.teacher_scale import two_hot
from distill_cli.training import train

from .conftest import saved_teacher
from .test_resume import EXACT, interrupt_after_epoch, weights


def head(probs: list[list[float]], sides: list[float]) -> dict:
    """One branch on len(sides) anchors, 16 DFL bins: class probabilities (nc x A) and equal sides per anchor."""
    dist = torch.tensor(sides).view(1, 1, -1).expand(1, 4, len(sides)).clone()
    return {
        "scores": torch.logit(torch.tensor([probs])),
        "boxes": two_hot(dist, 16),
        "feats": [torch.zeros(1, 5, 1, 2)],
    }


def test_the_answers_are_mixed_one_to_keep_start_probabilities_and_boxes_by_share_times_confidence() -> None:
    """keep_start 3: shares 1/4 and 3/4. Anchor 0: teacher p (0.2, 0.1) sides 2, start p (0.6, 0.3) sides 6 ->
    p (0.05 + 0.45, 0.025 + 0.225) = (0.5, 0.25); sides (0.25 * 0.2 * 2 + 0.75 * 0.6 * 6) / (0.05 + 0.45) = 5.6.
    Anchor 1: teacher p (0.8, 0.4) sides 4, start p (0.4, 0.2) sides 8 -> p (0.5, 0.25); sides (0.2 * 4 + 0.3 * 8) /
    0.5 = 6.4. A branch the start lacks keeps the teacher's answers."""
    teacher = {
        "one2many": head([[0.2, 0.8], [0.1, 0.4]], [2.0, 4.0]),
        "one2one": head([[0.2, 0.8], [0.1, 0.4]], [2.0, 4.0]),
    }
    start = {"one2many": head([[0.6, 0.4], [0.3, 0.2]], [6.0, 8.0])}
    mixed = with_start(teacher, start, keep=3.0, reg_max=16)
    probs = mixed["one2many"]["scores"].sigmoid()[0]
    assert probs.flatten().tolist() == pytest.approx([0.5, 0.5, 0.25, 0.25], abs=1e-5)
    sides = distances(mixed["one2many"]["boxes"], 16)[0]
    assert sides[:, 0].tolist() == pytest.approx([5.6, 6.4], abs=5e-4)
    assert mixed["one2one"] is teacher["one2one"]


def test_the_class_term_on_the_mixed_answers_has_the_gradient_of_a_teacher_term_plus_keep_start_start_terms() -> None:
    """(1 + r) D(s; m) and D(s; t) + r D(s; s0) differ by a constant: their gradients agree (BCE is linear in its
    target). A class term on the teacher alone has another gradient."""
    torch.manual_seed(0)
    anchors, keep = 6, 0.5
    t, s0 = torch.randn(1, 3, anchors), torch.randn(1, 3, anchors)
    boxes = torch.zeros(1, 64, anchors)
    ctx = DistillContext(
        teacher_conf=torch.rand(1, anchors),
        fg_mask=torch.tensor([[True, False, True, False, False, True]]),
        anchors=torch.zeros(anchors, 2),
        level_sizes=[(2, 3)],
    )
    term = build_loss("cls_kd", {})

    def gradient(loss_of) -> torch.Tensor:
        s = torch.randn(1, 3, anchors, generator=torch.Generator().manual_seed(1)).requires_grad_()
        loss_of({"scores": s, "boxes": boxes}).backward()
        return s.grad

    mixed = with_start(
        {"b": {"scores": t, "boxes": boxes, "feats": []}}, {"b": {"scores": s0, "boxes": boxes}}, keep, 16
    )
    both = gradient(lambda s: term(s, {"scores": t}, ctx) + keep * term(s, {"scores": s0}, ctx))
    as_one = gradient(lambda s: (1 + keep) * term(s, mixed["b"], ctx))
    assert torch.allclose(as_one, both, atol=1e-5)
    assert not torch.allclose(gradient(lambda s: term(s, {"scores": t}, ctx)), both, atol=1e-3)


def test_the_distillers_output_terms_read_the_mixed_answers_and_count_1_plus_keep_start_times() -> None:
    """The output terms with keep_start 0.5 and the start's answers equal 1.5 times the terms on the answers mixed at
    1 : 0.5 (the confidence that picks box_kd's anchors read from them too), and differ from the teacher's alone."""
    torch.manual_seed(0)
    teacher_model = DetectionModel("yolov8s.yaml", nc=2, verbose=False)
    student = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    student.args = hyperparameters()
    student.criterion = student.init_criterion()
    recipe = recipe_from_dict({"losses": {"cls_kd": {}, "box_kd": {"conf_thresh": 0.1}}})
    terms, pairs = build_terms(student, teacher_model, recipe, 64)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = {
        "img": images,
        "cls": torch.tensor([[0.0], [1.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.6, 0.5, 0.4, 0.4]]),
        "batch_idx": torch.tensor([0.0, 1.0]),
    }
    class_biases = [branch[-1].bias for branch in student.model[-1].cv3]
    with torch.no_grad():
        for bias in class_biases:  # the student as given sure of some class everywhere, unlike the teacher
            bias.fill_(2.0)
        teacher = Teacher(teacher_model, [], torch.device("cpu"), torch.float32, start=student)
        for bias in class_biases:  # and moved on since
            bias.fill_(-4.0)
    out = teacher(images)
    mixed = TeacherOutput(out.feats, with_start(out.head, out.start, 0.5, 16))
    active = ("cls_kd", "box_kd")
    kept = Distiller(student, terms, pairs, keep_start=0.5).train()(batch, out, active)[1]
    on_mixed = Distiller(student, terms, pairs).train()(batch, mixed, active)[1]
    alone = Distiller(student, terms, pairs, keep_start=0.5).train()(batch, replace(out, start=None), active)[1]
    for name in active:
        assert torch.allclose(kept[name], 1.5 * on_mixed[name], rtol=1e-5), name
        assert not torch.allclose(kept[name], 1.5 * alone[name], rtol=1e-2), name


def test_the_start_answers_beside_the_teacher_as_a_frozen_copy_of_the_student_as_given() -> None:
    torch.manual_seed(0)
    teacher_model = DetectionModel("yolov8s.yaml", nc=2, verbose=False)
    student = DetectionModel("yolov8n.yaml", nc=2, verbose=False).eval()
    images = torch.rand(2, 3, 64, 64)
    expected = student(images)[1]["scores"]
    teacher = Teacher(teacher_model, [], torch.device("cpu"), torch.float32, start=student)
    with torch.no_grad():
        for param in student.parameters():  # training moves the student; the kept start stays as it was given
            param.add_(1.0)
    out = teacher(images)
    assert torch.allclose(out.start["one2many"]["scores"], expected, atol=1e-4)
    assert out.start.keys() == {"one2many"} and not any(p.requires_grad for p in teacher.start.parameters())
    assert Teacher(teacher_model, [], torch.device("cpu"), torch.float32)(images).start is None


@pytest.mark.parametrize(
    ("keep", "has_start", "recipe", "trained", "imgsz", "expected"),
    [
        ("1", True, "default", 512, 256, "1"),  # a number is kept as given wherever there is a start
        ("0.0", False, "default", 512, 256, "0"),  # 0 however written: nothing to warn about
        ("0.50", True, "default", 512, 256, "0.50"),  # as written
        ("1", False, "default", 512, 512, "0"),  # a yaml student, or one whose class layers start afresh
        ("1", True, "cwd", 512, 512, "0"),  # no output term to read the start's answers
        ("auto", True, "logits", 512, 512, "0"),  # dfl_kd would read a two-hot of mixed distances
        ("auto", True, "default", 512, 512, "1"),  # the student's own size
        ("auto", True, "default", 512, 448, "1"),  # x1.14
        ("auto", True, "default", 512, 640, "0"),  # larger than it was trained at: it cost the test split there
        ("auto", True, "default", 512, 416, "1"),  # x1.23
        ("auto", True, "default", 512, 384, "0"),  # x1.33: far enough below its size that it is a weak detector
        ("auto", True, "default", 512, 256, "0"),
        ("auto", True, "default", None, 512, "0"),  # its training size unknown
        ("auto", False, "default", 512, 512, "0"),
    ],
)
def test_keep_start_is_a_number_once_resolved_and_auto_keeps_a_start_near_its_own_size(
    keep: str, has_start: bool, recipe: str, trained: int | None, imgsz: int, expected: str
) -> None:
    recipe_kept = replace(load_recipe(recipe), keep_start=keep)
    with warnings.catch_warnings(record=True) as caught:  # a number that cannot apply says so
        warnings.simplefilter("always")
        for recipe_, want in ((recipe_kept, expected), (Recipe(keep_start=keep), "0")):  # the second without terms
            assert resolved_keep(checked_keep(recipe_, has_start), has_start, trained, imgsz, 52).keep_start == want
    number = keep != "auto" and float(keep) > 0
    assert len(caught) == number + (number and expected == "0")


def test_auto_keeps_the_start_only_in_a_short_run_and_a_number_in_any() -> None:
    """Under 100 optimizer steps the teacher's lesson cost the first epoch and the run could not recover; longer runs
    recovered without the start (benchmarks/RESULTS.md, session 34)."""
    auto, one = load_recipe("default"), replace(load_recipe("default"), keep_start="1")
    assert [resolved_keep(auto, True, 512, 448, steps).keep_start for steps in (39, 99, 100, 156)] == [
        "1",
        "1",
        "0",
        "0",
    ]
    assert resolved_keep(one, True, 512, 448, 156).keep_start == "1"


def student_pt(path: Path, names: list[str] | None = None) -> Path:
    """A YOLOv8n checkpoint with the synthetic classes (or ``names``)."""
    saved = saved_teacher(path, "yolov8n.yaml", 64)
    if names:
        ckpt = torch.load(saved, weights_only=False)
        ckpt["model"] = DetectionModel("yolov8n.yaml", nc=len(names), verbose=False)
        ckpt["model"].names = dict(enumerate(names))
        torch.save(ckpt, saved)
    return saved


def recorded_keep(run_dir: Path) -> str:
    return yaml.safe_load((run_dir / "config.yaml").read_text())["recipe"]["keep_start"]


def test_a_fine_tune_keeps_its_start_and_a_student_without_one_records_keep_start_0(
    run_kwargs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    student = str(student_pt(tmp_path / "n.pt"))  # trained at 64 px, the size it is fine-tuned at
    kept = train(recipe="default", report=False, keep_start="auto", **{**run_kwargs, "student": student})
    assert recorded_keep(kept.run_dir) == "1" and kept.best.is_file()
    # auto reads the size the student was trained at (not the run's, which replaces its args) and the run's length
    larger = train(recipe="default", report=False, **{**run_kwargs, "student": student, "imgsz": 128, "name": "128"})
    assert recorded_keep(larger.run_dir) == "0"  # 64 / 128: the student as given is far from its size
    monkeypatch.setattr(keep_start, "SHORT_RUN_STEPS", 2)  # the run has 2 optimizer steps: not a short one now
    longer = train(recipe="default", report=False, **{**run_kwargs, "student": student, "name": "long"})
    assert recorded_keep(longer.run_dir) == "0"
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="keep_start 1 is not applied: the student has no start to keep"):
        from_yaml = train(recipe="default", report=False, keep_start=1, **{**run_kwargs, "name": "yaml"})
    assert recorded_keep(from_yaml.run_dir) == "0"
    with pytest.raises(DistillError, match="keep_start 1: term.s. dfl_kd read the teacher's DFL distributions"):
        train(recipe="logits", report=False, keep_start=1, **{**run_kwargs, "student": student, "name": "dfl"})
    assert not (Path(run_kwargs["project"]) / "dfl").exists()
    other = student_pt(tmp_path / "other.pt", ["cat", "dog"])
    with pytest.warns(UserWarning, match="class layers start afresh"):
        renamed = train(
            recipe="default", report=False, keep_start=1, **{**run_kwargs, "student": str(other), "name": "o"}
        )
    assert recorded_keep(renamed.run_dir) == "0"
    with pytest.raises(DistillError, match="keep_start"):
        train(recipe="default", report=False, keep_start=-1, **{**run_kwargs, "name": "negative"})


def test_a_resumed_fine_tune_keeps_the_student_it_was_given_not_the_weights_it_resumes(
    run_kwargs: dict, tmp_path: Path
) -> None:
    kwargs = {**run_kwargs, **EXACT, "student": str(student_pt(tmp_path / "n.pt")), "keep_start": 1}
    straight = train(recipe="default", **{**kwargs, "name": "straight"})
    with pytest.raises(DistillError):
        train(recipe="default", callback=interrupt_after_epoch(1), **{**kwargs, "name": "cut"})
    resumed = train(resume=Path(kwargs["project"]) / "cut")
    assert recorded_keep(resumed.run_dir) == "1"  # the start was kept, before and after the cut
    a, b = weights(straight.last), weights(resumed.last)
    assert all(torch.equal(a[k], b[k]) for k in a)
