"""One epoch of distillation and one validation pass: the training step, top to bottom."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from ultralytics.utils.torch_utils import ModelEMA

from . import dist
from .config import RunConfig
from .distiller import Distiller, Teacher
from .errors import EXIT_RUNTIME, DistillError
from .evaluation import Validation, run_validator
from .models import all_finite
from .schedule import interp, lr_factor, target_accumulate, warmup_steps, weight_factor

FP16_MAX = 65504.0  # the largest finite float16: checkpoints hold the student in fp16 (models.save_student)
STOPPED = "stopped. The last good checkpoint is kept; lower lr0 or the distillation weights, or try --no-amp"
LOG_EVERY = 10  # steps between reads of loss values from the device (each read is a host-device sync)


@dataclass
class TrainState:
    """Everything that changes while training; what ``last.pt`` must hold to resume exactly."""

    cfg: RunConfig
    model: nn.Module  # the Distiller, possibly wrapped in DDP
    teacher: Teacher | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32
    steps_per_epoch: int
    accumulate: int
    max_grad_norm: float  # the clip, resolved from grad_clip by settings.max_grad_norm (inf: none)
    step: int = 0  # global step, across epochs
    last_opt_step: int = -1
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0
    routine_skips: int = 0  # of the skipped steps, the fp16 grad scaler's back-offs
    steps_taken: int = 0  # optimizer steps that moved the weights
    balance: dict[str, float] = field(default_factory=dict)  # automatic per-term factors (1.0 until calibrated)
    balance_sums: dict[str, list[float]] = field(default_factory=dict)
    world_size: int = 1

    @property
    def distiller(self) -> Distiller:
        return getattr(self.model, "module", self.model)


def term_weights(state: TrainState) -> dict[str, float]:
    """Each term's weight at the current step: recipe weight x schedule x automatic balance factor."""
    cfg = state.cfg
    return {
        name: spec.weight
        * weight_factor(spec.schedule, state.step, cfg.epochs, state.steps_per_epoch)
        * state.balance.get(name, 1.0)
        for name, spec in cfg.recipe.losses.items()
    }


def set_learning_rate(state: TrainState, epoch: int) -> None:
    """Warm-up (bias LR falls from warmup_bias_lr, others rise from 0; momentum rises), then the epoch schedule."""
    cfg, ni = state.cfg, state.step
    nw = warmup_steps(cfg, state.steps_per_epoch)
    for group in state.optimizer.param_groups:
        target = group["initial_lr"] * lr_factor(cfg, epoch)
        if nw and ni <= nw:
            start = cfg.warmup_bias_lr if group.get("param_group") == "bias" else 0.0
            group["lr"] = interp(ni, nw, start, target)
            if "momentum" in group:  # SGD-style groups only: ultralytics leaves Adam's betas alone
                group["momentum"] = interp(ni, nw, cfg.warmup_momentum, cfg.momentum)
        else:
            group["lr"] = target


def train_one_epoch(
    state: TrainState, loader, epoch: int, on_log: Callable[[int, dict[str, float]], None] | None = None
) -> dict[str, float]:
    """Train one epoch; returns the epoch's mean of every logged value (detection items, raw and weighted terms)
    per batch, and the gradient norm summary of its optimizer steps (``clip_summary``)."""
    train_mode(state)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    norms: list[float] = []  # each optimizer step's gradient norm before the clip
    nw = warmup_steps(state.cfg, state.steps_per_epoch)
    target = target_accumulate(state.cfg, state.steps_per_epoch)
    for i, batch in enumerate(loader):
        set_learning_rate(state, epoch)
        if nw and state.step <= nw:  # accumulate ramps up with the warm-up, as in ultralytics
            state.accumulate = max(1, round(interp(state.step, nw, 1, target)))
        batch = preprocess(batch, state.device)
        weights = term_weights(state)
        active = tuple(name for name, w in weights.items() if w > 0)

        with autocast(state):
            teacher_out = state.teacher(batch["img"]) if active and state.teacher else None
            det, terms = state.model(batch, teacher_out, active)
            distill = sum((weights[k] * terms[k] for k in active), torch.zeros((), device=state.device))
            # ultralytics scales its loss by the batch size; x world size, as DDP averages the ranks' gradients
            loss = (det.total + distill) * batch["img"].shape[0] * state.world_size

        logs = {**{k: v.detach() for k, v in det.items.items()}, "det_loss": det.total.detach()}
        logs.update({f"{k}_raw": v.detach() for k, v in terms.items()})
        logs.update({f"{k}_w": (weights[k] * v).detach() for k, v in terms.items()})
        logs["distill_loss"] = distill.detach()
        if not step_is_finite(state, loss, logs):
            state.step += 1
            continue
        state.scaler.scale(loss).backward()
        if state.step - state.last_opt_step >= state.accumulate:
            norms.append(optimizer_step(state))
            state.last_opt_step = state.step
        update_balance(state, det.total, terms)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0) + v.float()
        count += 1
        state.step += 1
        if on_log and (i % LOG_EVERY == 0 or i == len(loader) - 1):
            on_log(i, {k: float(v) / count for k, v in sums.items()})
    check_epoch_trained(state, epoch)
    return {k: float(v) / max(count, 1) for k, v in sums.items()} | clip_summary(norms, state.max_grad_norm)


