"""Values that used to pass silently or with a misleading message, and paths that scripts read: an empty --layers,
a one-class softmax, the same weights twice, an imgsz rounded without a word, resume advice, a teacher that a
recipe does not use, run paths after a resume, and the multi-GPU launcher's exit code when stopped."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from distill_cli import data, dist
from distill_cli.checkpoint import load_resume
from distill_cli.cli import app
from distill_cli.comparison import model_labels
from distill_cli.config import recipe_from_dict
from distill_cli.data import make_synthetic_dataset
from distill_cli.demo import run_demo
from distill_cli.errors import EXIT_INTERRUPTED, DistillError
from distill_cli.evaluation import mismatch_notes
from distill_cli.options import checkpoints_problem
from distill_cli.runlog import new_run_dir
from distill_cli.training import check_inputs, train

from .conftest import train_args
from .test_inputs import one_error_line
from .test_resume import interrupt_after_epoch

runner = CliRunner()


def test_an_empty_layers_option_is_bad_input_not_the_default(run_kwargs: dict) -> None:
    line = one_error_line(runner.invoke(app, train_args(run_kwargs, layers="")))
    assert "--layers ''" in line
    assert not Path(run_kwargs["project"]).exists()


def test_a_softmax_class_term_on_one_class_is_refused() -> None:
    """A softmax over one class is 1 whatever the logit: the term would be 0 and teach nothing."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.distiller import output_problem
    from distill_cli.probe import output_verdict

    one = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    one.names = {0: "cell"}
    kl = {"mode": "kl", "weight_by": "teacher_conf"}
    assert "with one class it is 0" in output_problem("cls_kd", one, one, "cls_kd", kl)
    assert output_problem("cls_kd", one, one, "cls_kd", {"mode": "bce"}) is None
    spec = recipe_from_dict({"losses": {"a": {"type": "cls_kd"}, "b": {"type": "cls_kd", **kl}}})
    assert "with one class it is 0" in output_verdict("cls_kd", one, one, spec)  # probe --recipe shows it
    assert output_verdict("cls_kd", one, one, None) == "applies"


def test_the_same_weights_twice_are_refused_and_labels_stay_unique(tiny_teacher: Path, tmp_path: Path) -> None:
    again = f"{tiny_teacher.parent}/./{tiny_teacher.name}"
    line = one_error_line(runner.invoke(app, ["eval", "--weights", str(tiny_teacher), again, "--data", "x.yaml"]))
    assert f"names one file twice ('{tiny_teacher}', '{again}')" in line
    (tmp_path / "link.pt").symlink_to(tiny_teacher)
    (tmp_path / "hard.pt").hardlink_to(tiny_teacher)
    shutil.copy(tiny_teacher, tmp_path / "copy.pt")
    for other in ("link.pt", "hard.pt"):  # another name of the same file
        weights = [str(tiny_teacher), str(tmp_path / other)]
        line = one_error_line(runner.invoke(app, ["compare", "--weights", *weights, "--data", "x.yaml"]))
        assert f"names one file twice ('{tiny_teacher}', '{tmp_path / other}')" in line
    assert checkpoints_problem([str(tiny_teacher), str(tmp_path / "copy.pt")]) is None  # a copy is two files
    runs = ["p1/exp/weights/best.pt", "p2/exp/weights/best.pt"]
    assert model_labels(runs) == runs  # two runs of one name in two projects: the paths
    assert model_labels(["a/weights/best.pt", "b/weights/best.pt"]) == ["a/best", "b/best"]


def test_a_name_too_long_or_blank_is_bad_input_and_leaves_no_new_folders(
    run_kwargs: dict, synthetic_data: Path, tiny_teacher: Path, tmp_path: Path
) -> None:
    long = "x" * 251
    with pytest.raises(DistillError, match="'name' must be at most 250 bytes long .* \\(251 characters\\)"):
        check_inputs("none", **{**run_kwargs, "project": str(tmp_path / "new" / "deeper"), "name": long})
    with pytest.raises(DistillError, match="'name' must be a plain name"):
        check_inputs("none", **{**run_kwargs, "name": " "})
    out = str(tmp_path / "new" / "deeper" / long)
    args = ["compare", "--weights", str(tiny_teacher), "--data", str(synthetic_data), "--out", out]
    assert "must be at most 250 bytes long" in one_error_line(runner.invoke(app, args))
    assert not (tmp_path / "new").exists()
    with pytest.raises(DistillError, match="cannot create the run directory"):  # the filesystem's own refusal
        new_run_dir(tmp_path / "new" / "deeper", "y" * 300)
    assert not (tmp_path / "new").exists(), "the folders made above the refused name are left"


