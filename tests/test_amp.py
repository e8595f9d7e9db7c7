"""The mixed-precision paths, run for real on the CPU: fp16 autocast with a grad scaler (the GPU path), bf16 without
one (the CPU path), an overflow the scaler skips, resume with the scaler's state, the fused low-precision teacher,
and the detection loss kept in fp32."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from distill_cli.config import RunConfig
from distill_cli.data import hyperparameters
from distill_cli.distiller import Distiller, Teacher, detection_loss, head_branches, inference_copy
from distill_cli.engine import train_one_epoch
from distill_cli.errors import DistillError
from distill_cli.precision import amp_dtypes
from distill_cli.training import train

ONE_STEP = {"optimizer": "SGD", "lr0": 0.01, "warmup_epochs": 0.0, "nbs": 4, "report": False, "seed": 1}


class Captured(Exception):
    """Raised by the start callback: the run's state is built, no step has run."""


def built_state(run_kwargs: dict, recipe: str = "cwd+logits", **options: object):
    box = {}

    def callback(event: str, info: dict) -> None:
        if event == "start":
            box["state"] = info["state"]
            raise Captured

    with pytest.raises(Captured):
        train(recipe=recipe, callback=callback, **{**run_kwargs, **ONE_STEP, **options})
    return box["state"]


def synthetic_batch(seed: int = 0, images: int = 4, size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(seed)
    boxes = 3 * images
    return {
        "img": torch.randint(0, 255, (images, 3, size, size), generator=generator, dtype=torch.uint8),
        "cls": torch.randint(0, 3, (boxes, 1), generator=generator).float(),
        "bboxes": torch.rand(boxes, 4, generator=generator) * 0.4 + torch.tensor([0.3, 0.3, 0.1, 0.1]),
        "batch_idx": torch.arange(images).repeat_interleave(3).float(),
    }


def student_weights(state) -> dict[str, torch.Tensor]:
    """The student's parameters (BN running statistics move without any optimizer step)."""
    return {k: v.detach().clone().float() for k, v in state.distiller.student.named_parameters()}


def test_precision_choice_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from distill_cli import precision

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")  # only the device type is read: no GPU needed
    assert amp_dtypes(RunConfig(), gpu) == (torch.float16, torch.float16)  # as ultralytics: fp16 + scaler
    assert amp_dtypes(RunConfig(amp_dtype="bf16"), gpu) == (torch.bfloat16, torch.bfloat16)
    assert amp_dtypes(RunConfig(amp=False), gpu) == (None, torch.float32)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert amp_dtypes(RunConfig(), cpu) == (torch.bfloat16, torch.bfloat16)
    assert amp_dtypes(RunConfig(amp=False), cpu) == (None, torch.float32)  # --no-amp means fp32 everywhere
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert amp_dtypes(RunConfig(), cpu) == (None, torch.float32)
    assert amp_dtypes(RunConfig(amp_dtype="fp16"), cpu) == (torch.float16, torch.float16)


def test_fp16_step_with_grad_scaler_moves_the_weights_like_fp32(run_kwargs: dict) -> None:
    """One real SGD step under fp16 autocast + grad scaler equals the fp32 step up to fp16 rounding. Without the
    unscale before clipping, or with the scaled gradient applied, the step would be off by orders of magnitude."""
    half = built_state(run_kwargs, amp_dtype="fp16")
    full = built_state(run_kwargs, amp=False)
    assert half.scaler.is_enabled() and not full.scaler.is_enabled()
    # at the scaler's first scale (2^16) this untrained net's scaled fp16 gradients overflow on some CPUs (AMD EPYC),
    # so that step is skipped and the scale backs off (the overflow test below); 2^12 still needs the unscale
    half.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert half.teacher.runner.model[0].conv.weight.dtype == torch.float16
    start = student_weights(full)
    assert all(torch.equal(start[k], v) for k, v in student_weights(half).items())  # same seed, same start
    for state in (half, full):
        train_one_epoch(state, [synthetic_batch()], epoch=0)
    step_half = torch.cat([(v - start[k]).flatten() for k, v in student_weights(half).items()])
    step_full = torch.cat([(v - start[k]).flatten() for k, v in student_weights(full).items()])
    assert step_full.norm() > 0 and torch.isfinite(step_half).all()
    assert torch.nn.functional.cosine_similarity(step_half, step_full, dim=0) > 0.95
    assert 0.8 < float(step_half.norm() / step_full.norm()) < 1.25


def test_bf16_autocast_trains_without_a_scaler(run_kwargs: dict) -> None:
    state = built_state(run_kwargs, amp_dtype="bf16")
    assert not state.scaler.is_enabled() and state.amp_dtype == torch.bfloat16
    start = student_weights(state)
    means = train_one_epoch(state, [synthetic_batch()], epoch=0)
    after = student_weights(state)
    assert all(torch.isfinite(torch.tensor(v)) for v in means.values())
    assert any(not torch.equal(start[k], after[k]) for k in start)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(run_kwargs: dict) -> None:
    state = built_state(run_kwargs, amp_dtype="fp16")
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # the scaled gradients overflow fp16
    start = student_weights(state)
    train_one_epoch(state, [synthetic_batch()], epoch=0)
    after = student_weights(state)
    assert state.scaler.get_scale() == 2.0**99
    changed = [k for k in start if not torch.equal(start[k], after[k])]
    assert not changed, f"an overflowing step changed {changed[:3]}"


def test_resume_restores_the_grad_scaler(run_kwargs: dict) -> None:
    box: dict = {}

    def interrupt(event: str, info: dict) -> None:
        if event == "start":
            box["state"] = info["state"]
        if event == "epoch" and info["epoch"] == 1:
            box["state"].scaler.update(new_scale=1234.0)  # a scale no fresh scaler starts from
            os.kill(os.getpid(), signal.SIGINT)

    options = {**run_kwargs, "amp_dtype": "fp16", "epochs": 2, "report": False, "name": "cut"}
    with pytest.raises(DistillError):
        train(recipe="cwd", callback=interrupt, **options)
    resumed: dict = {}

    def capture(event: str, info: dict) -> None:
        if event == "start":
            resumed["scale"] = info["state"].scaler.get_scale()

    train(resume=Path(run_kwargs["project"]) / "cut", callback=capture)
    assert resumed["scale"] == 1234.0


@pytest.fixture(scope="module")
def yolo26() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolo26n.yaml", nc=3, verbose=False)


def test_teacher_runs_a_fused_low_precision_copy_and_keeps_both_e2e_branches(yolo26: DetectionModel) -> None:
    original = copy.deepcopy(yolo26.state_dict())
    teacher = Teacher(yolo26, [16], torch.device("cpu"), torch.bfloat16)
    head = teacher.runner.model[-1]
    assert head.cv2 is not None and head.one2one_cv2 is not None  # Detect.fuse would drop one branch
    assert not hasattr(teacher.runner.model[0], "bn") and hasattr(teacher.model.model[0], "bn")
    assert teacher.runner.model[0].conv.weight.dtype == torch.bfloat16
    assert teacher.runner.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(v, original[k]) for k, v in teacher.model.state_dict().items())  # the loaded model as is
    out = teacher(torch.rand(2, 3, 64, 64))
    assert set(out.head) == {"one2many", "one2one"} and out.feats[16].dtype == torch.bfloat16
    assert not any(p.requires_grad for p in teacher.runner.parameters())


