"""The command line: help for every command, one-line errors with stable exit codes, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill_cli.cli import app
from distill_cli.errors import EXIT_USAGE

from .conftest import train_args

runner = CliRunner()
COMMANDS = ["probe-channels", "train", "eval", "compare", "export", "demo", "recipes"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def assert_one_line_error(result, pattern: str, code: int = EXIT_USAGE) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr


def test_missing_teacher_file(run_kwargs: dict) -> None:
    args = [
        "train",
        "--teacher",
        "nope.pt",
        "--student",
        "yolov8n.yaml",
        "--data",
        run_kwargs["data"],
        "--project",
        run_kwargs["project"],
    ]
    assert_one_line_error(runner.invoke(app, args), "teacher 'nope.pt' not found")
    assert not Path(run_kwargs["project"]).exists()


def test_missing_data_yaml(run_kwargs: dict) -> None:
    args = ["train", "--teacher", run_kwargs["teacher"], "--student", "yolov8n.yaml", "--data", "missing.yaml"]
    assert_one_line_error(runner.invoke(app, args), "data yaml 'missing.yaml' not found")


def test_file_that_is_not_a_checkpoint(tmp_path: Path, run_kwargs: dict) -> None:
    for name, payload in (("text.pt", b"hello"), ("random.pt", bytes(range(256)) * 10)):
        bad = tmp_path / name
        bad.write_bytes(payload)
        args = ["probe-channels", "--teacher", str(bad), "--student", "yolov8n.yaml"]
        assert_one_line_error(runner.invoke(app, args), "is not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(run_kwargs["teacher"]).read_bytes()[:5000])
    args = ["probe-channels", "--teacher", str(truncated), "--student", "yolov8n.yaml"]
    assert_one_line_error(runner.invoke(app, args), "truncated.pt")


def test_a_checkpoint_holding_a_bare_tensor_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)  # ultralytics reads .model of it: an AttributeError, exit 1 before
    result = runner.invoke(app, ["probe-channels", "--teacher", str(path), "--student", "yolov8n.yaml"])
    assert_one_line_error(result, "tensor.pt' is not a loadable checkpoint")


def test_a_loss_parameter_given_twice_is_bad_input(tmp_path: Path) -> None:
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("losses:\n  cls_kd: {weight: 1, temperature: 3, params: {temperature: 2}}\n")
    args = ["probe-channels", "--teacher", "yolov8s.yaml", "--student", "yolov8n.yaml", "--recipe", str(recipe)]
    assert_one_line_error(runner.invoke(app, args), "temperature given in 'params' and beside it")


def test_non_detection_checkpoint(tmp_path: Path) -> None:
    from ultralytics.nn.tasks import ClassificationModel

    path = tmp_path / "cls.pt"
    torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)}, path)
    result = runner.invoke(app, ["probe-channels", "--teacher", str(path), "--student", "yolov8n.yaml"])
    assert_one_line_error(result, "is a classify model; yolodistill distils detection models")


def test_class_mismatch_for_output_distillation(tmp_path: Path, run_kwargs: dict) -> None:
    from ultralytics.nn.tasks import DetectionModel

    from .conftest import save_model

    other = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    other.names = {0: "cat", 1: "dog"}
    teacher = save_model(tmp_path / "other.pt", other)
    args = [
        "train",
        "--teacher",
        str(teacher),
        "--student",
        "yolov8n.yaml",
        "--data",
        run_kwargs["data"],
        "--recipe",
        "logits",
        "--imgsz",
        "64",
        "--device",
        "cpu",
        "--project",
        run_kwargs["project"],
    ]
    assert_one_line_error(runner.invoke(app, args), "needs the same class list")
    assert not Path(run_kwargs["project"]).exists()


@pytest.mark.parametrize("yaml", ["yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-obb.yaml"])
def test_segment_pose_obb_checkpoints_are_refused(yaml: str, tmp_path: Path) -> None:
    from ultralytics.nn.tasks import OBBModel, PoseModel, SegmentationModel

    cls = {"seg": SegmentationModel, "pose": PoseModel, "obb": OBBModel}[yaml.split("-")[1].split(".")[0]]
    path = tmp_path / "model.pt"
    torch.save({"model": cls(yaml, verbose=False)}, path)
    result = runner.invoke(app, ["probe-channels", "--teacher", str(path), "--student", "yolov8n.yaml"])
    assert_one_line_error(result, "yolodistill distils detection models")


def test_several_gpus_without_gpus(run_kwargs: dict) -> None:
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs: the launcher would start a real run")
    result = runner.invoke(app, train_args(run_kwargs, device="0,1"))
    assert_one_line_error(result, "--device 0,1: this machine has")


def test_unknown_recipe_and_cuda_without_gpu(run_kwargs: dict) -> None:
    base = ["train", "--teacher", run_kwargs["teacher"], "--student", "yolov8n.yaml", "--data", run_kwargs["data"]]
    assert_one_line_error(runner.invoke(app, [*base, "--recipe", "bogus"]), "valid recipes: at, bckd, crosskd, cwd")
    assert_one_line_error(runner.invoke(app, [*base, "--set", "losses.cwd.temp=2"]), "has no parameter 'temp'")
    if not torch.cuda.is_available():
        assert_one_line_error(runner.invoke(app, [*base, "--device", "cuda"]), "no such CUDA device")


def test_probe_channels_json() -> None:
    result = runner.invoke(
        app, ["probe-channels", "--teacher", "yolov8s.yaml", "--student", "yolov8n.yaml", "--imgsz", "128", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [p["adapter"] for p in report["pairs"]["default"]][0] == "64 -> 128, 1x1 conv"


def test_recipes_json_lists_descriptions() -> None:
    result = runner.invoke(app, ["recipes", "--json"])
    rows = json.loads(result.stdout)
    assert {"name": "none", "terms": "-"}.items() <= next(r for r in rows if r["name"] == "none").items()


def test_console_script_train_json_end_to_end(run_kwargs: dict) -> None:
    """The installed ``yolodistill`` entry point, as a shell script would call it."""
    exe = Path(sys.executable).with_name("yolodistill")
    cmd = [str(exe), *train_args(run_kwargs), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{") :])
    assert Path(report["best"]).is_file() and report["epochs_done"] == 1


def test_train_names_the_recipe_that_runs(run_kwargs: dict) -> None:
    """The start-up lines name the recipe and its terms with their weights."""
    result = runner.invoke(app, [*train_args(run_kwargs, recipe="default"), "--no-report"])
    assert result.exit_code == 0, result.output
    assert "recipe default: cls_kd x1.5, box_kd x3" in result.output


def test_train_json_prints_nothing_on_the_ranks_that_return_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun only rank 0 returns a result; the others must exit 0 quietly, not fail on it."""
    from distill_cli import training

    monkeypatch.setattr(training, "train", lambda **kwargs: None)
    result = runner.invoke(app, ["train", "--student", "s.pt", "--json"])
    assert result.exit_code == 0 and result.stdout == "", result.output


