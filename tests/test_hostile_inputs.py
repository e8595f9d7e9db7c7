"""Inputs that a hostile review (session 31) found crashing, hanging or writing where bad input must give one line
and exit 2: YAML with mixed-type keys, nesting past the recursion limit or alias bombs; an empty train split; a
training size too small for BatchNorm; corrupt images in compare's samples; a resume that does not fit the run, would
write over it, or would train a run that another process trains; a stop during the last validation; report figures
that fail; recipe objects of the wrong type in the Python API; exports that cannot run or would replace a link."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill_cli import plots, probe_channels
from distill_cli.cli import app
from distill_cli.comparison import box_row, sample_images
from distill_cli.config import LossSpec, Recipe, RunConfig, load_recipe, recipe_from_dict
from distill_cli.data import load_data
from distill_cli.errors import EXIT_INTERRUPTED, DistillError
from distill_cli.overrides import parse_overrides
from distill_cli.rules import shown
from distill_cli.runlock import RUNNING, claim, release
from distill_cli.training import check_inputs, train

from .conftest import train_args
from .test_inputs import data_yaml, one_error_line
from .test_resume import interrupt_after_epoch, interrupted_run

runner = CliRunner()


@pytest.mark.parametrize(
    "data",
    [
        {"losses": {}, 1: "a", "foo": "b"},
        {"losses": {}, "balance": {1: 2, "x": 3}},
        {"losses": {"cls_kd": {5: 1, "x": 2}}},
    ],
)
def test_keys_of_mixed_types_are_unknown_keys(data: dict) -> None:
    with pytest.raises(DistillError, match="unknown key|has no parameter"):
        recipe_from_dict(data)


def test_yaml_nested_past_the_recursion_limit_is_not_valid_yaml(tmp_path: Path) -> None:
    deep = "[" * 5000 + "]" * 5000
    (tmp_path / "deep.yaml").write_text(f"losses: {{}}\ndescription: {deep}\n")
    with pytest.raises(DistillError, match="not valid YAML: nested deeper than"):
        load_recipe(str(tmp_path / "deep.yaml"))
    with pytest.raises(DistillError, match="--set epochs: the value is not valid YAML"):
        parse_overrides([f"epochs={deep}"])


def test_a_value_is_shown_without_expanding_it() -> None:
    """An alias bomb (each level ten references to the one below) would have its whole repr built: bounded now."""
    calls = []

    class Leaf:
        def __repr__(self) -> str:
            calls.append(1)
            return "leaf"

    bomb: object = Leaf()
    for _ in range(4):
        bomb = [bomb] * 10
    assert shown(bomb) == "a list"
    assert not calls  # no leaf was reached: 10 000 of them cannot fit a line
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert shown(nested) == "a list"  # the full repr raised RecursionError


def test_an_alias_bomb_in_a_recipe_is_one_line(tmp_path: Path) -> None:
    """Each level ten aliases of the one below, as the recipe's description (a million leaves)."""
    levels = ["&l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 6)]
    (tmp_path / "bomb.yaml").write_text(f"losses: {{}}\ndescription: [{', '.join(levels)}]\n")
    with pytest.raises(DistillError, match=r"'description' .*got a list$") as caught:
        load_recipe(str(tmp_path / "bomb.yaml"))
    assert len(str(caught.value)) < 300


def test_a_split_is_a_key_that_names_images(synthetic_data: Path, tmp_path: Path) -> None:
    """--split path would read the dataset root (every split together) as one split; names is no split either."""
    assert load_data(synthetic_data, "val")["val"]
    for key in ("path", "names", "nc"):
        with pytest.raises(DistillError, match=rf"has no '{key}' split; it has: train, val"):
            load_data(synthetic_data, key)
    renumbered = tmp_path / "renumbered.yaml"
    renumbered.write_text(synthetic_data.read_text().replace("  2: triangle", "  -1: triangle"))
    with pytest.raises(DistillError, match="'names' ids must be 0 to 2, got -1, 0, 1"):
        load_data(renumbered)


def test_an_empty_train_split_is_bad_input(synthetic_data: Path, tmp_path: Path) -> None:
    yaml = tmp_path / "empty.yaml"
    yaml.write_text(
        f"path: {synthetic_data.parent}\ntrain:\nval: images/val\nnames: ['circle', 'square', 'triangle']\n"
    )
    with pytest.raises(DistillError, match="'train' is empty; an ultralytics data yaml needs train, val, names"):
        load_data(yaml)


def test_training_at_the_students_stride_is_refused_before_any_work(run_kwargs: dict) -> None:
    """At 32 px a batch of one image leaves BatchNorm one value per channel in the stride-32 maps."""
    line = one_error_line(runner.invoke(app, train_args(run_kwargs, imgsz=32)))
    assert "--imgsz 32: the student's coarsest maps (stride 32) would be 1x1" in line and "use 64 or more" in line
    assert not Path(run_kwargs["project"]).exists()


def test_compare_samples_skip_unreadable_images_and_non_finite_labels(synthetic_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_data.parent, root)
    (root / "images" / "val" / "!corrupt.png").write_bytes(b"not an image" * 20)  # sorts first
    picked = sample_images(str(root / "images" / "val"), 2)
    assert [p.name for p in picked] == ["0000.png", "0001.png"]
    assert box_row("0 nan 0.5 0.1 0.1") is None and box_row("0 0.5 0.5 inf 0.1") is None
    assert box_row("0 1e20 0.5 0.1 0.1") is None and box_row("-1 0.5 0.5 0.1 0.1") is None  # the validator's range
    assert box_row("1 0.5 0.5 0.1 0.1") == (1.0, 0.5, 0.5, 0.1, 0.1)


def test_compare_samples_read_an_image_list_and_box_polygon_labels(synthetic_data: Path, tmp_path: Path) -> None:
    """A split given as a .txt list of images had no sample grid, and a polygon label line no ground-truth box,
    though ultralytics' validator reads both."""
    listing = tmp_path / "val.txt"
    images = sorted((synthetic_data.parent / "images" / "val").iterdir())
    listing.write_text("\n".join(str(p) for p in images[::-1][:2]) + "\n")
    assert sample_images(str(listing), 5) == sorted(images[::-1][:2])
    assert box_row("2 0.1 0.2 0.5 0.2 0.3 0.6") == pytest.approx((2.0, 0.3, 0.4, 0.4, 0.4))
    assert box_row("2 0.1 0.2 1.5 0.2 0.3 0.6") is None  # a point outside the image, as the validator skips it
    assert box_row("2 0.1 0.2 nan 0.2 0.3 0.6") is None and box_row("2 0.1 0.2 0.5 0.2 0.3 nan") is None


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (
            [],
            "balance.steps 2: the run's terms are on in 2 of its 2 steps, so its automatic balance would never apply"
            "; give balance.steps below 2",
        ),
        (
            ["--set", "losses.cwd.schedule.warmup_epochs=1"],
            "on in 1 of its 2 steps, so its automatic balance would never apply; set balance.target=0, or train longer",
        ),  # a term warming up is off at step 0
        (
            ["--set", "losses.cwd.weight=0"],
            "on in 0 of its 2 steps, so its automatic balance would never apply; set "
            "balance.target=0: no term has a weight",
        ),
    ],
)
def test_a_balance_that_no_step_of_the_run_would_reach_is_refused(run_kwargs: dict, options: list, said: str) -> None:
    """It was saved in config.yaml and never applied: 8 images, batch 4, 1 epoch are 2 steps."""
    args = [*train_args(run_kwargs, recipe="cwd"), "--set", "balance.target=1", "--set", "balance.steps=2", *options]
    assert said in one_error_line(runner.invoke(app, args))
    assert not Path(run_kwargs["project"]).exists()


