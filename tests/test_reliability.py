"""Interruption (exact resume: test_resume.py), non-finite steps, atomic writes, untrusted checkpoints, bad data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DistillError
from distill_cli.models import load_model, save_student
from distill_cli.training import train

from .conftest import train_args
from .test_resume import interrupt_after_epoch


def test_resume_of_a_finished_run_is_refused(run_kwargs: dict) -> None:
    result = train(recipe="cwd", **run_kwargs)
    with pytest.raises(DistillError, match="that run finished"):
        train(resume=result.run_dir)


def test_sigterm_in_a_real_process_leaves_a_resumable_last_pt(run_kwargs: dict, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("yolodistill")
    cmd = [str(exe), *train_args(run_kwargs, epochs=50, batch=2, project=tmp_path / "runs", name="sig")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs" / "sig" / "weights" / "last.pt"
    deadline = time.time() + 120
    while not (tmp_path / "runs" / "sig" / "results.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "yolodistill train --resume" in err and "Traceback" not in err
    assert "resume" in torch.load(last, map_location="cpu", weights_only=False)


RANDOM_ADAPTERS = {"adapters": "random"}  # a fit would call the teacher before the first step


def poison_teacher(monkeypatch: pytest.MonkeyPatch, bad_call: Callable[[int], bool], value: float) -> None:
    """Fill every teacher feature with ``value`` on the teacher calls (1-based) for which ``bad_call`` holds. The
    runs that use it start their adapters at random (``RANDOM_ADAPTERS``), so that every call counted is a step's."""
    from distill_cli import distiller

    original = distiller.Teacher.__call__
    calls = {"n": 0}

    def poisoned(self, images):
        out = original(self, images)
        calls["n"] += 1
        if bad_call(calls["n"]):
            out.feats = {k: torch.full_like(v, value) for k, v in out.feats.items()}
        return out

    monkeypatch.setattr(distiller.Teacher, "__call__", poisoned)