def test_a_path_longer_than_the_system_takes_is_bad_input(tiny_teacher: Path, tmp_path: Path) -> None:
    """The filesystem's ENAMETOOLONG on a path the user gave was an unexpected error, exit 1, with the whole path."""
    long = "x" * 300
    for option in ("--recipe", "--data"):
        args = ["train", "--teacher", str(tiny_teacher), "--student", "yolov8n.yaml", "--data", "d.yaml"]
        result = runner.invoke(app, [*args, option, f"{long}.yaml"])
        assert result.exit_code == 2, result.output
        assert one_error_line(result).startswith("error: a path is longer than this system takes: 'xxx")
        assert "(305 characters)" in result.stderr
    result = runner.invoke(app, ["probe-channels", "--teacher", "yolov8s.yaml", "--student", "yolov8n.yaml",
                                 "--recipe", long])  # fmt: skip
    assert result.exit_code == 2 and "longer than this system takes" in one_error_line(result)


def test_a_path_longer_than_the_system_takes_is_a_distill_error_in_the_python_api(
    tmp_path: Path, synthetic_data: Path
) -> None:
    """Data, a split in it, weights, an image, a run to resume and a folder to write were an OSError (ENAMETOOLONG)
    from the API; the CLI already made it exit 2. Each message names the path given (its length says which)."""
    from distill_cli import evaluate, load_recipe, make_synthetic_dataset, probe_channels, train
    from distill_cli.data import load_data
    from distill_cli.options import image_file_problem

    long = tmp_path / ("x" * 300)
    split_too_long = tmp_path / "split.yaml"
    split_too_long.write_text(yaml.safe_dump({**yaml.safe_load(synthetic_data.read_text()), "train": [str(long)]}))
    calls = {
        "data": (lambda: load_data(f"{long}.yaml"), f"{long}.yaml"),
        "a split in the data yaml": (lambda: load_data(split_too_long, "val"), long),
        "weights": (lambda: evaluate(weights=f"{long}.pt", data=str(synthetic_data)), f"{long}.pt"),
        "teacher": (lambda: probe_channels(teacher=f"{long}.pt", student="yolov8n.yaml"), f"{long}.pt"),
        "image": (lambda: image_file_problem(f"{long}.jpg"), f"{long}.jpg"),
        "a run to resume": (lambda: train(resume=long), long),
        "a dataset folder": (lambda: make_synthetic_dataset(long / "d", 2, 1, 64), long / "d"),
    }
    for what, (call, given) in calls.items():
        named = rf"^a path is longer than this system takes: .*\({len(str(given))} characters\)$"
        with pytest.raises(DistillError, match=named):
            call()
            pytest.fail(what)
    assert sorted(tmp_path.iterdir()) == [split_too_long]
    with pytest.raises(DistillError, match="^unknown recipe"):  # fits as a name, not with .yaml: none of ours
        load_recipe("y" * 252)


def test_a_symlink_loop_or_a_nul_byte_given_as_a_path_is_not_found(tmp_path: Path) -> None:
    """pathlib reads these as nothing there; the stat that tells a too-long name apart must too, not raise."""
    from distill_cli.data import load_data
    from distill_cli.models import load_model
    from distill_cli.options import image_file_problem

    for name in ("loop.yaml", "loop.pt", "loop.jpg"):
        (tmp_path / name).symlink_to(tmp_path / name)
    for given in (tmp_path / "loop.yaml", "a\0b.yaml"):
        with pytest.raises(DistillError, match="not found"):
            load_data(given)
    with pytest.raises(DistillError, match="not found"):
        load_model(str(tmp_path / "loop.pt"), "teacher")
    assert (
        image_file_problem(str(tmp_path / "loop.jpg"))
        == image_file_problem("a\0b.jpg")
        == "must be an image file that exists"
    )


