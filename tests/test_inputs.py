"""Inputs that used to give wrong numbers, wrong exit codes or rough output: class lists, data paths, skipped images,
untrained teachers, non-detection models, output places, file modes, narrow terminals, help text."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import warnings
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill_cli.cli import app
from distill_cli.config import RunConfig, load_recipe
from distill_cli.errors import EXIT_USAGE, DistillError
from distill_cli.evaluation import evaluate
from distill_cli.training import train

from .conftest import BCCD_STUDENT, needs_shared, saved_teacher, train_args

runner = CliRunner()
TINY_EVAL = {"imgsz": 64, "batch": 4, "device": "cpu"}


def one_error_line(result, code: int = EXIT_USAGE) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.stderr
    return lines[0]


def data_yaml(tmp_path: Path, synthetic_data: Path, names: list[str], name: str = "other.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"path: {synthetic_data.parent}\ntrain: images/train\nval: images/val\nnames: {names}\n")
    return path


@pytest.mark.parametrize("names", [["circle", "square"], ["circle", "square", "triangle", "star"], ["a", "b", "c"]])
def test_eval_refuses_a_data_yaml_with_other_classes(
    names: list[str], tmp_path: Path, synthetic_data: Path, tiny_teacher: Path
) -> None:
    other = data_yaml(tmp_path, synthetic_data, names)
    args = ["eval", "--weights", str(tiny_teacher), "--data", str(other), "--imgsz", "64", "--device", "cpu"]
    line = one_error_line(runner.invoke(app, args))
    assert "class lists differ" in line and "--allow-class-mismatch" in line
    with pytest.warns(UserWarning, match="CLASS LISTS DIFFER"):
        result = runner.invoke(app, [*args, "--allow-class-mismatch", "--json"])
    assert result.exit_code == 0, result.output


def test_compare_refuses_a_data_yaml_with_other_classes(
    tmp_path: Path, synthetic_data: Path, tiny_teacher: Path
) -> None:
    other = data_yaml(tmp_path, synthetic_data, ["circle", "square"])
    args = ["compare", "--weights", str(tiny_teacher), "--data", str(other), "--out", str(tmp_path / "cmp" / "exp")]
    assert "class lists differ" in one_error_line(runner.invoke(app, args))
    assert not (tmp_path / "cmp").exists()


def test_allowed_mismatch_names_what_is_dropped(tmp_path: Path, synthetic_data: Path, tiny_teacher: Path) -> None:
    other = data_yaml(tmp_path, synthetic_data, ["circle", "square"])
    with pytest.warns(UserWarning) as caught:
        evaluate([str(tiny_teacher)], str(other), allow_class_mismatch=True, **TINY_EVAL)
    text = " ".join(str(w.message) for w in caught)
    assert "classes 2+ (triangle) are not in the yaml: their detections match no label" in text
    assert "val images skipped" in text  # the labels of class 2 are outside the yaml's names: their images dropped


def test_an_allowed_mismatch_names_no_label_ids_the_data_cannot_hold(tmp_path: Path, synthetic_data: Path) -> None:
    """A model of more classes than data whose labels keep to its yaml: the note said images labelled with ids the
    yaml lacks 'are skipped', ids no label of that data can hold."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.models import save_student

    wide = DetectionModel("yolov8n.yaml", nc=4, verbose=False)
    wide.names = {0: "circle", 1: "square", 2: "triangle", 3: "hexagon"}
    save_student(tmp_path / "wide.pt", wide, {"task": "detect"}, {"teacher": "", "recipe": "test"})
    with pytest.warns(UserWarning) as caught:
        evaluate([str(tmp_path / "wide.pt")], str(synthetic_data), allow_class_mismatch=True, **TINY_EVAL)
    text = " ".join(str(w.message) for w in caught)
    assert "classes 3+ (hexagon) are not in the yaml" in text
    assert "skipped" not in text and "ids 3+" not in text