def test_resume_after_the_classes_changed_is_one_line(run_kwargs: dict, synthetic_data: Path, tmp_path: Path) -> None:
    run = interrupted_run(run_kwargs, "cut", "none")
    data = tmp_path / "data.yaml"  # the run's data yaml, given one class more after the interruption
    data.write_text(Path(run_kwargs["data"]).read_text())
    ckpt = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)
    ckpt["distill"]["config"]["data"] = str(data)
    torch.save(ckpt, run / "weights" / "last.pt")
    more = data_yaml(tmp_path, synthetic_data, ["circle", "square", "triangle", "star"])
    data.write_text(more.read_text())
    config = (run / "config.yaml").read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = one_error_line(runner.invoke(app, ["train", "--resume", str(run)]))
    assert "the run trained for 3 classes and its data yaml now names 4 (class 3: none then, 'star' now)" in line
    assert not [w for w in caught if "resume" in str(w.message)]  # no "last.pt is kept; resume" beside it
    assert (run / "config.yaml").read_bytes() == config
    data.write_text(Path(run_kwargs["data"]).read_text())  # the classes back; a layer of another shape instead
    student = ckpt["resume"]["student"]
    student["model.0.conv.weight"] = student["model.0.conv.weight"][:1]
    torch.save(ckpt, run / "weights" / "last.pt")
    line = one_error_line(runner.invoke(app, ["train", "--resume", str(run)]))
    assert "its saved state does not fit the run as built now" in line and "size mismatch" in line


