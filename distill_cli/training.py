"""Build everything a distillation run needs, loop over epochs, validate, checkpoint, resume."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from ultralytics.utils.torch_utils import ModelEMA, init_seeds

from . import dist
from .adapter_fit import adapter_targets, fit_adapters
from .checkpoint import RunGuard, check_resumed_classes, restore_state, save_checkpoints
from .config import ULTRALYTICS_NBS, RunConfig
from .data import build_loader, hyperparameters, load_data
from .distiller import Distiller, Teacher, build_terms
from .engine import TrainState, sync_balance_sums, train_one_epoch, validate
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, DistillError
from .evaluation import Validation
from .keep_start import checked_keep, resolved_keep
from .models import class_names, count_params, stride_multiple
from .optimizer import build_optimizer
from .precision import amp_dtypes, precision_note, resolve_precision
from .report import RunOutcome, feature_agreement, measure_baseline, write_report
from .rules import api_function, check_function
from .runlock import check_unclaimed
from .runlog import RunLog, TrainResult
from .schedule import balance_span, optimizer_steps, target_accumulate
from .settings import max_grad_norm, resolve_auto, resolve_ema, run_config, select_device, terms_can_pause
from .start import (
    calibrate_selected,
    first_train_images,
    freeze_layers,
    init_note,
    load_models,
    seed_student,
    seeds_from_teacher,
    warn_if_short,
)
from .stopping import Interrupted, StopOnSignal
from .teacher_scale import resolved, trained_imgsz, view_scales

Callback = Callable[[str, dict[str, Any]], None]


def check_inputs(recipe: str | None = None, resume: str | Path | None = None, **overrides: Any) -> RunConfig:
    """What a run checks before it starts (config, resume state, data, both models, and that no other process trains
    a resumed run), without starting it or writing anything: the multi-GPU launcher calls it once, so that bad input
    is one error line, not one per process."""
    cfg, checkpoint = run_config(None, recipe, resume, overrides)
    _, student, _ = load_models(cfg, load_data(cfg.data, cfg.val_split), resuming=checkpoint is not None)
    check_resumed_classes(checkpoint, student)
    if checkpoint is not None:  # a run another process trains: refused here, not by rank 0 inside torchrun
        check_unclaimed(Path(checkpoint["run_dir"]))
    return cfg


@api_function
def train(
    cfg: RunConfig | None = None,
    *,
    recipe: str | None = None,
    resume: str | Path | None = None,
    callback: Callback | None = None,
    **overrides: Any,
) -> TrainResult:
    """Distil ``cfg.student`` from ``cfg.teacher`` on ``cfg.data``; return where the student went and its mAP.

    ``callback(event, info)`` receives ``start``, ``step`` (running means), ``epoch`` (the results row) and ``end``.
    Under ``torchrun`` every rank calls this; rank 0 alone writes files, validates and calls back.
    """
    check_function(callback, "callback", "(event, info)", 2)
    info = dist.from_environment()
    with warnings.catch_warnings():
        if info.enabled and not info.is_main:  # rank 0 gives each warning; one copy per process would add nothing
            warnings.simplefilter("ignore", UserWarning)
        cfg, checkpoint = run_config(cfg, recipe, resume, overrides)
        if "," in cfg.device and not info.enabled:
            raise DistillError(f"--device {cfg.device}: several devices need torchrun (see README, multi-GPU)")
        owns_group = info.enabled and not dist.joined()  # a group the caller made outlives the run
        device = dist.init(info, cfg.device) if info.enabled else select_device(cfg.device)
        try:
            # no run folder is left by a run that fails before its checkpoint; one process trains a run at a time
            with RunGuard(cfg, checkpoint, info.is_main) as guard:
                with warnings_unless_refused():  # bad input found while building the run: its error line alone
                    state, log, loaders, hyp, start_epoch = prepare(cfg, checkpoint, callback, info, device, guard)
                return fit(state, log, *loaders, hyp, start_epoch)
        finally:
            if owns_group:
                dist.shutdown()


def prepare(
    cfg: RunConfig, checkpoint: dict | None, callback: Callback | None, info: dist.DistInfo, device, guard: RunGuard
):
    """Data, models, adapters, optimizer, EMA and the run dir: everything the epoch loop needs."""
    init_seeds(cfg.seed + info.rank, deterministic=cfg.deterministic)
    # oneDNN's CPU convolutions are not bitwise reproducible across processes (buffer alignment picks kernels):
    # deterministic runs use PyTorch's own kernels, so that a resumed run equals an uninterrupted one bit for bit.
    torch.backends.mkldnn.enabled = not (cfg.deterministic and device.type == "cpu")
    data = load_data(cfg.data, cfg.val_split)
    teacher_model, student, has_start = load_models(cfg, data, resuming=checkpoint is not None)
    check_resumed_classes(checkpoint, student)
    student_imgsz = trained_imgsz(student)  # as loaded: the run's own hyperparameters replace the student's below
    coarsest = int(student.stride.max())
    if cfg.imgsz <= coarsest:  # its maps there would be 1x1: BatchNorm cannot train on a batch of one image
        raise DistillError(
            f"--imgsz {cfg.imgsz}: the student's coarsest maps (stride {coarsest}) would be 1x1, where BatchNorm "
            f"cannot train on a batch of one image; use {2 * coarsest} or more"
        )
    cfg, partly_seeded = seed_student(cfg, student, teacher_model, resuming=checkpoint is not None)
    teacher_model = teacher_model if cfg.recipe.losses else None
    optimizer_nbs = cfg.nbs or ULTRALYTICS_NBS  # optimizer: auto counts iterations as ultralytics does
    cfg = resolve_precision(resolve_auto(cfg), device)
    stride = int(max(m.stride.max() for m in (student, teacher_model) if m is not None))
    cfg = replace(cfg, imgsz=stride_multiple(cfg.imgsz, stride))
    cfg = replace(cfg, recipe=checked_keep(resolved(cfg.recipe, cfg.imgsz, teacher_model), has_start))
    batch = dist.per_rank_batch(cfg.batch, info.world_size)
    hyp = hyperparameters(
        imgsz=cfg.imgsz,
        batch=batch,
        close_mosaic=cfg.close_mosaic,
        scale=cfg.scale,
        cache=cfg.cache,
        fraction=cfg.fraction,
        workers=cfg.workers,
        seed=cfg.seed,
        deterministic=cfg.deterministic,
        epochs=cfg.epochs,  # the E2E loss decays its one-to-many gain over the run's epochs
    )
    student.args = hyp
    terms, pairs = build_terms(student, teacher_model, cfg.recipe, cfg.imgsz) if teacher_model else ({}, {})
    freeze_layers(student, cfg.freeze, pairs)
    rank = info.rank if info.enabled else -1
    with dist.main_first(info):
        train_loader = build_loader(data, "train", hyp, batch, cfg.workers, stride, train=True, rank=rank)
    check_balance_reached(cfg, len(train_loader))
    steps = optimizer_steps(cfg, len(train_loader))
    cfg = replace(cfg, recipe=resolved_keep(cfg.recipe, has_start, student_imgsz, cfg.imgsz, steps))
    val_loader = None
    if info.is_main:
        val_loader = build_loader(data, cfg.val_split, hyp, batch * 2, cfg.workers, stride, train=False)
    student = student.to(device)
    if seeds_from_teacher(cfg) and checkpoint is None:
        calibrate_selected(student, data, hyp, batch, stride, device)
    cfg = resolve_ema(cfg, len(train_loader))
    # the EMA and the kept start copy the student before the Distiller hooks it (a resumed run's weights come later)
    ema = ModelEMA(student, cfg.ema_decay, cfg.ema_tau) if cfg.ema and info.is_main else None
    amp_dtype, teacher_dtype = amp_dtypes(cfg, device)
    keep, teacher_layers = float(cfg.recipe.keep_start), sorted({p.teacher for ps in pairs.values() for p in ps})
    scales, start = view_scales(cfg.recipe.teacher_scale), student if keep else None
    teacher = Teacher(teacher_model, teacher_layers, device, teacher_dtype, scales, start) if teacher_model else None
    student.criterion = student.init_criterion()  # on the device: the loss keeps the device it was built on
    distiller = Distiller(student, terms, pairs, keep).to(device)
    has_adapters = bool(adapter_targets(distiller))
    if teacher is not None:
        distiller.bind_teacher(teacher)
        # before DDP, which then broadcasts rank 0's fit; a resumed run's adapters come from its checkpoint
        if cfg.recipe.adapters == "fit" and checkpoint is None and has_adapters:
            fit_adapters(distiller, teacher, first_train_images(data, hyp, batch, stride, device), cfg)
    model = distiller
    if info.enabled:  # adapters train inside the wrapped module, so their gradients are averaged too
        model = DistributedDataParallel(
            distiller,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=terms_can_pause(cfg),
        )
    # each rank's dataset is the whole split (the sampler divides it), and cfg.batch is the global batch
    iterations = math.ceil(len(train_loader.dataset) / max(cfg.batch, optimizer_nbs)) * cfg.epochs
    optimizer, cfg = build_optimizer(distiller, cfg, len(data["names"]), iterations)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = TrainState(
        cfg,
        model,
        teacher,
        optimizer,
        scaler,
        ema,
        device,
        amp_dtype,
        len(train_loader),
        accumulate=1,
        max_grad_norm=max_grad_norm(cfg),
        world_size=info.world_size,
    )
    state.accumulate = target_accumulate(cfg, state.steps_per_epoch)
    log = None
    if info.is_main:  # the run dir appears only now, when everything the loop needs was built
        run_dir = Path(checkpoint["run_dir"]) if checkpoint else guard.create(cfg.project, cfg.name)
        log = RunLog(run_dir, cfg, callback, start_is_mark=has_start)
    start_epoch = restore_state(state, checkpoint, log, train_loader) if checkpoint else 0
    if checkpoint and not info.is_main:  # rank 0's RNG was saved; the others draw their own streams again
        init_seeds(cfg.seed + info.rank + 1000 * start_epoch, deterministic=cfg.deterministic)
    for _ in range(start_epoch):  # the E2E loss's branch gains are a function of the epochs done
        update_criterion(student)
    if log:
        if checkpoint is None:  # a resumed run cannot change its length
            warn_if_short(cfg, teacher_model, steps)
        note = precision_note(amp_dtype, teacher_dtype if teacher else amp_dtype or torch.float32, device)
        log.start(
            pairs,
            count_params(student),
            class_names(student),
            start_epoch,
            state,
            note,
            init_note(cfg, has_adapters, partly_seeded),
        )
    return state, log, (train_loader, val_loader), hyp, start_epoch


def check_balance_reached(cfg: RunConfig, steps_per_epoch: int) -> None:
    """Automatic balance fixes its factors after ``balance.steps`` steps with a term on: a run with no such step
    after those would record a target it never applied."""
    balance, span = cfg.recipe.balance, balance_span(cfg, steps_per_epoch)
    if balance.target > 0 and cfg.recipe.losses and balance.steps >= span:
        fix = "set balance.target=0" + (", or train longer" if span else ": no term has a weight")
        fix = f"give balance.steps below {span}" if span > 1 else fix
        raise DistillError(
            f"balance.steps {balance.steps}: the run's terms are on in {span} of its {cfg.epochs * steps_per_epoch} "
            f"steps, so its automatic balance would never apply; {fix}"
        )


@contextlib.contextmanager
def warnings_unless_refused() -> Iterator[None]:
    """Hold the warnings of the block, and give them at its end unless it refuses the input (exit 2): a warning
    about the student before a refusal of its teacher would make the refusal's one line two."""
    pending: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as pending:
            yield
    except DistillError as e:
        if e.exit_code == EXIT_USAGE:
            pending = []
        raise
    finally:
        for caught in pending:
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)