def test_a_refused_teacher_is_one_error_line_without_the_students_warning(
    run_kwargs: dict, synthetic_data: Path, tmp_path: Path
) -> None:
    """Data with the classes in another order: the student's class layers start afresh (a warning), and the
    teacher's class list no longer matches for the output terms (an error). Both lines were printed."""
    swapped = data_yaml(tmp_path, synthetic_data, ["square", "circle", "triangle"])
    student = saved_teacher(tmp_path / "student.pt", "yolov8n.yaml", imgsz=64)
    args = train_args({**run_kwargs, "data": str(swapped)}, student=student, recipe="default")
    assert "teacher classes ['circle', 'square', 'triangle'] differ" in one_error_line(runner.invoke(app, args))
    assert not (Path(run_kwargs["project"])).exists()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DistillError, match="teacher classes"):
        warnings.simplefilter("always")  # pytest records warnings: the CLI's stderr above cannot show them
        train(recipe="default", **{**run_kwargs, "data": str(swapped), "student": str(student)})
    assert [str(w.message) for w in caught] == []


@needs_shared
def test_real_bccd_with_a_two_class_yaml_is_refused(tmp_path: Path) -> None:
    from .conftest import BCCD_YAML

    two = tmp_path / "two.yaml"
    two.write_text(f"path: {BCCD_YAML.parent}\ntrain: images/train\nval: images/val\nnames: [RBC, WBC]\n")
    with pytest.raises(DistillError, match="3 classes, data yaml .* 2 and the class lists differ"):
        evaluate([str(BCCD_STUDENT)], str(two), imgsz=256, device="cpu")


