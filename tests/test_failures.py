"""A command that fails leaves the output folder as it was: what it creates appears only with the work that fills it,
or goes away again. The one exception is a training run's resumable last.pt."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill_cli.cli import app
from distill_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, DistillError, sigterm_interrupts
from distill_cli.training import train

from .conftest import save_model, train_args, tree

runner = CliRunner()


def exit_143(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # what Python's default SIGTERM does to a process, survivable by pytest


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """A shell that starts pytest in the background (``cmd &`` without job control) ignores SIGINT in it, and the
    interrupted start-ups below rely on Python's own handler: install it whatever the launch. SIGTERM stands in for
    Python's default (exit 143) without ending the test process."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, exit_143)
    yield
    signal.signal(signal.SIGINT, previous)
    signal.signal(signal.SIGTERM, previous_term)


@pytest.fixture(scope="module")
def small_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.data import SYNTHETIC_CLASSES

    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = dict(enumerate(SYNTHETIC_CLASSES))
    return save_model(tmp_path_factory.mktemp("student") / "student.pt", model)


def fail(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected failure")


def interrupt(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGINT)  # a real signal; Python raises KeyboardInterrupt at the next instruction
    raise AssertionError("the signal did not arrive")


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "report.md")


def write_part_of(target: str | Path) -> None:
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_bytes(b"part of a file")  # a move across filesystems is a copy, cut short here


def half_written_then_stopped(source: str, target: str | Path) -> None:
    write_part_of(target)
    terminate()


def half_written_then_disk_full(source: str, target: str | Path) -> None:
    write_part_of(target)
    disk_full()