def test_the_synthetic_data_maker_never_overwrites_and_checks_its_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.yaml").write_text("mine")
    with pytest.raises(DistillError, match="is not an empty folder; give a new or empty one"):
        make_synthetic_dataset(tmp_path / "mine", 2, 1, 64)
    assert (tmp_path / "mine" / "data.yaml").read_text() == "mine"
    for bad, message in ({"size": 8}, "'size' must be in \\[32"), ({"n_train": "3"}, "'n_train' must be a number"):
        with pytest.raises(DistillError, match=message):
            make_synthetic_dataset(tmp_path / "new" / "data", **{"n_train": 2, "n_val": 1, "size": 64, **bad})
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert make_synthetic_dataset(tmp_path / "empty", 2, 1, 64) == tmp_path / "empty" / "data.yaml"
    draw, calls = data._draw_image, []

    def full_after_one(*args: object) -> object:
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return draw(*args)

    monkeypatch.setattr(data, "_draw_image", full_after_one)
    (tmp_path / "empty2").mkdir()
    for root in (tmp_path / "new2" / "data", tmp_path / "empty2"):
        calls.clear()
        with pytest.raises(OSError, match="No space left"):
            make_synthetic_dataset(root, 2, 1, 64)
    assert not (tmp_path / "new2").exists() and not any((tmp_path / "empty2").iterdir())