def test_a_relative_data_path_resolves_as_ultralytics_resolves_it(
    tmp_path: Path, synthetic_data: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``path: data`` beside the yaml: ultralytics reads it from the current folder (then its datasets folder), and
    so do we; from elsewhere it is one clear error, not a crash inside the validator."""
    shutil.copytree(synthetic_data.parent, tmp_path / "data")
    yaml_path = tmp_path / "d.yaml"
    yaml_path.write_text("path: data\ntrain: images/train\nval: images/val\nnames: [circle, square, triangle]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = ["eval", "--weights", str(tiny_teacher), "--data", str(yaml_path), "--imgsz", "64", "--device", "cpu"]
    assert "relative path 'data' is resolved from the current folder" in one_error_line(runner.invoke(app, args))
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, [*args, "--json"]).exit_code == 0


def test_every_skip_reason_is_counted_and_named(run_kwargs: dict, tmp_path: Path) -> None:
    import cv2
    import numpy as np

    root = tmp_path / "data"
    shutil.copytree(Path(run_kwargs["data"]).parent, root)
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    for cache in root.glob("labels/*.cache"):
        cache.unlink()
    (root / "labels" / "train" / "0000.txt").write_text("0 0.5 0.5\n")  # 3 values, not 5
    cv2.imwrite(str(root / "images" / "train" / "0001.png"), np.zeros((8, 8, 3), np.uint8))  # under 10 pixels
    with pytest.warns(UserWarning, match="2 of 8 train images skipped.*under 10 pixels.*not 'class x y w h'"):
        from distill_cli.data import build_loader, hyperparameters, load_data

        build_loader(load_data(root / "data.yaml"), "train", hyperparameters(imgsz=64), 4, 0, 32, train=True)


def test_a_yaml_teacher_is_refused_unless_allowed(run_kwargs: dict) -> None:
    from distill_cli.start import load_models

    result = runner.invoke(app, train_args({**run_kwargs, "teacher": "yolov8s.yaml"}))
    line = one_error_line(result)
    assert "teacher 'yolov8s.yaml' is a model yaml, so it would be untrained" in line
    assert "allow_untrained_teacher" in line and not Path(run_kwargs["project"]).exists()
    cfg = RunConfig(teacher="yolov8s.yaml", student="yolov8n.yaml", recipe=load_recipe("cwd"))
    with pytest.warns(UserWarning, match="untrained"):
        untrained = RunConfig(**{**vars(cfg), "allow_untrained_teacher": True})
        teacher, _, _ = load_models(untrained, {"names": {0: "a"}}, resuming=False)
    assert teacher is not None


@pytest.mark.parametrize("yaml", ["yolov8n-cls.yaml", "yolov8n-seg.yaml", "yolov8n-pose.yaml"])
def test_a_non_detection_student_yaml_is_refused_before_training(yaml: str, run_kwargs: dict) -> None:
    line = one_error_line(runner.invoke(app, train_args(run_kwargs, student=yaml)))
    assert f"student yaml '{yaml}' builds a" in line and "detection models" in line
    assert not Path(run_kwargs["project"]).exists()


def test_export_output_under_a_file_is_bad_input(tmp_path: Path, tiny_teacher: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    args = ["export", "--weights", str(tiny_teacher), "--output", str(blocker / "model.onnx")]
    assert "is a file" in one_error_line(runner.invoke(app, args))


def test_export_with_a_missing_image_is_one_line_before_any_work(tmp_path: Path, tiny_teacher: Path) -> None:
    """In a process of its own: OpenCV's own warning about the file went to the process's stderr before the error."""
    args = ["export", "--weights", str(tiny_teacher), "--output", str(tmp_path / "m.onnx"), "--image", "missing.png"]
    done = subprocess.run([sys.executable, "-m", "distill_cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == EXIT_USAGE and done.stderr.strip().splitlines() == [
        "error: 'image' must be an image file that exists, got 'missing.png'"
    ], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_eval_on_a_missing_gpu_is_one_line(synthetic_data: Path, tiny_teacher: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["eval", "--weights", str(tiny_teacher), "--data", str(synthetic_data), "--device", "cuda"]
    assert "no such CUDA device" in one_error_line(runner.invoke(app, args))


def test_written_files_get_the_usual_mode(tmp_path: Path, tiny_teacher: Path) -> None:
    from distill_cli.models import atomic_write_text, load_model, save_student

    old = os.umask(0o022)
    try:
        save_student(tmp_path / "w.pt", load_model(tiny_teacher), {}, {})
        atomic_write_text(tmp_path / "c.yaml", "a: 1\n")
    finally:
        os.umask(old)
    for name in ("w.pt", "c.yaml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_the_eval_table_keeps_paths_apart_in_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from distill_cli import console

    narrow = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    monkeypatch.setattr(console, "console", narrow)
    row = {"params": 3011238, "gflops": 8.19, "mAP50-95": 0.5471, "mAP50": 0.8812, "ms_per_img": 12.3}
    folder = "/work/shared/models/bccd/runs/distill/exp12/weights"
    console.print_eval([{"model": f"{folder}/best.pt", **row}, {"model": f"{folder}/last.pt", **row}])
    text = narrow.export_text()
    assert "…" not in text and "0.5471" in text and "3,011,238" in text
    cells = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") > 2)
    assert f"{folder}/best.pt" in cells and f"{folder}/last.pt" in cells


def test_train_help_shows_defaults_and_what_the_teacher_may_be() -> None:
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option, default in (("--epochs", "100"), ("--batch", "16"), ("--imgsz", "640")):
        line = next(line for line in result.output.splitlines() if option in line)
        assert f"[default: ({default})]" in line, line
    assert "Trained teacher .pt" not in result.output and "allow_untrained_teacher" in result.output


def test_a_coco_student_for_other_classes_keeps_its_trained_class_branch_as_ultralytics_does() -> None:
    """A tester took the 80-wide hidden class layers of a COCO student fine-tuned on 3 classes for a stale head; it is
    ultralytics' own fine-tune (8.4's DetectionModel.load rebuilds the branch at the source's width, so that its
    trained layers carry over): only the last class conv starts afresh. The shapes compare ultralytics with itself
    (with_classes calls the same load); the width and the carried weight are the canary for another ultralytics."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.start import with_classes

    torch.manual_seed(0)
    coco = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    coco.names = {i: f"class{i}" for i in range(80)}
    with pytest.warns(UserWarning, match="last class layers start afresh .the hidden class layers carry over"):
        student = with_classes(coco, {0: "a", 1: "b", 2: "c"})
    reference = DetectionModel(deepcopy(coco.yaml), nc=3, verbose=False)  # ultralytics' trainer: yaml, then load
    reference.load(coco, verbose=False)
    ours, theirs, given = student.state_dict(), reference.state_dict(), coco.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    branch = student.model[-1].cv3[0]
    assert branch[0].conv.out_channels == 80 and branch[-1].out_channels == 3
    assert torch.equal(ours["model.22.cv3.0.1.conv.weight"], given["model.22.cv3.0.1.conv.weight"])


