"""Run reports and model comparison: every figure is a real PNG, compare's table equals eval's, CKA behaves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from distill_cli.comparison import compare
from distill_cli.evaluation import evaluate
from distill_cli.report import linear_cka
from distill_cli.training import train

FIGURES = ["losses.png", "metrics.png", "schedules.png", "per_class_ap.png", "feature_agreement.png"]


def assert_real_png(path: Path, min_side: int = 300) -> None:
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side, (path, image.size)


def test_linear_cka_self_one_and_independent_near_zero() -> None:
    torch.manual_seed(0)
    x = torch.randn(4000, 32)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 3 * x @ torch.linalg.qr(torch.randn(32, 32))[0] + 1) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, torch.randn(4000, 48)) < 0.02


def test_one_epoch_run_writes_the_report_and_every_figure(run_kwargs: dict) -> None:
    result = train(recipe="cwd+logits", **{**run_kwargs, "epochs": 2})
    assert result.report == result.run_dir / "report.md"
    text = result.report.read_text()
    for figure in FIGURES:
        assert f"report/{figure}" in text
        assert_real_png(result.run_dir / "report" / figure)
    for section in ("| teacher |", "| student before |", "Per-class AP50-95", "| cwd 15->15 |"):
        assert section in text
    assert result.start_metrics == {} and result.beat_start is None  # a yaml student: its start is no mark to beat


def test_no_report_flag_writes_none(run_kwargs: dict) -> None:
    result = train(recipe="cwd", report=False, **run_kwargs)
    assert result.report is None and not (result.run_dir / "report.md").exists()


def test_tensorboard_is_optional(run_kwargs: dict) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="needs the tensorboard package"):
            result = train(recipe="cwd", tensorboard=True, report=False, **run_kwargs)
        assert result.best.is_file()
    else:
        result = train(recipe="cwd", tensorboard=True, report=False, **run_kwargs)
        assert list((result.run_dir / "tensorboard").glob("events.*"))


def test_compare_two_checkpoints_matches_eval(
    run_kwargs: dict, tiny_teacher: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    student = train(recipe="cwd", report=False, **run_kwargs).best
    weights = [str(tiny_teacher), str(student)]
    out = compare(
        weights, str(synthetic_data), imgsz=64, batch=4, device="cpu", out=tmp_path / "cmp" / "exp", samples=2
    )
    rows = evaluate(weights, str(synthetic_data), imgsz=64, batch=4, device="cpu")
    for got, expected in zip(out["table"], rows, strict=True):
        for key in ("mAP50-95", "mAP50", "params", "gflops"):
            assert got[key] == expected[key], key
    report = Path(out["report"])
    text = report.read_text()
    assert "| teacher |" in text and "| best |" in text
    for figure in ("per_class_ap.png", "pr_curves.png", "predictions.png"):
        assert figure in text
        assert_real_png(report.parent / figure, min_side=250)


def test_a_resumed_run_still_writes_its_report(run_kwargs: dict, tmp_path: Path) -> None:
    """A fine-tune (a .pt student for the data's classes): the resumed run brings the start it measured."""
    import os
    import signal

    from distill_cli.errors import DistillError

    from .conftest import saved_teacher

    student = str(saved_teacher(tmp_path / "student.pt", "yolov8n.yaml", imgsz=64))

    def stop_after_first_epoch(event: str, info: dict) -> None:
        if event == "epoch" and info["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(DistillError, match="interrupted"):
        train(recipe="cwd", callback=stop_after_first_epoch, **{**run_kwargs, "epochs": 2, "student": student})
    resumed = train(resume=f"{run_kwargs['project']}/exp")
    assert resumed.report is not None and "| student before |" in resumed.report.read_text()
    assert set(resumed.start_metrics) >= {"mAP50-95", "mAP50"}


def test_the_starting_student_is_epoch_0_and_the_summary_says_when_no_epoch_beat_it(
    run_kwargs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fine-tune that cannot move (learning rate ~0) ends where it started: no epoch beat the student as given,
    and the run says so (summary, report, JSON); the report's mAP curve starts at epoch 0."""
    import json

    from typer.testing import CliRunner
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli import plots, report
    from distill_cli.cli import app
    from distill_cli.data import SYNTHETIC_CLASSES

    from .conftest import save_model, train_args

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = dict(enumerate(SYNTHETIC_CLASSES))
    student = save_model(tmp_path / "student.pt", model)
    drawn = {}
    original = plots.metric_curves
    monkeypatch.setattr(
        plots, "metric_curves", lambda epochs, *a: drawn.setdefault("epochs", epochs) and original(epochs, *a)
    )
    frozen = {"set": "lr0=1.0e-12", "student": str(student)}
    done = CliRunner().invoke(app, [*train_args(run_kwargs, **frozen), "--set", "optimizer=SGD", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["beat_start"] is False and result["start_metrics"]
    assert report.NO_EPOCH_BEAT_THE_START in Path(result["report"]).read_text()
    assert drawn["epochs"] == [0, 1]


@pytest.mark.parametrize("student", ["yaml", "other-classes"])
def test_a_student_with_no_start_of_its_own_is_not_told_to_keep_its_checkpoint(
    run_kwargs: dict, tmp_path: Path, student: str
) -> None:
    """A student built from a yaml, or a .pt trained for other classes (its last class layers start afresh), brings
    no checkpoint for the data: 'No epoch beat the student you started from: keep your own checkpoint' was printed and
    reported for it (and beat_start was False) when training did not move it."""
    import warnings

    from distill_cli import report

    from .test_keep_start import student_pt

    given = "yolov8n.yaml" if student == "yaml" else str(student_pt(tmp_path / "other.pt", ["cat", "dog"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the other classes' warning
        result = train(recipe="none", **{**run_kwargs, "student": given, "lr0": 1e-12, "optimizer": "SGD"})
    assert result.beat_start is None and result.start_metrics == {}
    text = result.report.read_text()
    assert "| student before |" in text and report.NO_EPOCH_BEAT_THE_START not in text
