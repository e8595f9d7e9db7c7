"""Exit codes and stdout that scripts rely on, in the cases that used to break them: --verbose, --json while
ultralytics logs, a folder named like a recipe, unlabeled or unreadable splits, export names, --set typos, resume
of foreign checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill_cli.checkpoint import load_resume
from distill_cli.cli import app
from distill_cli.config import PACKAGED_RECIPES_DIR, RECIPES_DIR, RunConfig, load_recipe, recipe_path
from distill_cli.errors import EXIT_USAGE, DistillError
from distill_cli.models import load_model
from distill_cli.overrides import apply_overrides

from .conftest import train_args, tree
from .test_inputs import one_error_line

runner = CliRunner()


def test_verbose_shows_the_traceback_and_keeps_the_exit_code(run_kwargs: dict) -> None:
    result = runner.invoke(app, ["--verbose", *train_args(run_kwargs, teacher="nope.pt")])
    assert result.exit_code == EXIT_USAGE and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: teacher 'nope.pt' not found")


def test_a_local_folder_named_like_a_shipped_recipe_does_not_hide_it(quiet_folder: Path) -> None:
    (quiet_folder / "default").mkdir()
    (quiet_folder / "cwd").write_text("x: 1\n")
    for name in ("default", "cwd"):
        assert recipe_path(name) in (RECIPES_DIR / f"{name}.yaml", PACKAGED_RECIPES_DIR / f"{name}.yaml")
    assert recipe_path("./cwd") == Path("./cwd")  # a path is a path


def test_json_stdout_is_json_alone_while_ultralytics_logs(synthetic_data: Path, tiny_teacher: Path) -> None:
    """ultralytics writes its logs and progress bars to stdout (with YOLO_VERBOSE, and its errors always)."""
    args = ["eval", "--weights", str(tiny_teacher), "--data", str(synthetic_data), "--imgsz", "64", "--json"]
    env = {**os.environ, "YOLO_VERBOSE": "True", "YOLO_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "distill_cli", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["model"] == str(tiny_teacher)
    assert "Class" in done.stderr  # the validator's table went to stderr


def test_a_split_without_labels_or_readable_images_is_bad_input(run_kwargs: dict, tmp_path: Path) -> None:
    data = Path(run_kwargs["data"])
    bare = tmp_path / "bare"
    shutil.copytree(data.parent / "images", bare / "images")
    yaml = tmp_path / "bare.yaml"
    yaml.write_text(f"path: {bare}\ntrain: images/train\nval: images/val\nnames: ['circle', 'square', 'triangle']\n")
    line = one_error_line(runner.invoke(app, train_args(run_kwargs, data=yaml)))
    assert "split 'train' has no usable images" in line and "\x1b" not in line
    assert not Path(run_kwargs["project"]).exists()
    eval_args = ["eval", "--weights", run_kwargs["teacher"], "--data", str(yaml), "--imgsz", "64"]
    with pytest.warns(UserWarning, match="no val image has a label"):  # scored, but never silently 0
        assert runner.invoke(app, eval_args).exit_code == 0
    for image in (bare / "images" / "val").iterdir():
        image.write_bytes(b"not an image")
    assert "split 'val' has no usable images" in one_error_line(runner.invoke(app, eval_args))


def test_an_export_name_the_filesystem_refuses_is_bad_input_before_any_work(tmp_path: Path, tiny_teacher: Path) -> None:
    for output in (tmp_path / ("a" * 300 + ".onnx"), tmp_path / "new" / ("a" * 300 + ".onnx")):
        args = ["export", "--weights", str(tiny_teacher), "--output", str(output)]
        assert "long" in one_error_line(runner.invoke(app, args))  # the OS says "File name too long"
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_setting_names_the_run_settings() -> None:
    with pytest.raises(DistillError, match="unknown setting 'epoch'; did you mean 'epochs'"):
        apply_overrides(RunConfig(), {"epoch": 3})
    with pytest.raises(DistillError, match="unknown setting 'zzz'; known: .*epochs.*losses"):
        apply_overrides(RunConfig(), {"zzz": 3})
    assert apply_overrides(RunConfig(), {"losses.cwd.weight": 2}).recipe.losses["cwd"].weight == 2


def test_resume_of_a_checkpoint_no_run_of_ours_wrote_is_bad_input(tmp_path: Path, tiny_teacher: Path) -> None:
    ckpt = torch.load(tiny_teacher, weights_only=False)
    for name, extra in (("plain.pt", {"distill": None}), ("partial.pt", {"resume": {"step": 1}, "distill": {}})):
        torch.save({**ckpt, **extra}, tmp_path / name)
        with pytest.raises(DistillError, match="not a checkpoint of a yolodistill run"):
            load_resume(tmp_path / name)


def test_the_api_takes_a_loaded_recipe_and_refuses_other_types_in_one_line(run_kwargs: dict) -> None:
    from distill_cli import load_recipe, train
    from distill_cli.settings import resolve_config

    cfg = resolve_config(recipe=load_recipe("cwd"), epochs=2)
    assert cfg.recipe == load_recipe("cwd") and cfg.recipe_name == "custom" and cfg.epochs == 2
    for call in (lambda: train(recipe=123, **run_kwargs), lambda: train({"epochs": 1}), lambda: load_recipe(None)):
        with pytest.raises(DistillError):
            call()
    assert not Path(run_kwargs["project"]).exists()


def test_json_output_writes_null_for_non_finite_numbers(capsys: pytest.CaptureFixture) -> None:
    """JSON has no NaN: json.dumps wrote a bare NaN (an export check of NaN weights gave one), which strict parsers
    refuse."""
    from distill_cli.console import print_json

    print_json({"diff": float("nan"), "rows": [float("inf"), 0.5, (float("-inf"), 1)], "name": "x"})

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    assert json.loads(capsys.readouterr().out, parse_constant=refuse) == {
        "diff": None,
        "rows": [None, 0.5, [None, 1]],
        "name": "x",
    }


def nan_weights(source: Path, target: Path) -> Path:
    ckpt = torch.load(source, weights_only=False)
    with torch.no_grad():
        ckpt["model"].model[-1].cv3[0][2].bias.fill_(float("nan"))
    torch.save(ckpt, target)
    return target


@pytest.mark.parametrize("command", ["export", "eval", "train"])
def test_a_checkpoint_with_nan_weights_is_bad_input(command: str, run_kwargs: dict, tmp_path: Path) -> None:
    """Such a file used to export with a 'passed' check whose difference was NaN, evaluate, and teach a run that
    skipped every step and ended as a success."""
    bad = str(nan_weights(Path(run_kwargs["teacher"]), tmp_path / "nan.pt"))
    args = {
        "export": ["export", "--weights", bad, "--imgsz", "64", "--output", str(tmp_path / "out" / "nan.onnx")],
        "eval": ["eval", "--weights", bad, "--data", run_kwargs["data"], "--imgsz", "64", "--device", "cpu"],
        "train": train_args({**run_kwargs, "teacher": bad}),
    }[command]
    before = tree(tmp_path)
    line = one_error_line(CliRunner().invoke(app, args))
    assert f"'{bad}' holds NaN or infinite weights" in line and tree(tmp_path) == before


def edited(source: Path, target: Path, part: str) -> Path:
    """A copy of ``source`` whose model (``part``: "names") or head ("head reg_max") has that attribute set to None."""
    ckpt = torch.load(source, weights_only=False)
    owner = ckpt["model"].model[-1] if part.startswith("head ") else ckpt["model"]
    setattr(owner, part.split()[-1], None)
    torch.save(ckpt, target)
    return target


@pytest.mark.parametrize(
    ("part", "told"),
    [
        ("yaml", "a model without its model definition"),
        ("head stride", "a model without its head's strides"),
        ("names", "a model without class names for its head's classes"),
        ("head reg_max", "a model that does not run (an edited or damaged file: TypeError"),
    ],
)
@pytest.mark.parametrize("command", ["export", "eval", "train"])
def test_a_checkpoint_edited_to_lack_a_part_is_bad_input(
    command: str, part: str, told: str, run_kwargs: dict, tmp_path: Path
) -> None:
    """A model whose yaml, head strides or box bins were set to None loaded, then failed inside ultralytics with a
    raw AttributeError or TypeError: exit 1 (export: 3, 'export failed'); names of None read as 0 classes and were
    blamed on the data yaml."""
    bad = str(edited(Path(run_kwargs["teacher"]), tmp_path / "edited.pt", part))
    args = {
        "export": ["export", "--weights", bad, "--imgsz", "64", "--output", str(tmp_path / "out" / "e.onnx")],
        "eval": ["eval", "--weights", bad, "--data", run_kwargs["data"], "--imgsz", "64", "--device", "cpu"],
        "train": train_args(run_kwargs, recipe="none", student=bad),
    }[command]
    before = tree(tmp_path)
    line = one_error_line(CliRunner().invoke(app, args))
    assert f"'{bad}' holds {told}" in line and tree(tmp_path) == before


def test_a_folder_given_for_a_file_is_named_as_a_folder(tmp_path: Path, run_kwargs: dict) -> None:
    """A folder was reported as 'not found', and eval's advice offered a model yaml, which eval refuses."""
    folder = tmp_path / "best.pt"
    folder.mkdir()
    eval_args = ["eval", "--weights", str(folder), "--data", run_kwargs["data"], "--imgsz", "64", "--device", "cpu"]
    line = one_error_line(CliRunner().invoke(app, eval_args))
    assert line.endswith(f"weights '{folder}' is a folder, not a file; give a .pt checkpoint"), line
    other_args = ["eval", "--weights", run_kwargs["teacher"], "--data", str(tmp_path)]
    line = one_error_line(CliRunner().invoke(app, other_args))
    assert f"data yaml '{tmp_path}' is a folder, not a file" in line
    with pytest.raises(DistillError, match="recipe file .* is a folder, not a file"):
        load_recipe(str(tmp_path))