def test_names_written_out_of_id_order_keep_their_ids(tmp_path: Path, synthetic_data: Path, tiny_teacher: Path) -> None:
    """'names: {2: triangle, 0: circle, 1: square}' is ultralytics' {0: circle, 1: square, 2: triangle}: the run
    numbered the names in the order written, so it refused the teacher (classes differ) and a student trained on it
    saved label 0's boxes under 'triangle'."""
    from distill_cli.data import SYNTHETIC_CLASSES, load_data

    shuffled = tmp_path / "shuffled.yaml"
    text = f"path: {synthetic_data.parent}\ntrain: images/train\nval: images/val\n"
    shuffled.write_text(text + "names: {2: triangle, 0: circle, 1: square}\n")
    in_order = dict(enumerate(SYNTHETIC_CLASSES))
    assert list(load_data(shuffled)["names"].items()) == list(in_order.items())
    kwargs = {**TINY_EVAL, "workers": 0, "epochs": 1, "report": False, "project": str(tmp_path / "runs")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(teacher=str(tiny_teacher), student=str(tiny_teacher), data=str(shuffled), **kwargs)
    assert not [w for w in caught if "start afresh" in str(w.message)]  # the student's class layers are its own
    assert torch.load(result.best, weights_only=False)["model"].names == in_order


@pytest.mark.parametrize(
    ("text", "value"),
    [("2024_06_01", "2024_06_01"), ("010", "010"), ("1:30", "1:30"), ("2024-06-01", "2024-06-01"), ("1.5e3", "1.5e3")],
)
def test_set_keeps_text_that_yaml_1_1_would_read_as_another_number(text: str, value: str) -> None:
    """YAML 1.1 drops underscores, reads a leading 0 as octal, a colon as base 60 and a date as a date: --set
    name=2024_06_01 named the run 20240601. Numbers as YAML 1.2 writes them are numbers, also inside lists."""
    from distill_cli.overrides import apply_overrides, parse_overrides

    assert parse_overrides([f"name={text}"]) == {"name": value}
    assert parse_overrides([f"layers=[{text}, 16]"]) == {"layers": [value, 16]}
    numbers = parse_overrides(
        ["a=10", "b=-0.5", "c=1.5e-3", "d=0", "e=.inf", "f=true", "g=0x1f", "h=1.0e+3", "i=5 # x"]
    )
    assert numbers == {
        "a": 10,
        "b": -0.5,
        "c": 1.5e-3,
        "d": 0,
        "e": float("inf"),
        "f": True,
        "g": 31,
        "h": 1e3,
        "i": 5,
    }
    with pytest.raises(DistillError, match="must be a number, got '010'"):  # not octal 8
        apply_overrides(RunConfig(), parse_overrides(["epochs=010"]))
    with pytest.raises(DistillError, match=r"must be a number, got '1_000' \(write 1000, without underscores\)$"):
        apply_overrides(RunConfig(), parse_overrides(["epochs=1_000"]))


def test_several_pairs_after_one_set_are_told_to_take_one_set_each(run_kwargs: dict) -> None:
    line = one_error_line(runner.invoke(app, [*train_args(run_kwargs), "--set", "nbs=64", "ema_decay=0.9999"]))
    assert "unexpected extra argument" in line and "each key=value takes its own --set (--set a=1 --set b=2)" in line
    assert not Path(run_kwargs["project"]).exists()
    line = one_error_line(runner.invoke(app, ["export", "--weights", "a.pt", "imgsz=320"]))
    assert "unexpected extra argument" in line and "--set" not in line  # export has no --set
