"""eval equals ultralytics' own val; export writes ONNX that matches PyTorch; the demo runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from ultralytics import YOLO

from distill_cli.cli import app
from distill_cli.demo import run_demo
from distill_cli.errors import EXIT_RUNTIME, DistillError
from distill_cli.evaluation import evaluate
from distill_cli.exporter import export
from distill_cli.training import train

from .conftest import BCCD_STUDENT, BCCD_YAML, needs_shared


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synthetic_data: Path, tiny_teacher: Path) -> Path:
    project = tmp_path_factory.mktemp("trained")
    result = train(
        recipe="cwd",
        teacher=str(tiny_teacher),
        student="yolov8n.yaml",
        data=str(synthetic_data),
        imgsz=64,
        batch=4,
        epochs=2,
        workers=0,
        device="cpu",
        project=str(project),
    )
    return result.best


def test_eval_numbers_equal_ultralytics_val(trained: Path, tiny_teacher: Path, synthetic_data: Path) -> None:
    rows = evaluate([str(trained), str(tiny_teacher)], str(synthetic_data), imgsz=64, batch=4, device="cpu")
    reference = YOLO(str(trained)).val(data=str(synthetic_data), imgsz=64, batch=4, device="cpu", plots=False)
    assert rows[0]["mAP50-95"] == pytest.approx(reference.box.map, abs=1e-9)
    assert rows[0]["mAP50"] == pytest.approx(reference.box.map50, abs=1e-9)
    assert rows[0]["params"] < rows[1]["params"] and rows[0]["gflops"] < rows[1]["gflops"]


@needs_shared
def test_eval_on_real_data_equals_ultralytics() -> None:
    row = evaluate([str(BCCD_STUDENT)], str(BCCD_YAML), imgsz=256, batch=16, device="cpu")[0]
    reference = YOLO(str(BCCD_STUDENT)).val(data=str(BCCD_YAML), imgsz=256, batch=16, device="cpu", plots=False)
    assert row["mAP50-95"] == pytest.approx(reference.box.map, abs=1e-9)
    assert row["mAP50-95"] > 0.3


def test_export_onnx_matches_pytorch_and_never_overwrites(trained: Path, tmp_path: Path) -> None:
    target = tmp_path / "student.onnx"
    with pytest.warns(UserWarning, match="imgsz 50 is not a multiple of the stride 32; using 64"):
        result = export(str(trained), "onnx", imgsz=50, output=str(target))  # the size the exporter rounds to
    assert target.is_file() and result["max_abs_diff"] < 1e-3 and result["imgsz"] == 64
    with pytest.raises(DistillError, match="already exists; remove it or name another --output"):
        export(str(trained), "onnx", imgsz=64, output=str(target))


def test_an_onnx_check_with_non_finite_outputs_fails_and_writes_nothing(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN difference passed the check (NaN compares false with any bound): the file was written as checked."""
    from distill_cli import exporter

    monkeypatch.setattr(exporter, "onnx_parity", lambda weights, onnx_file, x: float("nan"))
    with pytest.raises(DistillError, match="the ONNX check failed: the outputs of .* hold NaN or inf") as failed:
        export(str(trained), "onnx", imgsz=64, output=str(tmp_path / "out" / "student.onnx"))
    assert failed.value.exit_code == EXIT_RUNTIME and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fmt", "module", "message"),
    [
        ("openvino", "openvino", "--format openvino needs the Python module 'openvino', which is not installed here"),
        ("onnx", "onnxruntime", "--format onnx checks the file with onnxruntime, which is not installed here"),
    ],
)
def test_an_export_whose_package_is_missing_is_bad_input(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, module: str, message: str
) -> None:
    """A format's missing package is the user's to install: it exited 3 ("the run failed") after ultralytics' own
    error line, or, for onnxruntime after the export, 1 ("unexpected")."""
    import logging
    import sys

    from ultralytics.utils import LOGGER, checks

    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, installed or not
    monkeypatch.setattr(checks, "AUTOINSTALL", False)  # online, ultralytics would pip-install it first
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append  # type: ignore[method-assign]
    monkeypatch.setattr(LOGGER, "handlers", [*LOGGER.handlers, handler])
    result = CliRunner().invoke(
        app, ["export", "--weights", str(trained), "--format", fmt, "--output", str(tmp_path / "out" / "student")]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and not (tmp_path / "out").exists()
    assert not [r for r in logged if "export failure" in r.getMessage()], "ultralytics' error line came first"


@pytest.mark.parametrize(
    ("error", "package"),
    [
        (
            ModuleNotFoundError("No module named 'surely_absent_package'", name="surely_absent_package.sub"),
            "surely_absent_package",
        ),
        (ModuleNotFoundError("No module named 'yaml.x'", name="yaml.x"), None),  # installed: a broken install
        (ModuleNotFoundError("No module named 'ultralytics.utils.x'", name="ultralytics.utils.x"), None),
        (ImportError("Hailo export requires Linux"), None),  # ultralytics' own requirement, no module named
    ],
)
def test_only_a_package_that_is_not_installed_makes_an_export_bad_input(error: Exception, package: str | None) -> None:
    """Any ImportError was bad input, named as module 'None' when it named none, and a broken install or a module
    missing from ultralytics itself was said to be not installed."""
    from distill_cli.exporter import missing_package

    assert missing_package(error) == package


def test_eval_json_from_the_cli(trained: Path, synthetic_data: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--weights",
            str(trained),
            "--data",
            str(synthetic_data),
            "--imgsz",
            "64",
            "--batch",
            "4",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout[result.stdout.index("[") :])
    assert set(rows[0]) >= {"model", "params", "gflops", "mAP50-95", "mAP50", "ms_per_img"}


def test_demo_end_to_end_small(tmp_path: Path) -> None:
    report = run_demo(tmp_path / "demo", epochs=1, n_train=8, n_val=4, imgsz=64)
    roles = ["teacher", "student (plain)", "student (distilled)"]
    assert [row["label"] for row in report["table"]] == [f"{f} {r}" for f in ("YOLOv8", "YOLO26") for r in roles]
    for row in report["table"]:  # "model" is the checkpoint, as in eval's rows
        assert Path(row["model"]).is_file() and "weights" not in row
    assert (Path(report["out"]) / "yolo26_student_distilled" / "report.md").is_file()