def test_nan_in_a_teacher_feature_skips_steps_then_stops(run_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_teacher(monkeypatch, lambda n: n > 2, float("nan"))  # two good steps, then NaN features for good
    kwargs = {**run_kwargs, **RANDOM_ADAPTERS, "epochs": 3, "batch": 2, "max_bad_steps": 3}
    with pytest.warns(UserWarning, match="non-finite cwd_raw"), pytest.raises(DistillError) as stopped:
        train(recipe="cwd", **kwargs)
    assert stopped.value.exit_code == EXIT_RUNTIME and "3 consecutive non-finite steps" in stopped.value.message
    last = Path(kwargs["project"]) / "exp" / "weights" / "last.pt"
    model = torch.load(last, map_location="cpu", weights_only=False)["model"]
    assert all(torch.isfinite(p).all() for p in model.parameters()), "the kept checkpoint holds NaN weights"


def test_a_short_run_whose_every_step_is_skipped_stops(run_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four steps, all with a NaN loss, never reach max_bad_steps (20): the run ended as a success, its best.pt the
    weights it started from. (A skipped step in a run that has taken one is counted as before.)"""
    poison_teacher(monkeypatch, lambda n: True, float("nan"))
    with pytest.warns(UserWarning, match="step skipped"), pytest.raises(DistillError) as stopped:
        train(recipe="cwd", **{**run_kwargs, **RANDOM_ADAPTERS, "batch": 2})
    assert stopped.value.exit_code == EXIT_RUNTIME
    message = "no step of the run was taken: it skipped steps for non-finite losses or gradients; stopped. The last"
    assert message in str(stopped.value)
    assert not (Path(run_kwargs["project"]) / "exp" / "weights" / "best.pt").exists()


def test_a_step_that_leaves_non_finite_weights_stops_the_run(run_kwargs: dict) -> None:
    """A step far too large (lr0 1e30) makes the weights non-finite, and the later steps' NaN losses are skipped:
    a short run ended as a success and saved a best.pt of NaN weights."""
    kwargs = {**run_kwargs, "batch": 2, "nbs": 2, "lr0": 1e30, "optimizer": "SGD", "warmup_epochs": 0, "amp": False}
    with warnings.catch_warnings(), pytest.raises(DistillError) as stopped:
        warnings.simplefilter("ignore")  # the steps skipped after the bad one
        train(recipe="none", **kwargs)
    assert stopped.value.exit_code == EXIT_RUNTIME and "epoch 1 left non-finite weights" in str(stopped.value)
    weights = Path(run_kwargs["project"]) / "exp" / "weights"
    assert not (weights / "best.pt").exists()
    model = torch.load(weights / "last.pt", map_location="cpu", weights_only=False)["model"]  # the start's
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_of_an_unfinished_runs_best_pt_points_to_last_pt(run_kwargs: dict) -> None:
    """It said 'that run finished' of a run that had not."""
    with pytest.raises(DistillError):
        train(recipe="none", callback=interrupt_after_epoch(1), **{**run_kwargs, "epochs": 3, "report": False})
    best = Path(run_kwargs["project"]) / "exp" / "weights" / "best.pt"
    with pytest.raises(DistillError, match="no resume state in best.pt; only a run's weights/last.pt holds it"):
        train(resume=best)


def test_a_single_bad_step_is_skipped_and_counted(run_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    poison_teacher(monkeypatch, lambda n: n == 2, float("inf"))
    with pytest.warns(UserWarning, match="step skipped"):
        result = train(recipe="cwd", **{**run_kwargs, **RANDOM_ADAPTERS, "batch": 2})
    assert result.skipped_steps == 1 and result.history[-1]["skipped_steps"] == 1


def test_steps_with_non_finite_gradients_count_towards_the_stop(run_kwargs: dict, monkeypatch) -> None:
    """Finite losses but NaN gradients on every step (fp32: no grad scaler to skip them): the run stops after
    max_bad_steps instead of skipping every step to the end (a finite loss in between used to reset the count)."""
    from distill_cli import engine

    def nan_norm(params, max_norm):
        return torch.tensor(float("nan"))

    monkeypatch.setattr(engine.nn.utils, "clip_grad_norm_", nan_norm)
    kwargs = {**run_kwargs, "epochs": 3, "batch": 2, "max_bad_steps": 3, "nbs": 2, "amp": False}
    with pytest.warns(UserWarning, match="non-finite gradients"), pytest.raises(DistillError) as stopped:
        train(recipe="none", **kwargs)
    assert stopped.value.exit_code == EXIT_RUNTIME and "3 consecutive non-finite steps" in stopped.value.message


def test_a_short_run_whose_every_gradient_is_non_finite_stops(run_kwargs: dict, monkeypatch) -> None:
    """Finite losses but NaN gradients on each of a short fp32 run's steps, fewer than max_bad_steps: no weight moved,
    and the run ended as a success (exit 0) with the weights it started from."""
    from distill_cli import engine

    monkeypatch.setattr(engine.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("nan")))
    with pytest.warns(UserWarning, match="non-finite gradients"), pytest.raises(DistillError) as stopped:
        train(recipe="none", **{**run_kwargs, "batch": 2, "amp": False})
    assert stopped.value.exit_code == EXIT_RUNTIME and "no step of the run was taken" in stopped.value.message
    assert not (Path(run_kwargs["project"]) / "exp" / "weights" / "best.pt").exists()


def test_an_fp16_run_whose_every_step_the_grad_scaler_skipped_says_so(
    run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN gradients on each step of a short fp16 run, fewer than max_bad_steps: the scaler's back-offs are routine,
    so the run ends as a success, but it moved no weight; that ended without a word (exit 0, the weights as given)."""
    unscale = torch.amp.GradScaler.unscale_

    def nan_gradients(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.fill_(float("nan"))
        unscale(scaler, optimizer)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", nan_gradients)
    with pytest.warns(
        UserWarning, match=r"no step of the run was taken: the fp16 grad scaler backed off each time \(1x\)"
    ):
        result = train(recipe="none", **{**run_kwargs, "batch": 2, "amp_dtype": "fp16"})
    assert (Path(result.run_dir) / "weights" / "best.pt").exists()


def test_an_fp16_run_whose_only_optimizer_step_is_lost_to_a_nan_loss_stops(
    run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches, one optimizer step (accumulation 2), the second batch's loss NaN: the optimizer is never called.
    fp16 was let through as a 'routine grad-scaler back-off' although the scaler never backed off."""
    poison_teacher(monkeypatch, lambda n: n == 2, float("nan"))
    kwargs = {**run_kwargs, **RANDOM_ADAPTERS, "nbs": 8, "warmup_epochs": 0, "amp_dtype": "fp16"}
    with pytest.warns(UserWarning, match="step skipped"), pytest.raises(DistillError) as stopped:
        train(recipe="cwd", **kwargs)
    assert stopped.value.exit_code == EXIT_RUNTIME and "no step of the run was taken" in stopped.value.message


def test_a_resumed_run_that_stepped_before_its_cut_is_not_stopped_for_want_of_a_step(
    run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accumulation 4 over 2 batches an epoch: the last epoch holds no optimizer call, and its first loss is NaN. The
    run stepped at step 3; resumed before the last epoch, it was stopped as one that never took a step (the count of
    steps taken was not saved)."""
    kwargs = {**run_kwargs, **RANDOM_ADAPTERS, "epochs": 3, "nbs": 16, "warmup_epochs": 0, "amp": False}
    with pytest.raises(DistillError):
        train(recipe="cwd", report=False, callback=interrupt_after_epoch(2), **kwargs)
    poison_teacher(monkeypatch, lambda n: n == 1, float("nan"))
    with pytest.warns(UserWarning, match="step skipped"):
        result = train(resume=Path(kwargs["project"]) / "exp")
    assert result.skipped_steps == 1 and result.epochs_done == 3


def test_steps_skipped_in_a_row_before_an_interruption_count_after_the_resume(
    run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop after max_bad_steps skipped steps in a row counts across a resume: a run saved after 2 of its 3 stops
    at the first bad step after it (the count restarted at 0 before, so a resume bought max_bad_steps more)."""
    from distill_cli import engine

    kwargs = {**run_kwargs, "epochs": 3, "batch": 2, "max_bad_steps": 3, "nbs": 2, "amp": False, "report": False}
    with pytest.raises(DistillError):
        train(recipe="none", callback=interrupt_after_epoch(1), **kwargs)
    last = Path(kwargs["project"]) / "exp" / "weights" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["resume"]["skipped_steps"] = ckpt["resume"]["bad_steps"] = 2  # as a run whose last two steps were skipped
    ckpt["resume"]["steps_taken"] -= 2
    torch.save(ckpt, last)
    monkeypatch.setattr(engine.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("nan")))
    with pytest.warns(UserWarning, match="non-finite gradients") as caught, pytest.raises(DistillError) as stopped:
        train(resume=last)
    assert "3 consecutive non-finite steps" in stopped.value.message
    assert [str(w.message) for w in caught if "step skipped" in str(w.message)] == [
        f"step {ckpt['resume']['step']}: non-finite gradients; step skipped (3 so far)"
    ]


def test_a_step_skipped_for_another_rank_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """With DDP every rank skips a step that is bad on any rank; a rank whose own terms are finite must not name its
    loss as the bad value."""
    from distill_cli import engine

    weight = torch.nn.Parameter(torch.ones(1))
    state = SimpleNamespace(
        device=torch.device("cpu"),
        optimizer=torch.optim.SGD([weight], lr=0.1),
        cfg=SimpleNamespace(max_bad_steps=4),
        step=7,
        bad_steps=0,
        skipped_steps=0,
        routine_skips=0,
    )
    monkeypatch.setattr(engine.dist, "all_agree", lambda flag, device: False)  # another rank saw NaN
    finite = {"det_loss": torch.tensor(1.0), "cls_kd": torch.tensor(0.5)}
    with pytest.warns(UserWarning, match="step 7: non-finite loss on another rank; step skipped"):
        assert not engine.step_is_finite(state, torch.tensor(1.5), finite)
    with pytest.warns(UserWarning, match="step 7: non-finite cls_kd; step skipped"):
        engine.step_is_finite(state, torch.tensor(float("nan")), {**finite, "cls_kd": torch.tensor(float("nan"))})
    with pytest.warns(UserWarning, match="step 7: non-finite loss; step skipped"):  # finite terms, overflowing sum
        engine.step_is_finite(state, torch.tensor(float("inf")), finite)
    assert state.skipped_steps == 3 and state.bad_steps == 3


def test_crafted_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "train_args": {}}, evil)
    with pytest.raises(DistillError, match="--trust-checkpoint"):
        load_model(evil, "teacher")
    assert not marker.exists()


def test_a_checkpoint_with_damaged_bytes_is_called_damaged_not_unsafe(tmp_path: Path) -> None:
    """Its zip is whole but its pickle is not: no advice to unpickle it in full (--trust-checkpoint)."""
    whole, damaged = tmp_path / "whole.pt", tmp_path / "damaged.pt"
    torch.save({"model": None, "x": torch.zeros(3)}, whole)
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(damaged, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data[:2] + b"|" * 8 + data[10:] if name.endswith("data.pkl") else data)
    with pytest.raises(DistillError, match=r"'.*damaged.pt' is not a loadable checkpoint \(damaged: ") as e:
        load_model(damaged, "weights")
    assert "--trust-checkpoint" not in str(e.value)


def test_a_checkpoint_whose_bytes_fail_their_checksum_is_refused_as_damaged(tmp_path: Path, tiny_teacher: Path) -> None:
    """torch reads a tensor's bytes without checking them: a bad copy loaded, and trained or scored, as if whole."""
    data = bytearray(tiny_teacher.read_bytes())
    with zipfile.ZipFile(tiny_teacher) as archive:
        tensor = archive.read(max(archive.infolist(), key=lambda info: info.file_size))
    at = bytes(data).find(tensor) + len(tensor) // 2
    data[at : at + 64] = bytes(byte ^ 0xFF for byte in data[at : at + 64])
    damaged = tmp_path / "flipped.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(DistillError, match=r"'.*flipped.pt' is damaged: its part '.*' does not match its checksum"):
        load_model(damaged, "weights")


def test_a_checkpoint_written_without_checksums_loads(tmp_path: Path, tiny_teacher: Path) -> None:
    """torch.serialization.set_crc32_options(False) stores 0 for every part: nothing to check, not damage."""
    path = tmp_path / "unchecked.pt"
    torch.serialization.set_crc32_options(False)
    try:
        save_student(path, load_model(tiny_teacher, "teacher"), {}, {"n": 1})
    finally:
        torch.serialization.set_crc32_options(True)
    assert not any(info.CRC for info in zipfile.ZipFile(path).infolist())
    assert load_model(path, "weights").model[-1].nc == 3


def test_real_and_own_checkpoints_load_without_trust(tiny_teacher: Path) -> None:
    from .conftest import BCCD_STUDENT, BCCD_TEACHER

    paths = [tiny_teacher] + [p for p in (BCCD_TEACHER, BCCD_STUDENT) if p.is_file()]
    for path in paths:
        assert load_model(path, "teacher").model[-1].nc >= 1


def test_a_failed_save_keeps_the_previous_checkpoint(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(tiny_teacher, "teacher")
    target = tmp_path / "last.pt"
    save_student(target, model, {}, {"n": 1})
    before = target.read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(DistillError, match="No space left on device.*previous file is intact"):
        save_student(target, model, {}, {"n": 2})
    assert target.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


SAVER = """
import sys, torch
from distill_cli.models import save_student, load_model
model = load_model(sys.argv[1], "m")
n = 0
while True:
    n += 1
    save_student(sys.argv[2], model, {}, {"n": n})
    print(n, flush=True)
"""


def test_killing_a_process_while_it_saves_never_leaves_a_broken_file(tmp_path: Path, tiny_teacher: Path) -> None:
    target = tmp_path / "ckpt.pt"
    for delay in (0.9, 1.3, 1.7):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(tiny_teacher), str(target)], stdout=subprocess.PIPE, text=True
        )
        proc.stdout.readline()  # at least one complete save
        time.sleep(delay)
        proc.kill()
        proc.wait()
        assert load_model(target, "checkpoint").model[-1].nc == 3


def test_unwritable_output_dir(run_kwargs: dict, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DistillError, match="cannot create the run directory"):
        train(recipe="cwd", **{**run_kwargs, "project": str(blocker / "runs")})


def test_data_problems_are_one_clear_error(run_kwargs: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(DistillError, match="is not valid YAML"):
        train(recipe="cwd", **{**run_kwargs, "data": str(bad)})
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (tmp_path / "e.yaml").write_text(f"path: {empty}\ntrain: images\nval: images\nnames: [a]\n")
    with pytest.raises(DistillError, match="missing or empty"):
        train(recipe="cwd", **{**run_kwargs, "data": str(tmp_path / "e.yaml")})
    (tmp_path / "n.yaml").write_text(f"path: {empty}\ntrain: images\nval: images\nnc: 2\nnames: [a]\n")
    with pytest.raises(DistillError, match="nc=2 but 1 names"):
        train(recipe="cwd", **{**run_kwargs, "data": str(tmp_path / "n.yaml")})


def test_corrupt_labels_and_images_are_skipped_and_counted(run_kwargs: dict, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(Path(run_kwargs["data"]).parent, root)
    (root / "data.yaml").write_text(
        (root / "data.yaml").read_text().replace(str(Path(run_kwargs["data"]).parent), str(root))
    )
    for cache in root.glob("labels/*.cache"):
        cache.unlink()
    (root / "labels" / "train" / "0000.txt").write_text("7 0.5 0.5 0.2 0.2\n")  # class 7 of 3
    (root / "labels" / "train" / "0001.txt").write_text("0 1.7 0.5 0.2 0.2\n")  # x outside the image
    (root / "images" / "train" / "0002.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="3 of 8 train images skipped"):
        result = train(recipe="cwd", **{**run_kwargs, "data": str(root / "data.yaml")})
    assert result.best.is_file()


def test_imgsz_not_a_multiple_of_the_stride_is_rounded_up(run_kwargs: dict) -> None:
    with pytest.warns(UserWarning, match="imgsz 50 is not a multiple of the stride 32; using 64"):
        result = train(recipe="cwd", **{**run_kwargs, "imgsz": 50})
    assert torch.load(result.best, weights_only=False)["train_args"]["imgsz"] == 64


def test_a_non_finite_step_at_the_calibration_step_delays_the_balance(
    run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The balance averages the first N finite steps; a skipped step does not cancel the calibration for good."""
    poison_teacher(monkeypatch, lambda n: n == 2, float("nan"))
    balance = {"balance.target": 1.0, "balance.steps": 2}
    with pytest.warns(UserWarning, match="non-finite"):
        result = train(
            recipe="cwd", **{**run_kwargs, **RANDOM_ADAPTERS, "epochs": 2, "batch": 2, "report": False, **balance}
        )
    assert result.skipped_steps == 1
    assert result.history[-1]["balance/cwd"] > 0