def clip_summary(norms: list[float], max_norm: float) -> dict[str, float]:
    """The epoch's mean gradient norm before the clip and the share of optimizer steps the clip rescaled; empty for
    an epoch without a finite optimizer step. A step's gradient is that of about ``nbs`` images (the loss is scaled
    by the batch size and summed over the accumulated batches, as in ultralytics; the accumulation ramps up during
    the warm-up), so at ultralytics' max_norm of 10 the share is often 1: every step rescaled to the same length.
    Non-finite norms (steps skipped, or skipped by the fp16 scaler) are left out."""
    finite = [n for n in norms if math.isfinite(n)]
    if not finite:
        return {}
    return {"grad_norm": sum(finite) / len(finite), "clipped": sum(n > max_norm for n in finite) / len(finite)}


def train_mode(state: TrainState) -> None:
    """Training mode; with ``bn_stats: frozen`` the student's BatchNorm layers stay in eval mode (running statistics
    kept and used; their scale and shift still train), as detection fine-tuning usually freezes them. Those of the
    ``freeze`` layers always do: a frozen layer computes what it computed before the run."""
    state.model.train()
    student_train_mode(state.distiller.student, state.cfg)


def student_train_mode(student: nn.Module, cfg: RunConfig) -> None:
    """The student's part of ``train_mode``: what its layers compute in a training step."""
    student.train()
    fixed = student if cfg.bn_stats == "frozen" else student.model[: cfg.freeze]
    for module in fixed.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def preprocess(batch: dict, device: torch.device) -> dict:
    batch["img"] = batch["img"].to(device, non_blocking=True).float() / 255
    if device.type == "cuda":
        batch["img"] = batch["img"].contiguous(memory_format=torch.channels_last)
    for key in ("cls", "bboxes", "batch_idx"):
        batch[key] = batch[key].to(device, non_blocking=True)
    return batch


def autocast(state: TrainState) -> contextlib.AbstractContextManager:
    if state.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=state.device.type, dtype=state.amp_dtype)


def step_is_finite(state: TrainState, loss: torch.Tensor, logs: dict[str, torch.Tensor]) -> bool:
    """Skip a step whose loss is NaN/inf, name the bad term, stop after ``max_bad_steps`` in a row."""
    if dist.all_agree(bool(torch.isfinite(loss)), state.device):  # ranks must skip together or DDP hangs
        return True
    state.optimizer.zero_grad(set_to_none=True)
    bad_terms = ", ".join(k for k, v in logs.items() if not torch.isfinite(v).all())
    skip_step(state, bad_terms or ("loss" if not torch.isfinite(loss) else "loss on another rank"))
    return False


def skip_step(state: TrainState, what: str, routine: bool = False) -> None:
    """Count a skipped step (``routine``: an fp16 grad-scaler back-off, quiet); stop after ``max_bad_steps`` of them
    with no optimizer step in between."""
    state.bad_steps += 1
    state.skipped_steps += 1
    state.routine_skips += routine
    if not routine:
        warnings.warn(
            f"step {state.step}: non-finite {what}; step skipped ({state.skipped_steps} so far)", stacklevel=3
        )
    if state.bad_steps >= state.cfg.max_bad_steps:
        raise DistillError(
            f"{state.bad_steps} consecutive non-finite steps (last bad: {what}); {STOPPED}", EXIT_RUNTIME
        )


def check_epoch_trained(state: TrainState, epoch: int) -> None:
    """Stop, before its checkpoints are saved, a run that ends without a step taken (``check_run_stepped``), or an
    epoch that left weights non-finite or beyond the fp16 range its checkpoints hold (a step far too large)."""
    if epoch == state.cfg.epochs - 1 and state.steps_taken == 0:  # the same on every rank
        check_run_stepped(state)
    finite = all_finite(trained_params(state))  # the same on every rank
    if dist.from_environment().is_main:  # what rank 0 writes: the EMA, or its student with its own BatchNorm stats
        saved = state.ema.ema if state.ema is not None else state.distiller.student
        finite = finite and all_finite(saved.state_dict().values(), bound=FP16_MAX)
    if not dist.all_agree(finite, state.device):
        raise DistillError(
            f"epoch {epoch + 1} left non-finite weights (or beyond fp16's range); {STOPPED}", EXIT_RUNTIME
        )