def terminate(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: an interruption as Ctrl-C is, not a silent exit 143
    raise AssertionError("the signal did not arrive")


def late_failures(data: str, teacher: str, student: str) -> dict[str, tuple[list[str], str, Callable]]:
    """Per command: a command line, and what to break after the command has started its work."""
    base = ["--imgsz", "64", "--device", "cpu"]
    run = ["train", "--teacher", teacher, "--student", "yolov8n.yaml", "--data", data, "--recipe", "cwd",
           "--epochs", "1", "--batch", "4", "--workers", "0", *base]  # fmt: skip
    return {
        "train": (run, "distill_cli.training.measure_baseline", fail),
        "train-sigint": (run, "distill_cli.training.measure_baseline", interrupt),
        "eval": (["eval", "--weights", student, "--data", data, *base], "distill_cli.evaluation.run_validator", fail),
        "compare": (
            ["compare", "--weights", student, teacher, "--data", data, *base],
            "distill_cli.comparison.draw_predictions",
            fail,
        ),
        "export": (["export", "--weights", student, "--imgsz", "64"], "distill_cli.exporter.onnx_parity", fail),
        "export-sigterm": (
            ["export", "--weights", student, "--imgsz", "64", "--format", "torchscript", "--output", "new/s.ts"],
            "distill_cli.exporter.shutil.move",
            half_written_then_stopped,
        ),
        "export-disk-full": (
            ["export", "--weights", student, "--imgsz", "64", "--format", "torchscript", "--output", "new/s.ts"],
            "distill_cli.exporter.shutil.move",
            half_written_then_disk_full,
        ),
        "compare-disk-full": (
            ["compare", "--weights", student, teacher, "--data", data, *base],
            "distill_cli.comparison.draw_predictions",
            disk_full,
        ),
        "compare-sigterm": (
            ["compare", "--weights", student, teacher, "--data", data, *base],
            "distill_cli.comparison.draw_predictions",
            terminate,
        ),
        "demo": (["demo", "--epochs", "1"], "distill_cli.demo.train", fail),
        "demo-sigterm": (["demo", "--epochs", "1"], "distill_cli.demo.train", terminate),
        "demo-disk-full": (["demo", "--epochs", "1"], "distill_cli.demo.train", disk_full),
        "probe-channels": (
            ["probe-channels", "--teacher", teacher, "--student", student], "distill_cli.probe.pair_layers", fail
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        *(
            "train",
            "train-sigint",
            "eval",
            "compare",
            "compare-sigterm",
            "compare-disk-full",
            "export",
            "export-sigterm",
            "export-disk-full",
        ),
        *("demo", "demo-sigterm", "demo-disk-full", "probe-channels"),
    ],
)
def test_a_failed_command_leaves_the_folder_as_it_was(
    case: str,
    quiet_folder: Path,
    synthetic_data: Path,
    tiny_teacher: Path,
    small_student: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    student = quiet_folder / "student.pt"
    shutil.copy(small_student, student)  # export writes beside its weights by default
    before = tree(quiet_folder)
    args, target, breaker = late_failures(str(synthetic_data), str(tiny_teacher), str(student))[case]
    monkeypatch.setattr(target, breaker)
    result = runner.invoke(app, args)
    exits = {fail: 1, disk_full: EXIT_RUNTIME, half_written_then_disk_full: EXIT_RUNTIME}
    assert result.exit_code == exits.get(breaker, EXIT_INTERRUPTED), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert tree(quiet_folder) == before


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_during_the_teardown_after_a_command_leaves_its_exit_code(stop: str) -> None:
    """The stop arrives from an atexit hook, once the command has finished: SIGTERM killed the process (143 after a
    success), SIGINT printed a KeyboardInterrupt traceback."""
    script = (
        "import atexit, os, signal, sys, time\n"
        f"atexit.register(lambda: (os.kill(os.getpid(), signal.{stop}), time.sleep(0.5)))\n"
        "sys.argv = ['yolodistill', 'recipes', '--json']\n"
        "from distill_cli.cli import main\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-2000:])
    assert json.loads(done.stdout)  # the command's output, whole


def test_sigterm_is_an_interruption_unless_ignored_and_only_in_the_main_thread() -> None:
    with sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is exit_143  # put back
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # trap '' TERM: the caller's choice stands
    with sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    signal.signal(signal.SIGTERM, exit_143)  # handled, so that the thread reaches signal.signal and its refusal
    raised: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            with sigterm_interrupts():
                raise RuntimeError("the body's own error")
        except RuntimeError as e:
            raised.append(e)

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert raised and raised[0].__context__ is None  # no "signal only works in main thread" chained onto it


def test_an_interrupted_start_up_says_nothing_was_saved(run_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT or SIGTERM after the run folder was made but before the first checkpoint."""
    for sig in (signal.SIGINT, signal.SIGTERM):

        def stop(event: str, info: dict, sig: signal.Signals = sig) -> None:
            if event == "start":
                os.kill(os.getpid(), sig)

        with pytest.raises(DistillError) as stopped:
            train(recipe="cwd", callback=stop, **run_kwargs)
        assert stopped.value.exit_code == EXIT_INTERRUPTED
        assert "nothing was saved" in stopped.value.message and "--resume" not in stopped.value.message
        assert not Path(run_kwargs["project"]).exists()


def test_an_interruption_after_the_first_checkpoint_resumes(run_kwargs: dict) -> None:
    def stop(event: str, info: dict) -> None:
        if event == "step":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(DistillError, match="--resume") as stopped:
        train(recipe="cwd", callback=stop, **{**run_kwargs, "batch": 2, "report": False})
    assert stopped.value.exit_code == EXIT_INTERRUPTED
    run_dir = Path(run_kwargs["project"]) / "exp"
    assert "resume" in torch.load(run_dir / "weights" / "last.pt", weights_only=False)
    assert train(resume=run_dir).epochs_done == 1


def test_a_failed_run_leaves_the_run_started_beside_it_in_the_project_folder_it_made(
    run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = Path(run_kwargs["project"])
    assert not project.exists()  # this run makes it; main removed it whole, with the other run in it
    theirs = project / "exp2" / "weights" / "last.pt"

    def another_run_starts_then_this_one_fails(*args: object, **kwargs: object) -> None:
        theirs.parent.mkdir(parents=True)  # a second ``train --project`` started meanwhile
        theirs.write_bytes(b"its checkpoint")
        raise RuntimeError("injected failure")

    monkeypatch.setattr("distill_cli.training.measure_baseline", another_run_starts_then_this_one_fails)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(recipe="cwd", **run_kwargs)
    assert theirs.read_bytes() == b"its checkpoint"
    assert sorted(path.name for path in project.iterdir()) == ["exp2"]


def test_an_export_target_written_meanwhile_is_kept(
    quiet_folder: Path, small_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill_cli import exporter

    target = quiet_folder / "s.torchscript"
    checked = exporter.check_target

    def written_after_the_first_check(path: Path, named: bool) -> None:
        checked(path, named)
        if not target.exists():
            target.write_bytes(b"another export")  # a second export of the same weights, finished first

    monkeypatch.setattr(exporter, "check_target", written_after_the_first_check)
    result = runner.invoke(app, ["export", "--weights", str(small_student), "--imgsz", "64", "--format",
                                 "torchscript", "--output", str(target)])  # fmt: skip
    assert result.exit_code == EXIT_USAGE and "already exists" in result.stderr, result.output
    assert target.read_bytes() == b"another export"  # main moved its own file over it


def test_unusable_training_images_leave_no_run_folder(run_kwargs: dict, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(Path(run_kwargs["data"]).parent, root)
    for cache in root.glob("labels/*.cache"):
        cache.unlink()
    (root / "data.yaml").write_text(
        (root / "data.yaml").read_text().replace(str(Path(run_kwargs["data"]).parent), str(root))
    )
    for label in (root / "labels" / "train").glob("*.txt"):
        label.write_text("0 0.5 0.5\n")  # three values, not five: every image is skipped
    result = runner.invoke(app, train_args({**run_kwargs, "data": str(root / "data.yaml")}))
    assert result.exit_code == EXIT_USAGE and "no usable images" in result.stderr, result.output
    assert not Path(run_kwargs["project"]).exists()


def test_compare_writes_no_stray_folders(synthetic_data: Path, small_student: Path, quiet_folder: Path) -> None:
    result = runner.invoke(app, ["compare", "--weights", str(small_student), "--data", str(synthetic_data),
                                 "--imgsz", "64", "--device", "cpu", "--samples", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (quiet_folder / "runs" / "compare" / "exp").iterdir()) == [
        "per_class_ap.png",
        "pr_curves.png",
        "predictions.png",
        "report.md",
    ]


def test_compare_draws_ground_truth_past_a_malformed_label_line(synthetic_data: Path, tmp_path: Path) -> None:
    from distill_cli.comparison import draw_ground_truth

    root = tmp_path / "data"
    shutil.copytree(synthetic_data.parent, root)
    label = root / "labels" / "val" / "0000.txt"
    label.write_text("0 0.5 0.5 0.2 0.2\nnot a label\n1 0.5\n")
    assert draw_ground_truth(root / "images" / "val" / "0000.png").shape[2] == 3


@pytest.mark.parametrize("signalled", [True, False])
def test_workers_killed_by_the_stop_signal_end_as_an_interruption(
    signalled: bool, run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the process group (timeout, systemd, batch schedulers) kills the loader's workers too, and torch
    raises their death (a RuntimeError) wherever the main process is: after the signal that is an interruption
    (exit 130, resumable), not an unexpected failure (exit 1); without the signal it stays a failure."""
    from distill_cli import stopping

    def dying_workers(stop: stopping.StopOnSignal, loader, device):
        stop.flag = signalled
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
        yield  # a generator, as the loader's batches

    monkeypatch.setattr(stopping.StopOnSignal, "watch", dying_workers)
    if signalled:
        with pytest.raises(DistillError) as stopped:
            train(recipe="none", **run_kwargs)
        assert stopped.value.exit_code == EXIT_INTERRUPTED and "Resume:" in stopped.value.message
    else:
        with pytest.raises(RuntimeError, match="killed by signal"):
            train(recipe="none", **run_kwargs)
