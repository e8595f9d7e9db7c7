"""Schedules as plain functions of the global step: distillation weights and the learning rate."""

from __future__ import annotations

import math

from .config import RunConfig, Schedule


def stop_step(schedule: Schedule, epochs: int, steps_per_epoch: int) -> int:
    """First global step with no distillation (``stop_epoch``; negative counts from the end)."""
    if schedule.stop_epoch is None:
        return epochs * steps_per_epoch
    stop = schedule.stop_epoch if schedule.stop_epoch >= 0 else epochs + schedule.stop_epoch
    return max(0, stop) * steps_per_epoch


def balance_span(cfg: RunConfig, steps_per_epoch: int) -> int:
    """How many of the run's steps automatic balance can count: those where some term is on (weight > 0; a term that
    warms up is off at step 0, and off from its stop step)."""
    spans = [
        (int(spec.schedule.warmup_epochs > 0), stop_step(spec.schedule, cfg.epochs, steps_per_epoch))
        for spec in cfg.recipe.losses.values()
        if spec.weight > 0
    ]
    if not spans:
        return 0
    return max(0, max(stop for _, stop in spans) - min(first for first, _ in spans))  # spans start at 0 or 1


def schedule_problem(name: str, schedule: Schedule, epochs: int) -> str | None:
    """Why a term's ``stop_epoch`` leaves it no epoch of an ``epochs``-long run (it would silently train without
    it), or None."""
    if stop_step(schedule, epochs, 1) > 0:
        return None
    within = f"a stop_epoch in 1..{epochs - 1} or -1..-{epochs - 1}, or none" if epochs > 1 else "no stop_epoch"
    where = f"losses.{name}.schedule.stop_epoch {schedule.stop_epoch}"
    return f"{where} leaves '{name}' none of the run's {epochs} epoch{'s' if epochs > 1 else ''}; use {within}"


def weight_factor(schedule: Schedule, step: int, epochs: int, steps_per_epoch: int) -> float:
    """Multiplier in [0, 1] on a term's weight at global ``step`` (0-based, counted across epochs).

    Linear ramp 0 -> 1 over ``warmup_epochs``; then constant, linear or cosine decay from 1 to ``final`` between the
    end of warm-up and the stop step; 0 from the stop step on.
    """
    stop = stop_step(schedule, epochs, steps_per_epoch)
    if step >= stop:
        return 0.0
    warm = schedule.warmup_epochs * steps_per_epoch
    ramp = min(1.0, step / warm) if warm > 0 else 1.0
    progress = min(1.0, max(0.0, (step - warm) / max(stop - warm, 1)))
    if schedule.kind == "linear":
        decay = 1.0 - (1.0 - schedule.final) * progress
    elif schedule.kind == "cosine":
        decay = schedule.final + (1.0 - schedule.final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0
    return ramp * decay


def lr_factor(cfg: RunConfig, epoch: int) -> float:
    """Epoch-level LR multiplier: linear or cosine from 1 to ``lrf`` over the run (as ultralytics)."""
    if cfg.cos_lr:
        return ((1 - math.cos(epoch * math.pi / cfg.epochs)) / 2) * (cfg.lrf - 1) + 1
    return max(1 - epoch / cfg.epochs, 0) * (1.0 - cfg.lrf) + cfg.lrf


def warmup_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    """Warm-up length in steps, leaving at least the final epoch for regular training; a one-epoch run warms up over
    its first half (with none, AdamW's full step from the first batch wrecked a trained student: val 0.457 -> 0.006).
    It ends at least one full accumulation before the run does: the accumulation ramps up with the warm-up, and a
    warm-up that ran to the end left a short run's only optimizer step at its first batch, at LR 0 (ultralytics does
    that too)."""
    epochs = min(cfg.warmup_epochs, max(cfg.epochs - 1, cfg.epochs / 2))
    steps = round(epochs * steps_per_epoch) if epochs > 0 else 0
    return max(0, min(steps, steps_per_epoch * cfg.epochs - target_accumulate(cfg, steps_per_epoch)))


def nominal_accumulate(cfg: RunConfig) -> int:
    """Steps whose gradients add up before an optimizer step: the nominal batch ``nbs`` over the batch size."""
    return max(round(cfg.nbs / cfg.batch), 1)


def target_accumulate(cfg: RunConfig, steps_per_epoch: int) -> int:
    """The nominal accumulation, capped at the run's length so that short runs still step."""
    return min(nominal_accumulate(cfg), steps_per_epoch * cfg.epochs)


def optimizer_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    """The run's optimizer steps, counted at the nominal accumulation (a warm-up that accumulates less adds a few)."""
    return steps_per_epoch * cfg.epochs // target_accumulate(cfg, steps_per_epoch)


def interp(x: float, x1: float, y0: float, y1: float) -> float:
    """Linear from (0, y0) to (x1, y1)."""
    return y0 + (y1 - y0) * min(1.0, x / x1) if x1 > 0 else y1