def test_a_bare_saved_model_is_named_for_what_it_is(tmp_path: Path, tiny_teacher: Path) -> None:
    """ultralytics' loader keeps only the layers of a torch.save(model) file: the message said 'is a detect model'."""
    torch.save(torch.load(tiny_teacher, weights_only=False)["model"], tmp_path / "bare.pt")
    with pytest.raises(DistillError, match=r"is not an ultralytics checkpoint \(a model saved with torch.save"):
        load_model(str(tmp_path / "bare.pt"), "student")


@pytest.mark.parametrize("link", ["dangling", "loop", "to a file"])
@pytest.mark.parametrize("command", ["export", "compare", "train"])
def test_an_output_under_a_link_to_nothing_is_refused_before_any_work(
    command: str, link: str, run_kwargs: dict, tmp_path: Path
) -> None:
    """A link that leads nowhere (or loops) was taken for a folder still to be made: export ran the whole export and
    its check and failed with exit 3 ('File exists'), compare and train refused it only after their work began."""
    place = tmp_path / "place"
    if link == "to a file":
        (tmp_path / "file").write_text("")
        place.symlink_to(tmp_path / "file")
    elif link == "dangling":
        place.symlink_to(tmp_path / "nowhere")
    else:
        (tmp_path / "other").symlink_to(place)
        place.symlink_to(tmp_path / "other")
    teacher, data = run_kwargs["teacher"], run_kwargs["data"]
    args = {
        "export": ["export", "--weights", teacher, "--imgsz", "64", "--output", str(place / "x.onnx")],
        "compare": ["compare", "--weights", teacher, "--data", data, "--imgsz", "64", "--out", str(place / "c")],
        "train": train_args(run_kwargs, recipe="none", project=place),
    }[command]
    before = tree(tmp_path)
    line = one_error_line(runner.invoke(app, args))
    kind = "a file" if link == "to a file" else "a link to nothing, or a loop of links"
    assert f"('{place}' is {kind})" in line and tree(tmp_path) == before