def fit(state: TrainState, log: RunLog | None, train_loader, val_loader, hyp, start_epoch: int) -> TrainResult | None:
    """The epoch loop: train, validate and save on rank 0, stop cleanly on SIGINT/SIGTERM, then the report."""
    cfg, device = state.cfg, state.device
    start = time.time()
    teacher_model = state.teacher.model if state.teacher else None
    # a fine-tune's starting student is "epoch 0", the mark to beat
    if log and (cfg.report or log.start_is_mark) and log.baseline is None:  # a resumed run brings its start's
        log.baseline = measure_baseline(state, teacher_model, val_loader, full=cfg.report)
    baseline = log.baseline if log else None
    final = None
    with StopOnSignal() as stop:
        try:
            if start_epoch == 0 and log:
                save_checkpoints(state, log, train_loader, epoch=-1, final=False)  # epoch 0 interrupted: last.pt
            for epoch in range(start_epoch, cfg.epochs):
                start_epoch_data(train_loader, hyp, cfg, epoch, start_epoch)
                on_log = (lambda i, m, epoch=epoch: log.step(epoch, i, m)) if log else None
                means = dist.average(train_one_epoch(state, stop.watch(train_loader, device), epoch, on_log), device)
                update_criterion(state.distiller.student)
                sync_balance_sums(state)
                if log:
                    final = end_epoch(state, log, val_loader, train_loader, epoch, means) or final
                dist.barrier()  # the other ranks wait for rank 0's validation and saves
            if dist.any_rank(stop.flag, device):  # a signal during the last validation, after the last step's check
                if log:
                    raise KeyboardInterrupt  # as one during the report: RunGuard says the weights are complete
                raise DistillError("interrupted; see rank 0", EXIT_INTERRUPTED)
        except (Interrupted, RuntimeError) as e:
            # SIGTERM sent to the process group (timeout, systemd, schedulers) also kills the loader's workers, and
            # torch raises their death wherever the step is: after our signal, that is the interruption
            if isinstance(e, RuntimeError) and not stop.flag:
                raise
            where = f"{log.last} holds the last completed epoch. Resume: yolodistill train --resume {log.run_dir}"
            raise DistillError(f"interrupted; {where if log else 'see rank 0'}", EXIT_INTERRUPTED) from None
    if not log:
        return None
    report = None
    if cfg.report and baseline is not None:
        agreement = feature_agreement(state, val_loader)
        run = RunOutcome(
            run_dir=log.run_dir,
            cfg=cfg,
            log=log,
            baseline=baseline,
            final=final,
            agreement_after=agreement,
            balance=dict(state.balance),
            steps_per_epoch=state.steps_per_epoch,
        )
        report = write_report(run)
    before = baseline.before.metrics if log and log.start_is_mark else {}  # a yaml student's start is no mark
    return log.finish(time.time() - start, state.skipped_steps, report, before)