def test_resume_of_a_copy_of_last_pt_does_not_write_over_its_run(run_kwargs: dict, tmp_path: Path) -> None:
    run = interrupted_run(run_kwargs, "cut", "none")
    copy = tmp_path / "backup.pt"
    shutil.copy(run / "weights" / "last.pt", copy)
    before = {p.name: p.read_bytes() for p in (run / "weights").iterdir()}
    with pytest.raises(DistillError, match="holds its own last.pt; resume"):
        train(resume=copy)
    assert {p.name: p.read_bytes() for p in (run / "weights").iterdir()} == before
    ckpt = torch.load(copy, map_location="cpu", weights_only=False)
    for epoch in (50, -5):  # a hand-edited epoch outside the run
        ckpt["resume"]["epoch"] = epoch
        torch.save(ckpt, run / "weights" / "last.pt")
        with pytest.raises(DistillError, match="its resume state is incomplete"):
            train(resume=run)
    ckpt["resume"]["epoch"] = 0
    del ckpt["resume"]["grads"]
    torch.save(ckpt, run / "weights" / "last.pt")
    with pytest.raises(DistillError, match="its saved state does not fit"):
        train(resume=run)


def test_a_last_pt_edited_into_other_types_is_refused_in_one_line(run_kwargs: dict, tmp_path: Path) -> None:
    """A config that is no mapping, a saved run dir that is no text (a last.pt moved out of weights/), a history that
    is no list, step counters out of range: each one error line, exit 2, the run folder's files as they were."""
    run = interrupted_run(run_kwargs, "cut", "none")
    original = torch.load(run / "weights" / "last.pt", map_location="cpu", weights_only=False)
    moved = tmp_path / "moved.pt"  # out of weights/: the run dir comes from the saved one
    edits = [
        (run / "weights" / "last.pt", ("distill", "config"), "hello", "not a checkpoint of a yolodistill run"),
        (run / "weights" / "last.pt", ("distill", "config"), None, "not a checkpoint of a yolodistill run"),
        (moved, ("resume", "run_dir"), 5, "its resume state is incomplete"),
        (run / "weights" / "last.pt", ("resume", "history"), "x", "its saved state does not fit"),
        # step counters no run writes: they trained on, the warm-up and optimizer steps out of place
        (run / "weights" / "last.pt", ("resume", "step"), -5, "its resume state is damaged (step -5)"),
        (run / "weights" / "last.pt", ("resume", "accumulate"), 0, "damaged (accumulate 0 at step"),
        (run / "weights" / "last.pt", ("resume", "last_opt_step"), "x", "damaged (last_opt_step 'x' is no whole"),
        (run / "weights" / "last.pt", ("resume", "skipped_steps"), True, "damaged (skipped_steps True is no whole"),
        (run / "weights" / "last.pt", ("resume", "bad_steps"), 1, "damaged (bad_steps 1 at step"),  # > skipped_steps
        (run / "weights" / "last.pt", ("resume", "routine_skips"), 1, "damaged (routine_skips 1 at step"),  # the same
        (run / "weights" / "last.pt", ("resume", "steps_taken"), None, "damaged (steps_taken None is no whole"),
        (run / "weights" / "last.pt", ("resume", "steps_taken"), 3, "damaged (steps_taken 3 at step 2)"),  # > step
        # progress no run writes at its saved epoch, found once the loader says how long an epoch is
        (run / "weights" / "last.pt", ("resume", "step"), 3, "progress does not fit the run as built now (step 3 is"),
        (run / "weights" / "last.pt", ("resume", "accumulate"), 10**9, "(accumulate 1000000000 is above the run's 4)"),
        (run / "weights" / "last.pt", ("resume", "ema_updates"), -4, "(ema_updates -4 at step 2)"),
        (run / "weights" / "last.pt", ("resume", "best_fitness"), 5.0, "(best_fitness 5.0 or best_epoch 0 is no"),
        (run / "weights" / "last.pt", ("resume", "balance"), {"cwd": -1.0}, "(balance of 'cwd': -1.0)"),
        (run / "weights" / "last.pt", ("resume", "balance_sums"), {"det_loss": [1.0, 0]}, "balance_sums of 'det_loss'"),
    ]
    for where, (section, key), value, message in edits:
        ckpt = copy.deepcopy(original)
        ckpt[section][key] = value
        torch.save(ckpt, where)
        files = {p.name: p.read_bytes() for p in (run / "weights").iterdir()}
        result = runner.invoke(app, ["train", "--resume", str(where)])
        assert result.exit_code == 2 and message in one_error_line(result), (key, value, result.output)
        assert {p.name: p.read_bytes() for p in (run / "weights").iterdir()} == files
    torch.save(original, run / "weights" / "last.pt")