def test_api_arguments_outside_the_schema_are_checked_before_any_work(tmp_path: Path) -> None:
    for bad in (5, "", " "):
        with pytest.raises(DistillError, match="--resume: give a run dir or its weights/last.pt, got"):
            train(resume=bad)  # 5 was a TypeError; "" was taken as "."
    with pytest.raises(DistillError, match="'callback' must be a function \\(event, info\\) or None, got 'x'"):
        train(callback="x")
    with pytest.raises(DistillError, match="'log' must be a function \\(message\\) or None"):
        run_demo(out=str(tmp_path / "demo"), log="print")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "message"),
    [
        ("evaluate", (["a.pt"], "d.yaml"), {"conf": 0.5}, "evaluate(): unknown argument 'conf'; known: weights, data"),
        ("compare", (["a.pt"], "d.yaml"), {"outdir": "x"}, "compare(): unknown argument 'outdir'; did you mean 'out'?"),
        ("export", ("a.pt",), {"half": True}, "export(): unknown argument 'half'; known: weights, format"),
        ("run_demo", (), {"epoch": 1}, "run_demo(): unknown argument 'epoch'; did you mean 'epochs'?"),
        ("probe_channels", ("t.pt", "s.pt"), {"img_size": 64}, "did you mean 'imgsz'?"),
        ("load_recipe", ("none", "cwd"), {}, "load_recipe(): too many positional arguments"),
        ("make_synthetic_dataset", ("x",), {"ntrain": 1}, "did you mean 'n_train'?"),
        ("evaluate", (), {}, "evaluate(): missing a required argument: 'weights'"),
        ("evaluate", (["a.pt"], "d.yaml"), {"details": "no"}, "'details' must be true or false, got 'no'"),
        ("train", ({}, 1), {}, "train(): too many positional arguments"),
    ],
)
def test_api_arguments_the_function_does_not_take_are_a_distill_error(
    name: str, args: tuple, kwargs: dict, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's TypeError for an unknown keyword or a wrong count of arguments was raised by every API function
    but train, whose unknown settings were already told in one line with a suggestion."""
    import distill_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DistillError, match=re.escape(message)):
        getattr(distill_cli, name)(*args, **kwargs)
    assert not any(tmp_path.iterdir())


def test_api_callbacks_of_the_wrong_shape_are_refused_before_any_work(run_kwargs: dict, tmp_path: Path) -> None:
    """A callback taking other arguments than it is called with failed with a TypeError once the models were loaded
    (train) or the data drawn (run_demo)."""
    called = "must be a function \\(event, info\\): it is called with 2 arguments"
    for wrong in (lambda event: None, lambda: None, lambda event, info, extra: None):
        with pytest.raises(DistillError, match=f"'callback' {called}"):
            train(recipe="none", callback=wrong, **run_kwargs)
    with pytest.raises(DistillError, match="'log' must be a function \\(message\\): it is called with 1 argument "):
        run_demo(out=str(tmp_path / "demo"), log=lambda: None)
    assert not (tmp_path / "demo").exists() and not Path(run_kwargs["project"]).exists()
    for fits in (lambda event, info: None, lambda *args: None, lambda event, info, extra=0: None):
        train(recipe="none", callback=fits, **{**run_kwargs, "report": False, "name": "fits"})


def test_eval_says_when_it_rounds_the_image_size(synthetic_data: Path, tiny_teacher: Path) -> None:
    args = ["eval", "--weights", str(tiny_teacher), "--data", str(synthetic_data), "--imgsz", "33", "--json"]
    with pytest.warns(UserWarning, match="imgsz 33 is not a multiple of the stride 32; using 64"):
        assert runner.invoke(app, args).exit_code == 0


def test_a_class_mismatch_note_names_a_few_classes_not_all() -> None:
    notes = " ".join(mismatch_notes([f"class{i}" for i in range(80)], ["a", "b"]))
    assert "class2, class3, class4 and 75 more" in notes and "class79" not in notes


def test_resume_of_an_unsafe_file_does_not_advise_an_option_resume_refuses(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    run = tmp_path / "run" / "weights"
    run.mkdir(parents=True)
    torch.save({"model": Payload(), "resume": {}}, run / "last.pt")
    with pytest.raises(DistillError, match="references code outside") as refused:
        load_resume(run.parent)
    assert "pass --trust-checkpoint" not in refused.value.message and "cannot be resumed" in refused.value.message


def test_a_teacher_the_recipe_does_not_use_is_named(run_kwargs: dict) -> None:
    with pytest.warns(UserWarning, match=r"recipe 'none' neither distils .* teacher \(missing.pt\) is not used"):
        check_inputs("none", **{**run_kwargs, "teacher": "missing.pt"})


def test_a_resumed_run_names_its_paths_as_a_new_run_does(
    run_kwargs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative to the current folder when given so (--json prints the same kind of path before and after)."""
    monkeypatch.chdir(tmp_path)
    kwargs = {**run_kwargs, "epochs": 2, "project": "runs", "name": "cut", "report": False}
    with pytest.raises(DistillError):
        train(recipe="cwd", callback=interrupt_after_epoch(1), **kwargs)
    assert load_resume("runs/cut")[1]["run_dir"] == "runs/cut"
    monkeypatch.chdir(tmp_path / "runs" / "cut")
    for inside in (".", "weights/last.pt"):  # a folder named "." would have no name (the report's title)
        assert load_resume(inside)[1]["run_dir"] == str(tmp_path / "runs" / "cut")
    monkeypatch.chdir(tmp_path / "runs" / "cut" / "weights")
    assert load_resume("last.pt")[1]["run_dir"] == str(tmp_path / "runs" / "cut")  # not the folder it started in
    monkeypatch.chdir(tmp_path)
    resumed = train(resume="runs/cut")
    assert resumed.run_dir == Path("runs/cut") and resumed.best == Path("runs/cut/weights/best.pt")


LAUNCHER = """
import os, signal, sys
from distill_cli import dist
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a terminal, whatever ran the tests (nohup ignores it)
child = "import os, signal, sys, time, pathlib; signal.signal(signal.SIGTERM, lambda *a: sys.exit(1)); " \\
    "signal.signal(signal.SIGINT, lambda *a: sys.exit(1)); pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); " \\
    "time.sleep(60)"
sys.exit(dist.supervised([sys.executable, "-c", child, sys.argv[1]], dict(os.environ)))
"""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_the_multi_gpu_launcher_exits_130_when_stopped(stop: signal.Signals, tmp_path: Path) -> None:
    """A stop sent to the launcher alone (a scheduler's SIGTERM, kill -INT, a closed terminal) reaches torchrun (here a
    stand-in that ends on it, in a session of its own) and the launcher exits 130, not Python's 143, and not before
    torchrun has ended."""
    ready = tmp_path / "ready"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ready)])
    try:
        for _ in range(1200):
            if ready.exists() and ready.read_text() or launcher.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), "the stand-in never started"
        launcher.send_signal(stop)
        assert launcher.wait(timeout=30) == EXIT_INTERRUPTED
    finally:
        launcher.kill()
        if ready.exists() and ready.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(ready.read_text()), signal.SIGKILL)
    assert dist.supervised([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ)) == 3
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert dist.supervised([sys.executable, "-c", killed], dict(os.environ)) == 128 + signal.SIGKILL


def test_a_teacher_that_is_the_student_file_warns(run_kwargs: dict, tiny_teacher: Path, tmp_path: Path) -> None:
    """Self-distillation is allowed, but one path given twice (here through a link) is more often a slip."""
    link = tmp_path / "same.pt"
    link.symlink_to(tiny_teacher)
    with pytest.warns(UserWarning, match="the teacher and the student are the same file .*: the student learns from"):
        check_inputs("default", **{**run_kwargs, "student": str(link)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        check_inputs("default", **run_kwargs)  # a yaml student: no such warning


def test_the_demo_refuses_a_size_its_students_cannot_train_at_before_drawing_data(tmp_path: Path) -> None:
    """imgsz 32 passed the demo's checks, drew the data, and then every run refused it (stride-32 maps of 1x1)."""
    with pytest.raises(DistillError, match=r"'imgsz' must be in \[64, 16384\], got 32"):
        run_demo(out=str(tmp_path / "demo"), imgsz=32)
    assert not (tmp_path / "demo").exists()