def test_multi_gpu_launch_checks_the_inputs_once_first(run_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input under --device 0,1 is the same one line (exit 2) as on one device, before any process starts."""
    from distill_cli import dist

    launched: list = []
    monkeypatch.setattr(dist, "device_ids", lambda devices: ["0", "1"])  # as on a machine with two GPUs
    monkeypatch.setattr(dist, "launch", lambda argv, devices: launched.append(argv) or 0)
    missing = str(Path(run_kwargs["project"]) / "missing.yaml")
    assert_one_line_error(runner.invoke(app, train_args(run_kwargs, data=missing, device="0,1")), "data yaml")
    assert not launched and not Path(run_kwargs["project"]).exists()
    assert runner.invoke(app, train_args(run_kwargs, device="0,1")).exit_code == 0 and launched


@pytest.mark.parametrize("key", ["resume", "recipe"])
def test_set_of_a_train_argument_is_one_line(key: str) -> None:
    assert_one_line_error(runner.invoke(app, ["train", "--set", f"{key}=x"]), f"--set {key}: not a config field")


@pytest.mark.parametrize(
    ("where", "flag"), [("before", "--verbose"), ("after", "--verbose"), ("after", "-v"), ("both", "-v")]
)
def test_verbose_is_taken_before_the_command_or_after_it(where: str, flag: str, tmp_path: Path) -> None:
    """Error lines say 'run with --verbose for details', and an --verbose added at the end was refused as an unknown
    option of the command (exit 2, 'No such option'); -v after the command was refused until 0.3.32."""
    command = ["eval", "--weights", "w.pt", "--data", str(tmp_path / "d.yaml")]
    args = {"before": [flag, *command], "after": [*command, flag], "both": [flag, *command, flag]}[where]
    result = runner.invoke(app, args)
    assert result.exit_code == EXIT_USAGE
    assert "Traceback" in result.output and "d.yaml' not found" in result.output, result.output


@pytest.mark.parametrize("flag", ["--verbose", "-v"])
def test_verbose_as_an_options_value_or_after_double_dash_is_not_the_flag(flag: str, tmp_path: Path) -> None:
    weights_named_so = runner.invoke(app, ["eval", "--weights", flag, "--data", str(tmp_path / "d.yaml")])
    assert weights_named_so.exit_code == EXIT_USAGE and "Traceback" not in weights_named_so.output
    assert f"'{flag}'" in weights_named_so.output, weights_named_so.output
    after_dashes = runner.invoke(app, ["eval", "--weights", "w.pt", "--data", "d.yaml", "--", flag])
    assert after_dashes.exit_code == EXIT_USAGE and "Traceback" not in after_dashes.output
    assert f"'{flag}'" in after_dashes.output, after_dashes.output  # a value (of the weights list), not the flag