@pytest.mark.parametrize("layers", ["１５", "1_5", "15,,18", "15;18", "+15"])
def test_layers_are_ascii_indices_or_a_group(layers: str) -> None:
    """int() reads fullwidth digits, underscores and a plus sign; the indices of --layers are plain digits."""
    line = one_error_line(
        runner.invoke(app, ["probe-channels", "--teacher", "t.pt", "--student", "s.pt", "--layers", layers])
    )
    assert f"--layers '{layers}': give a group" in line


def test_a_path_with_a_line_break_is_named_on_the_error_line(tmp_path: Path) -> None:
    zero = tmp_path / "ze\nro.pt"
    zero.write_bytes(b"")
    for args in (["eval", "--weights", "no\nexist.pt", "--data", "no\nexist.yaml"], ["export", "--weights", str(zero)]):
        line = one_error_line(runner.invoke(app, args))
        assert "\\n" in line, line  # the break shown as \n, as Python writes it


def test_a_stop_during_the_last_validation_is_an_interruption(run_kwargs: dict) -> None:
    kwargs = {**run_kwargs, "name": "late"}
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN when pytest was started with ``&``
    with pytest.raises(DistillError, match="interrupted after the last epoch; the weights in .* are complete") as e:
        train(recipe="none", callback=interrupt_after_epoch(1), **kwargs)
    assert e.value.exit_code == EXIT_INTERRUPTED
    run = Path(kwargs["project"]) / "late"
    assert (run / "weights" / "best.pt").is_file() and not (run / "report.md").exists()
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_names_with_dollar_signs_are_drawn_as_text(tmp_path: Path) -> None:
    curves = {"$\\undefinedcmd$": ([0.0, 1.0], [1.0, 0.0]), "$x^$": ([0.0, 1.0], [1.0, 0.5])}
    assert plots.pr_curves(curves, tmp_path / "pr.png").is_file()


def test_a_report_that_fails_to_draw_leaves_no_figures(run_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def stopped(*args: object, **kwargs: object) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "schedules", stopped)
    with pytest.raises(DistillError, match="interrupted after the last epoch; the weights in .* are complete"):
        train(recipe="default", **{**run_kwargs, "name": "drawn"})
    run = Path(run_kwargs["project"]) / "drawn"
    assert (run / "weights" / "best.pt").is_file()
    assert not (run / "report").exists() and not (run / ".report-partial").exists() and not (run / "report.md").exists()


@pytest.mark.parametrize(
    "call",
    [
        lambda: train(RunConfig(recipe="cwd")),  # type: ignore[arg-type]
        lambda: train(RunConfig(recipe="cwd"), **{"losses.cwd.weight": 2}),  # type: ignore[arg-type]
        lambda: train(recipe=Recipe(losses={"cwd": 5})),  # type: ignore[dict-item]
        lambda: probe_channels("yolov8s.yaml", "yolov8n.yaml", 64, recipe=Recipe(losses={"cwd": LossSpec(params=[1])})),
    ],
    ids=["recipe-a-string", "recipe-a-string-with-overrides", "term-a-number", "params-a-list"],
)
def test_recipe_objects_of_the_wrong_type_are_bad_input(call) -> None:
    with pytest.raises(DistillError, match="must be a mapping|a RunConfig's recipe is a Recipe"):
        call()


