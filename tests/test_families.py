"""Every ultralytics detect family as teacher and student: YOLOv8, YOLO11, YOLO12, YOLOv10 and YOLO26 (end-to-end,
reg_max 1), and a cross-family pair; both branches of an end-to-end head distilled; model names fetched the way
ultralytics fetches them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

from distill_cli.data import SYNTHETIC_CLASSES, hyperparameters
from distill_cli.distiller import Distiller, Teacher, build_terms
from distill_cli.errors import DistillError
from distill_cli.models import load_model
from distill_cli.training import train

from .conftest import save_model

DFL_TERMS = {"cwd": {}, "cls_kd": {}, "dfl_kd": {}, "box_kd": {"conf_thresh": 0.0}, "bckd": {}, "crosskd": {}}
PLAIN_TERMS = {k: v for k, v in DFL_TERMS.items() if k != "dfl_kd"}  # reg_max 1: no DFL bins to distil
PAIRS = [
    ("yolov8s.yaml", "yolov8n.yaml", DFL_TERMS),
    ("yolo11s.yaml", "yolo11n.yaml", DFL_TERMS),
    ("yolo12s.yaml", "yolo12n.yaml", DFL_TERMS),
    ("yolov10s.yaml", "yolov10n.yaml", DFL_TERMS),
    ("yolo26s.yaml", "yolo26n.yaml", PLAIN_TERMS),
    ("yolov8s.yaml", "yolo11n.yaml", DFL_TERMS),  # across families: layers pair by stride
    ("yolov8s.yaml", "yolo26n.yaml", PLAIN_TERMS),  # across box encodings: the teacher's boxes re-encoded
    ("yolo26s.yaml", "yolov8n.yaml", DFL_TERMS),
]


def teacher_checkpoint(folder: Path, cfg: str) -> Path:
    """An untrained teacher of family ``cfg`` with the synthetic classes whose outputs vary: its BatchNorm statistics
    measured on random images and its output layers scaled up (untrained, its maps and box outputs are nearly
    constant in eval mode, which would make every box and cross-head term vanish)."""
    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=3, verbose=False)
    model.names = dict(enumerate(SYNTHETIC_CLASSES))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # a cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 64, 64))
    for norm in norms:
        norm.momentum = 0.03
    head = model.model[-1]
    for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
        for level in getattr(head, branch, None) or []:
            torch.nn.init.normal_(level[-1].weight, std=0.3)
    return save_model(folder / f"{Path(cfg).stem}.pt", model.eval())


def recipe_file(folder: Path, terms: dict) -> str:
    path = folder / "every_term.yaml"
    path.write_text(yaml.safe_dump({"losses": {k: {"weight": 1.0, **v} for k, v in terms.items()}}))
    return str(path)


@pytest.mark.parametrize(("teacher", "student", "terms"), PAIRS, ids=[f"{t}->{s}" for t, s, _ in PAIRS])
def test_every_family_distils_with_every_term_that_applies(
    teacher: str, student: str, terms: dict, run_kwargs: dict, tmp_path: Path
) -> None:
    kwargs = {**run_kwargs, "teacher": str(teacher_checkpoint(tmp_path, teacher)), "student": student}
    result = train(recipe=recipe_file(tmp_path, terms), report=False, **kwargs)
    row = result.history[-1]
    for term in terms:
        assert row[f"{term}_raw"] > 0, f"{term} gave {row[f'{term}_raw']} on {teacher} -> {student}"
    model = YOLO(str(result.best))
    assert model.names[0] == "circle" and type(model.model.model[-1]).__name__ in ("Detect", "v10Detect")


def test_dfl_kd_on_a_head_without_dfl_bins_is_refused_naming_box_kd(run_kwargs: dict, tmp_path: Path) -> None:
    kwargs = {**run_kwargs, "teacher": str(teacher_checkpoint(tmp_path, "yolo26s.yaml")), "student": "yolo26n.yaml"}
    with pytest.raises(DistillError, match="reg_max 1.*use box_kd"):
        train(recipe="logits", **kwargs)
    assert not (Path(kwargs["project"]) / "exp").exists()


def e2e_distiller(tmp_path: Path, term: str, params: dict) -> tuple[Distiller, Teacher, dict]:
    from distill_cli.config import recipe_from_dict

    teacher_model = load_model(teacher_checkpoint(tmp_path, "yolo26s.yaml"))
    torch.manual_seed(1)
    student = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    student.names = dict(enumerate(SYNTHETIC_CLASSES))
    student.args = hyperparameters()
    student.criterion = student.init_criterion()
    recipe = recipe_from_dict({"losses": {term: params}})
    terms, pairs = build_terms(student, teacher_model, recipe, 64)
    teacher = Teacher(teacher_model, [], torch.device("cpu"), torch.float32)
    distiller = Distiller(student, terms, pairs).train()
    distiller.bind_teacher(teacher)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "img": torch.rand(2, 3, 64, 64, generator=generator),
        "cls": torch.tensor([[0.0], [1.0], [2.0], [0.0]]),
        "bboxes": torch.tensor(
            [[0.3, 0.3, 0.3, 0.3], [0.7, 0.6, 0.4, 0.3], [0.5, 0.5, 0.5, 0.5], [0.4, 0.6, 0.3, 0.4]]
        ),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0, 1.0]),
    }
    return distiller, teacher, batch


@pytest.mark.parametrize("term", ["cls_kd", "box_kd", "bckd", "crosskd"])
def test_both_branches_of_an_end_to_end_head_are_distilled(term: str, tmp_path: Path) -> None:
    """The one-to-one branch is the one used at inference; its own head layers must get distillation gradients."""
    params = {"box_kd": {"conf_thresh": 0.0}}.get(term, {})
    distiller, teacher, batch = e2e_distiller(tmp_path, term, params)
    _, terms = distiller(batch, teacher(batch["img"]), (term,))
    terms[term].backward()
    head = distiller.student.model[-1]
    for branch in ("cv2", "cv3", "one2one_cv2", "one2one_cv3") if term != "crosskd" else ("cv2",):
        grads = [p.grad for p in getattr(head, branch).parameters()]
        if term == "crosskd":  # through the teacher's head: the student's features, not its head, learn
            grads = [p.grad for p in distiller.student.model[head.f[0]].parameters()]
        touched = any(g is not None and g.abs().sum() > 0 for g in grads)
        needs = term in ("box_kd", "bckd", "crosskd") or "cv3" in branch
        if needs and not (term == "box_kd" and "cv3" in branch):
            assert touched, f"{term} gave no gradient to {branch}"


def test_weight_by_positives_uses_each_end_to_end_branchs_own_positives(tmp_path: Path) -> None:
    distiller, teacher, batch = e2e_distiller(tmp_path, "cls_kd", {"weight_by": "positives"})
    _, terms = distiller(batch, teacher(batch["img"]), ("cls_kd",))
    assert terms["cls_kd"].item() > 0  # the E2E loss hands out no positives mask; ours takes them per branch


def test_ema_off_with_a_feature_term_saves_a_loadable_student(run_kwargs: dict) -> None:
    result = train(recipe="cwd", ema=False, report=False, **run_kwargs)  # the live student carries feature hooks
    assert YOLO(str(result.best)).names[0] == "circle"


def test_a_pretrained_student_with_other_classes_starts_a_new_class_head(run_kwargs: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    coco_like = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    coco_like.names = {i: "Triangle" if i == 7 else f"class{i}" for i in range(80)}  # one class the data has too
    student = save_model(tmp_path / "pretrained80.pt", coco_like)
    start = {}

    def capture(event: str, info: dict) -> None:
        if event == "start":
            start.update({k: v.clone() for k, v in info["state"].distiller.student.state_dict().items()})

    with pytest.warns(UserWarning, match="trained for 80 classes .* and the data has 3 .* but for the 1 classes"):
        result = train(recipe="cwd", report=False, callback=capture, **{**run_kwargs, "student": str(student)})
    assert YOLO(str(result.best)).model.model[-1].nc == 3
    pretrained = {k: v.half().float() for k, v in coco_like.state_dict().items()}  # as saved
    assert torch.equal(start["model.0.conv.weight"], pretrained["model.0.conv.weight"])
    class_layer = "model.22.cv3.0.2.weight"  # new, for the data's 3 classes; "triangle" (class 2) kept by name
    assert start[class_layer].shape[0] == 3
    assert torch.equal(start[class_layer][2], pretrained[class_layer][7])


@pytest.fixture()
def online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A machine where ultralytics' download helper works (mocked: it writes a checkpoint), with an empty
    weights dir and a working directory that holds no such file."""
    from ultralytics import utils
    from ultralytics.utils import downloads

    import distill_cli.models as models

    calls = []

    def download(name: str) -> str:
        if Path(name).is_file():  # as the real helper: a file that is there is not fetched
            return name
        calls.append(name)
        torch.manual_seed(0)
        model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
        model.names = dict(enumerate(SYNTHETIC_CLASSES))
        return str(save_model(tmp_path / "downloaded" / name, model))

    monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    monkeypatch.setattr(downloads, "attempt_download_asset", download)
    monkeypatch.setattr(utils, "is_online", lambda: True)
    monkeypatch.setattr(utils, "SETTINGS", {"weights_dir": str(tmp_path / "weights")})  # a plain dict: not saved
    monkeypatch.chdir(tmp_path)
    assert models.fetch_named_model("yolov8n.yaml", "student") is None  # not a download name
    return calls


