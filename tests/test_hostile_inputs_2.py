"""Inputs a second hostile review (session 41) found failing the bad-input contract (one 'error:' line, exit 2,
nothing written): recipe term names torch's module dict cannot hold, a field given twice, a parse error under
--verbose, export outputs that are folders or take no file, a resume whose teacher file was replaced, and messages
that misnamed the problem."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill_cli.cli import app
from distill_cli.config import recipe_from_dict
from distill_cli.data import load_data
from distill_cli.errors import DistillError
from distill_cli.training import train

from .conftest import train_args, tree
from .test_inputs import one_error_line
from .test_resume import interrupted_run

runner = CliRunner()


@pytest.mark.parametrize("name", ["a.b", "training", "forward", "keys", ""])
def test_a_term_name_a_module_dict_cannot_hold_is_bad_input(name: str, run_kwargs: dict, tmp_path: Path) -> None:
    """A KeyError of torch's ModuleDict, exit 1, after both datasets were scanned and both models built."""
    with pytest.raises(DistillError, match=f"term name '{name}' cannot be used"):
        recipe_from_dict({"losses": {name: {"type": "cls_kd"}}})
    recipe = tmp_path / "named.yaml"
    recipe.write_text(f"losses:\n  '{name}': {{type: cls_kd, weight: 1}}\n")
    line = one_error_line(runner.invoke(app, train_args(run_kwargs, recipe=str(recipe))))
    assert f"term name '{name}' cannot be used" in line and not Path(run_kwargs["project"]).exists()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--epochs", "1", "--set", "epochs=2"], "--epochs and --set epochs=... both give epochs"),
        (["--set", "epochs=2", "--set", "epochs=1"], "--set epochs is given twice (as epochs)"),
        (["--set", "layers=[15]", "--set", "recipe.layers=[18]"], "--set recipe.layers is given twice (as layers)"),
        (["--layers", "neck", "--set", "recipe.layers=[15]"], "--layers and --set layers=... both give layers"),
    ],
)
def test_a_field_given_twice_is_bad_input(extra: list[str], said: str, run_kwargs: dict) -> None:
    """The last value won without a word (--set teacher=... even swapped the teacher given with --teacher)."""
    args = [arg for arg in train_args(run_kwargs) if arg not in ("--epochs", "1")]  # the base gives --epochs 1
    line = one_error_line(runner.invoke(app, [*args, *extra]))
    assert said in line and not Path(run_kwargs["project"]).exists()


def test_a_parse_error_under_verbose_is_the_traceback_and_the_same_line() -> None:
    """It was click's boxed usage text, no 'error:' line; the tool's own options gave the box without --verbose."""
    command = ["train", "--imgsz", "abc", "--teacher", "a", "--student", "b", "--data", "c"]
    plain = one_error_line(runner.invoke(app, command))
    verbose = runner.invoke(app, [*command, "-v"])
    assert verbose.exit_code == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == plain
    assert "No such option: --bogus" in one_error_line(runner.invoke(app, ["--bogus"]))
    assert "Traceback" in runner.invoke(app, ["--verbose", "--bogus"]).stderr
    assert "d.yaml' not found" in one_error_line(runner.invoke(app, ["eval", "--weights", "w.pt", "--data", "d.yaml"]))
    assert "Traceback" in runner.invoke(app, ["eval", "--weights", "w.pt", "--data", "d.yaml", "-vv"]).stderr