def test_a_loss_spec_without_a_type_is_its_terms_method() -> None:
    """As in a recipe file, where a term's type defaults to its name (it was the unknown loss '')."""
    recipe = Recipe(losses={"cls_kd": LossSpec(weight=2)})
    chosen = probe_channels("yolov8s.yaml", "yolov8n.yaml", 64, recipe=recipe)
    assert chosen["output_terms"]["cls_kd"] == "applies"


def test_export_refuses_engine_on_a_cpu_and_a_dangling_link(tiny_teacher: Path, tmp_path: Path) -> None:
    line = one_error_line(runner.invoke(app, ["export", "--weights", str(tiny_teacher), "--format", "engine"]))
    assert "exports on a GPU" in line
    link = tmp_path / "link.onnx"
    link.symlink_to(tmp_path / "nowhere.onnx")
    line = one_error_line(runner.invoke(app, ["export", "--weights", str(tiny_teacher), "--output", str(link)]))
    assert "already exists" in line and link.is_symlink()


HOLDER = """
import sys, time
from pathlib import Path
from distill_cli.runlock import claim
mark = claim(Path(sys.argv[1]))
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_run_folder_is_trained_by_one_process_at_a_time(run_kwargs: dict) -> None:
    """Two resumes of one run (or a resume of a run still going on) would write the same files. The lock is the
    kernel's: a process that is killed (out of memory, SIGKILL) leaves its mark but no lock, and the resume goes on."""
    run = interrupted_run(run_kwargs, "cut", "none")
    assert not (run / RUNNING).exists()  # removed when the run stopped
    check_inputs(resume=run)
    assert not (run / RUNNING).exists()  # nor made by the launcher's check
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True) as other:
        assert other.stdout.readline().strip() == "claimed"
        before = {p.name: p.read_bytes() for p in (run / "weights").iterdir()}
        for attempt in (lambda: train(resume=run), lambda: check_inputs(resume=run)):  # the multi-GPU launcher's check
            with pytest.raises(DistillError, match=rf"being trained by process {other.pid} on .*; wait for it or stop"):
                attempt()
        assert {p.name: p.read_bytes() for p in (run / "weights").iterdir()} == before
        other.kill()
    check_inputs(resume=run)  # the launcher's check takes no lock and leaves the mark as it is
    assert (run / RUNNING).read_text() == f"process {other.pid} on {socket.gethostname()}"  # killed: no lock on it
    assert train(resume=run).epochs_done == 2 and not (run / RUNNING).exists()


def test_a_claim_is_released_and_a_killed_runs_mark_taken_over(tmp_path: Path) -> None:
    lock = claim(tmp_path)
    assert lock is not None
    assert os.pread(lock.fd, 200, 0).decode() == f"process {os.getpid()} on {socket.gethostname()}"
    release(lock)
    assert not (tmp_path / RUNNING).exists()
    (tmp_path / RUNNING).write_text("process 1 on elsewhere")  # the mark of a killed run: no lock on it
    release(claim(tmp_path))
    assert not (tmp_path / RUNNING).exists()


def test_a_filesystem_without_locks_trains_unlocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from distill_cli import runlock

    def no_locks(fd: int, how: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "lockf", no_locks)
    with pytest.warns(UserWarning, match="is not locked: its filesystem takes no locks"):
        assert claim(tmp_path) is None
    assert not (tmp_path / RUNNING).exists()


def test_a_resume_that_read_last_pt_before_the_run_saved_again_is_refused(tmp_path: Path) -> None:
    from distill_cli.checkpoint import moved_on

    last = tmp_path / "last.pt"
    last.write_bytes(b"epoch 1")
    read = last.stat()
    assert not moved_on(str(last), read.st_ino, read.st_mtime_ns)
    (tmp_path / "next").write_bytes(b"epoch 2")
    (tmp_path / "next").replace(last)  # as every checkpoint is written
    assert moved_on(str(last), read.st_ino, read.st_mtime_ns)