def check_run_stepped(state: TrainState) -> None:
    """For a run that took no optimizer step: stop it where it skipped a step for a non-finite loss or gradient (a run
    under ``max_bad_steps`` steps ended as a success with the weights it started from). An fp16 run whose grad scaler
    only backed off on its few steps is not stopped (the back-off is routine), but told that no weight moved."""
    if state.skipped_steps > state.routine_skips:
        raise DistillError(
            f"no step of the run was taken: it skipped steps for non-finite losses or gradients; {STOPPED}",
            EXIT_RUNTIME,
        )
    if state.routine_skips:
        warnings.warn(
            f"no step of the run was taken: the fp16 grad scaler backed off each time ({state.routine_skips}x), so "
            "the weights are the ones it started from (train longer, or --set amp_dtype=bf16 or fp32)",
            stacklevel=3,
        )


def trained_params(state: TrainState) -> list[nn.Parameter]:
    """Every parameter the optimizer steps (student and adapters), in its groups' order."""
    return [p for group in state.optimizer.param_groups for p in group["params"]]


def optimizer_step(state: TrainState) -> float:
    """Unscale, clip, step and update the EMA of the student, or, when gradients are non-finite, skip both and count
    the step as skipped; returns the gradient norm before the clip."""
    state.scaler.unscale_(state.optimizer)
    params = trained_params(state)
    norm = float(nn.utils.clip_grad_norm_(params, max_norm=state.max_grad_norm))  # the step's one host sync
    finite = math.isfinite(norm)  # with fp16, non-finite where the scaler's unscale_ above found inf or NaN
    scaled = state.scaler.is_enabled()
    if finite or scaled:
        state.scaler.step(state.optimizer)  # fp16: the scaler skips non-finite gradients itself
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if not finite:  # no weight moved: counted, so that NaN gradients stop an fp16 run too
        # the scaler's back-off from its first scale is routine (quiet); 20 in a row is not (the stop says so)
        skip_step(state, "gradients (the fp16 grad scaler skipped the step)" if scaled else "gradients", routine=scaled)
        return norm
    state.bad_steps = 0
    state.steps_taken += 1
    if state.ema is not None:  # only after a real step: the EMA's decay ramp counts optimizer steps
        state.ema.update(state.distiller.student)
    return norm


def update_balance(state: TrainState, det_loss: torch.Tensor, terms: dict) -> None:
    """Automatic balance: average the detection loss and each raw term over the first N finite steps (over all
    ranks), then fix each term's factor so that its weighted value is ``target`` x the detection loss."""
    balance = state.cfg.recipe.balance
    if balance.target <= 0 or state.balance or not terms:
        return
    sums = state.balance_sums  # key -> [sum, count]: a term may be paused during some of the steps
    for key, value in {"det_loss": det_loss, **terms}.items():
        total, count = sums.get(key, (0.0, 0))
        sums[key] = [total + float(value.detach()), count + 1]  # float() of a tensor in the graph warns
    if sums["det_loss"][1] < balance.steps:
        return
    means = dist.average({k: total / count for k, (total, count) in sums.items()}, state.device)  # same on all ranks
    for k in state.cfg.recipe.losses:
        raw = means.get(k, 0.0) * state.cfg.recipe.losses[k].weight
        state.balance[k] = balance.target * means["det_loss"] / raw if raw > 0 and math.isfinite(raw) else 1.0


def sync_balance_sums(state: TrainState) -> None:
    """At an epoch's end, on every rank: while the balance calibrates, each rank keeps the mean of all ranks' sums,
    so the copy rank 0 saves is every rank's (the mean of that mean plus each rank's later sums is still the mean of
    all sums: calibration is unchanged)."""
    if state.world_size == 1 or state.balance or not state.balance_sums:
        return
    flat = {f"{key}/{i}": pair[i] for key, pair in state.balance_sums.items() for i in (0, 1)}
    means = dist.average(flat, state.device)
    state.balance_sums = {key: [means[f"{key}/0"], means[f"{key}/1"]] for key in state.balance_sums}


def validate(model: nn.Module, loader, cfg: RunConfig, device: torch.device) -> Validation:
    """mAP of ``model`` on the run's validation loader, with ultralytics' DetectionValidator."""
    args = {
        "data": cfg.data,
        "imgsz": cfg.imgsz,
        "batch": loader.batch_size,
        "split": cfg.val_split,
        "device": "cpu" if device.type == "cpu" else str(device.index or 0),
    }
    return run_validator(model, args, loader)