def test_inference_copy_matches_the_unfused_model(yolo26: DetectionModel) -> None:
    images = torch.rand(2, 3, 64, 64)
    model = copy.deepcopy(yolo26).eval()
    with torch.no_grad():
        expected = head_branches(model(images))["one2one"]["scores"]
        fused = head_branches(inference_copy(model)(images))["one2one"]["scores"]
    assert torch.allclose(fused, expected, atol=1e-4)


def test_detection_loss_is_computed_in_fp32_under_autocast() -> None:
    """The box decode inside ultralytics' loss is a matmul that bf16 autocast would round: the Distiller computes the
    loss outside autocast, on fp32 copies of the head outputs."""
    torch.manual_seed(0)
    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    student.args = hyperparameters()
    student.criterion = student.init_criterion()
    distiller = Distiller(student, {}, {})
    batch = synthetic_batch()
    batch["img"] = batch["img"].float() / 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        det, _ = distiller(batch, None, ())
        preds = student(batch["img"])
    assert head_branches(preds)["one2many"]["boxes"].dtype == torch.bfloat16
    reference = detection_loss(student, preds, batch)  # outside autocast, on the same bf16 outputs
    assert torch.equal(det.total, reference.total)


def test_nan_gradients_under_fp16_count_as_skipped_steps_and_stop_the_run(run_kwargs: dict) -> None:
    """The fp16 grad scaler skips a step with NaN gradients itself; those steps used to go uncounted (and the EMA
    averaged weights that never moved), so a run with NaN gradients trained to its end without moving a weight."""
    state = built_state(run_kwargs, amp_dtype="fp16", max_bad_steps=3)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    weight = next(state.distiller.student.parameters())
    weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    start, ema_updates = student_weights(state), state.ema.updates
    batches = [synthetic_batch(seed) for seed in range(5)]
    with pytest.raises(DistillError) as stopped:  # each skip is quiet (the scaler's early back-off is routine)
        train_one_epoch(state, batches, epoch=0)
    assert "3 consecutive non-finite steps (last bad: gradients (the fp16 grad scaler" in stopped.value.message
    assert state.skipped_steps == 3 and state.ema.updates == ema_updates
    after = student_weights(state)
    assert all(torch.equal(start[k], after[k]) for k in start)