def test_an_ultralytics_model_name_is_fetched_with_its_download_helper(online: list) -> None:
    model = load_model("yolov8n.pt", "student")
    assert online == ["yolov8n.pt"] and model.names[0] == "circle"


def test_offline_a_model_name_gets_one_line_on_what_to_do(online: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    with pytest.raises(DistillError, match="'yolo26n.pt' is an ultralytics model name.*offline"):
        load_model("yolo26n.pt", "teacher")
    assert online == []  # no download was tried


def test_teacher_boxes_reach_the_student_in_its_encoding() -> None:
    """DFL bins -> plain distances: the bins' expectation; plain distances -> bins: a two-hot with that expectation
    (clamped to the bins); the same encoding: untouched."""
    from distill_cli.distiller import in_encoding
    from distill_cli.losses.output import distances

    torch.manual_seed(0)
    dfl = {"one2many": {"scores": torch.randn(2, 3, 5), "boxes": torch.randn(2, 64, 5)}}
    plain = in_encoding(dfl, 1)["one2many"]["boxes"]
    assert plain.shape == (2, 4, 5) and torch.allclose(plain, distances(dfl["one2many"]["boxes"], 16).transpose(1, 2))
    ltrb = torch.tensor([0.0, 2.25, 7.5, 20.0]).view(1, 4, 1)
    bins = in_encoding({"one2many": {"boxes": ltrb}}, 16)["one2many"]["boxes"]
    expected = torch.tensor([0.0, 2.25, 7.5, 15 - 1e-3])
    assert bins.shape == (1, 64, 1) and torch.allclose(distances(bins, 16)[0, 0], expected, atol=1e-3)
    assert in_encoding(dfl, 16)["one2many"] is dfl["one2many"]