def update_criterion(student: nn.Module) -> None:
    """End of an epoch, as ultralytics' trainer: an end-to-end loss moves weight from one-to-many to one-to-one."""
    if hasattr(student.criterion, "update"):
        student.criterion.update()


def start_epoch_data(train_loader, hyp, cfg: RunConfig, epoch: int, start_epoch: int) -> None:
    """Mosaic off for the last ``close_mosaic`` epochs (also when resuming inside them)."""
    closing = max(cfg.epochs - cfg.close_mosaic, 0)
    if epoch == closing or (epoch == start_epoch and epoch > closing):
        train_loader.dataset.close_mosaic(hyp)
        train_loader.reset()
        train_loader.order.start(epoch)  # the old iterator's workers may have started the next pass already


def end_epoch(state: TrainState, log: RunLog, val_loader, train_loader, epoch: int, means: dict) -> Validation | None:
    """Rank 0: validate when due, log the row, save last.pt (and best.pt if it improved)."""
    cfg = state.cfg
    due = (epoch + 1) % cfg.val_interval == 0 or epoch == cfg.epochs - 1
    model = state.ema.ema if state.ema else state.distiller.student
    result = validate(model, val_loader, cfg, state.device) if due else None
    log.epoch(epoch, means, result.metrics if result else {}, [g["lr"] for g in state.optimizer.param_groups], state)
    save_checkpoints(state, log, train_loader, epoch, final=epoch == cfg.epochs - 1)
    return result