@pytest.mark.parametrize("command", ["compare", "demo"])
@pytest.mark.parametrize("what", ["a file", "a dangling link"])
def test_out_at_a_file_is_refused_not_numbered_beside_it(
    command: str, what: str, run_kwargs: dict, tmp_path: Path
) -> None:
    """--out report.md, a file that is there, wrote a folder report.md2 beside it (as for a taken folder)."""
    out = tmp_path / "report.md"
    if what == "a file":
        out.write_text("kept")
    else:
        out.symlink_to(tmp_path / "nowhere")
    args = {
        "compare": ["compare", "--weights", run_kwargs["teacher"], "--data", run_kwargs["data"], "--imgsz", "64"],
        "demo": ["demo", "--epochs", "1"],
    }[command]
    before = tree(tmp_path)
    line = one_error_line(runner.invoke(app, [*args, "--out", str(out)]))
    kind = "a file" if what == "a file" else "a link to nothing, or a loop of links"
    assert f"('{out}' is {kind}); use --out DIR" in line and tree(tmp_path) == before


@pytest.mark.parametrize("fmt", ["imx", "qnn"])
def test_export_refuses_int8_only_formats_that_would_download_calibration_images(
    fmt: str, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ultralytics quantizes these with images of a data yaml, and export takes none: it tried to download coco8
    (YOLO_OFFLINE=1 or not), made its datasets folder, and failed with exit 3."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(runner.invoke(app, ["export", "--weights", str(tiny_teacher), "--format", fmt]))
    assert f"--format {fmt} is INT8 only" in line and f"format={fmt} imgsz=640 data=DATA" in line
    assert not any(tmp_path.iterdir())