def test_export_to_a_folder_or_one_that_takes_no_file_is_refused_before_the_export(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'--output .' advised removing the folder; a folder that takes no file (/proc) failed after the export, exit 3."""
    from distill_cli import exporter

    monkeypatch.setattr(exporter.YOLO, "export", lambda *a, **k: pytest.fail("exported"))
    args = ["export", "--weights", str(tiny_teacher), "--imgsz", "64"]
    line = one_error_line(runner.invoke(app, [*args, "--output", str(tmp_path)]))
    assert line == f"error: --output '{tmp_path}' is a folder; name a new path in it (DIR/NAME)"

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr(exporter.tempfile, "TemporaryFile", refused)
    before = tree(tmp_path)
    line = one_error_line(runner.invoke(app, [*args, "--output", str(tmp_path / "new" / "m.onnx")]))
    assert f"cannot write the export under '{tmp_path}' (No such file or directory)" in line
    assert tree(tmp_path) == before


def test_a_resume_whose_teacher_file_was_replaced_is_refused(run_kwargs: dict, tmp_path: Path) -> None:
    """Nothing of the teacher was kept in last.pt: the resumed run went on distilling from the other model."""
    teacher = tmp_path / "teacher.pt"
    shutil.copy(run_kwargs["teacher"], teacher)
    run = interrupted_run({**run_kwargs, "teacher": str(teacher)}, "cut")
    checkpoint = torch.load(teacher, weights_only=False)
    with torch.no_grad():
        next(checkpoint["model"].parameters()).add_(0.01)
    torch.save(checkpoint, teacher)
    with pytest.raises(
        DistillError,
        match=r"the teacher is not the model the run began with \(was its file replaced\?\); put that file back",
    ):
        train(resume=str(run))


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("nc: '3'", "'nc' must be a whole number of classes, got '3'"),
        ("val: 5", "'val' must name images (a path or a list of paths), got 5"),
        ("nc: .inf", "'nc' must be a whole number of classes, got inf"),
    ],
)
def test_a_data_yaml_value_of_the_wrong_kind_is_named(line: str, said: str, synthetic_data: Path, tmp_path: Path):
    """nc: '3' with 3 names said 'nc=3 but 3 names'; val: 5 said 'no val split; it has: train, val'."""
    key = line.split(":")[0]
    lines = [f"path: {synthetic_data.parent}", "train: images/train", "val: images/val", "names: [a, b, c]"]
    path = tmp_path / "data.yaml"
    path.write_text("\n".join([entry for entry in lines if not entry.startswith(f"{key}:")] + [line]) + "\n")
    with pytest.raises(DistillError, match=said.replace("(", r"\(").replace(")", r"\)")):
        load_data(str(path), "val")


def test_a_boolean_for_a_text_setting_names_what_it_takes() -> None:
    with pytest.raises(DistillError, match=r"'keep_start' must be auto or a number in \[0, 100\], got True"):
        recipe_from_dict({"losses": {}, "keep_start": True})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_frozen_models_sums_are_of_the_weights_as_loaded_not_of_the_fused_copies(dtype: torch.dtype) -> None:
    """The kept start's sum was of its fused copy in the run's precision: fusing on another device rounds its last
    bits otherwise, so a resume there would be refused as if the file had been replaced."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.distiller import Teacher, weight_sum

    teacher, start = (DetectionModel(yaml, nc=3, verbose=False) for yaml in ("yolov8s.yaml", "yolov8n.yaml"))
    expected = [weight_sum(teacher), weight_sum(start)]
    frozen = Teacher(teacher, [], torch.device("cpu"), dtype, start=start)
    assert frozen.fingerprint == expected and weight_sum(frozen.start) != expected[1]


def test_out_at_a_taken_folder_checks_the_folder_its_number_goes_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The taken folder itself was checked for writing, though report2 is made beside it, in its parent."""
    from distill_cli import runlog

    taken = tmp_path / "parent" / "report"
    taken.mkdir(parents=True)
    monkeypatch.setattr(runlog.os, "access", lambda path, mode: Path(path) != taken.parent)
    with pytest.raises(DistillError, match="'.*parent' is not writable"):
        runlog.check_out_folder(taken, "the report folder", "--out DIR")
    monkeypatch.setattr(runlog.os, "access", lambda path, mode: Path(path) != taken)
    runlog.check_out_folder(taken, "the report folder", "--out DIR")  # read-only itself: report2 goes beside it
