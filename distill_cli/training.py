"""Build everything a distillation run needs, loop over epochs, validate, checkpoint, resume."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from ultralytics.utils import DEFAULT_CFG
from ultralytics.utils.torch_utils import ModelEMA, init_seeds

from . import dist
from .adapter_fit import adapter_targets, fit_adapters
from .checkpoint import RunGuard, load_resume, restore_state, save_checkpoints
from .config import (
    ULTRALYTICS_MAX_NORM,
    ULTRALYTICS_NBS,
    Recipe,
    RunConfig,
    apply_overrides,
    load_recipe,
    names_its_terms,
)
from .data import build_loader, hyperparameters, load_data
from .distiller import Distiller, Teacher, build_terms, uses_recipe_layers
from .engine import TrainState, sync_balance_sums, target_accumulate, train_one_epoch, validate
from .errors import EXIT_INTERRUPTED, DistillError
from .evaluation import Validation
from .keep_start import resolved_keep
from .models import class_names, count_params, stride_multiple
from .optimizer import ADAM_FAMILY, build_optimizer
from .precision import amp_dtypes, precision_note, resolve_precision
from .report import feature_agreement, measure_baseline, write_report
from .rules import check_function
from .runlog import RunLog, TrainResult
from .schedule import schedule_problem
from .start import (
    calibrate_selected,
    fine_tunes,
    first_train_images,
    freeze_layers,
    init_note,
    load_models,
    needs_teacher,
    seed_student,
    seeds_from_teacher,
    warn_if_short,
)
from .stopping import Interrupted, StopOnSignal
from .teacher_scale import resolved, view_scales

Callback = Callable[[str, dict[str, Any]], None]
# the span of a fine-tune's EMA, as a share of its optimizer steps (benchmarks/RESULTS.md: an average over the last
# ~10% of the steps beat one over ~20% and a copy of the live weights)
FINETUNE_EMA_SHARE = 0.1
# a fine-tune's random resize of its training images: none (the student as given has learned that jitter; without it
# both recipes' means rose in the fine-tune settings, benchmarks/RESULTS.md 2026-12-03)
FINETUNE_SCALE = 0.0


def resolve_config(cfg: RunConfig | None = None, recipe: str | Recipe | None = None, **overrides: Any) -> RunConfig:
    """A RunConfig from an optional base, a recipe (name, YAML path, or a ``Recipe`` from ``load_recipe``) and field
    overrides (``epochs=5``, ``**{"losses.cwd.weight": 2}``)."""
    if cfg is not None and not isinstance(cfg, RunConfig):
        raise DistillError(
            f"train's first argument is a RunConfig or None, got {type(cfg).__name__}; pass settings "
            f"as keywords: train(epochs=5, ...)"
        )
    cfg = cfg or RunConfig()
    if isinstance(recipe, Recipe):
        cfg = replace(cfg, recipe=recipe, recipe_name="custom")  # a Recipe object carries no name
    elif recipe is not None:
        cfg = replace(cfg, recipe=load_recipe(recipe), recipe_name=str(recipe))
    elif cfg.recipe is None:
        cfg = replace(cfg, recipe=load_recipe(cfg.recipe_name))
    elif not names_its_terms(cfg):
        cfg = replace(cfg, recipe_name="custom")  # RunConfig(recipe=...): no name, or not the named recipe's terms
    if "recipe_name" in overrides:  # it names the recipe the terms came from; setting it alone would mislabel the run
        raise DistillError("--set recipe_name: choose the recipe with --recipe (recipe= in the Python API)")
    cfg = apply_overrides(cfg, overrides)  # also checks every field against the schema's rules
    check_layers_read(cfg.recipe, overrides)
    for name, spec in cfg.recipe.losses.items():
        problem = schedule_problem(name, spec.schedule, cfg.epochs)
        if problem:
            raise DistillError(problem)
    return cfg


def check_layers_read(recipe: Recipe, overrides: dict[str, Any]) -> None:
    """Layers given for a recipe in which no term reads them would be ignored: bad input, not a silent no-op."""
    given = next((key for key in ("layers", "recipe.layers") if key in overrides), None)
    if given is None or uses_recipe_layers(recipe):
        return
    own = [name for name, spec in recipe.losses.items() if spec.layers is not None]
    hint = (
        f"--set losses.{own[0]}.layers=null makes {own[0]} read them"
        if own
        else "pick a recipe with a feature term (cwd, mgd, ...) or add one: --set losses.cwd.weight=1"
    )
    option = "--layers" if given == "layers" else "--set recipe.layers"
    terms = ", ".join(recipe.losses) or "none"
    raise DistillError(f"{option}: no term of the recipe (terms: {terms}) distils the recipe's layers; {hint}")


def run_config(
    cfg: RunConfig | None, recipe: str | None, resume: str | Path | None, overrides: dict[str, Any]
) -> tuple[RunConfig, dict[str, Any] | None]:
    """The run's config and, when resuming, its saved state. A resumed run keeps its own config: only ``device``
    may change (where it runs, e.g. the ``cuda`` that the multi-GPU launcher gives each process)."""
    if resume is not None:
        extra = sorted(set(overrides) - {"device"}) + ["recipe"] * bool(recipe) + ["cfg"] * (cfg is not None)
        if extra:
            raise DistillError(f"--resume continues a run as it was configured; drop {', '.join(extra)}")
        cfg, checkpoint = load_resume(resume)
        if "device" in overrides:
            cfg = apply_overrides(cfg, {"device": overrides["device"]})
    else:
        cfg, checkpoint = resolve_config(cfg, recipe, **overrides), None
    for key in ("teacher", "student", "data") if needs_teacher(cfg) else ("student", "data"):
        if not getattr(cfg, key):
            raise DistillError(f"no {key} given; pass --{key}")
    return cfg, checkpoint


def check_inputs(recipe: str | None = None, resume: str | Path | None = None, **overrides: Any) -> RunConfig:
    """What a run checks before it starts (config, resume state, data, both models), without starting it: the
    multi-GPU launcher calls it once, so that bad input is one error line, not one per process."""
    cfg, checkpoint = run_config(None, recipe, resume, overrides)
    load_models(cfg, load_data(cfg.data, cfg.val_split), resuming=checkpoint is not None)
    return cfg


def terms_can_pause(cfg: RunConfig) -> bool:
    """Whether some step may skip a term (weight 0 at a warm-up start, after stop_epoch, at a decay to 0): its
    adapters then get no gradient, which DDP must be told about (it costs a graph traversal per step otherwise)."""
    return any(
        spec.weight == 0
        or spec.schedule.warmup_epochs > 0
        or spec.schedule.stop_epoch is not None
        or (spec.schedule.kind != "constant" and spec.schedule.final == 0)
        for spec in cfg.recipe.losses.values()
    )


def select_device(spec: str) -> torch.device:
    spec = str(spec).strip().lower()
    if spec in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if "," in spec:
        raise DistillError(f"--device {spec}: several devices need torchrun (see README, multi-GPU)")
    index = 0 if spec in ("cuda", "gpu") else spec.removeprefix("cuda:")
    if not str(index).isdigit():
        raise DistillError(f"--device '{spec}' not understood; use cpu, cuda, 0, 1, ...")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise DistillError(f"--device {spec}: no such CUDA device on this machine; use --device cpu")
    return torch.device(f"cuda:{index}")


def resolve_auto(cfg: RunConfig) -> RunConfig:
    """The settings that depend on how the student starts, resolved once (config.yaml and a resumed run say what
    was done): a trained .pt student is fine-tuned with its BatchNorm statistics frozen, a step every batch and its
    training images not resized at random; a yaml student trains from scratch exactly as ultralytics trains it
    (benchmarks/RESULTS.md has the measurements)."""
    finetune = fine_tunes(cfg)
    bn_stats = cfg.bn_stats if cfg.bn_stats != "auto" else "frozen" if finetune else "update"
    nbs = cfg.nbs or (cfg.batch if finetune else ULTRALYTICS_NBS)
    scale = cfg.scale if cfg.scale is not None else FINETUNE_SCALE if finetune else DEFAULT_CFG.scale
    return replace(cfg, bn_stats=bn_stats, nbs=nbs, scale=scale)


def max_grad_norm(cfg: RunConfig) -> float:
    """The clip's max norm: ``grad_clip`` when set; when auto (0), none for a .pt student fine-tuned with an
    Adam-family optimizer, else ultralytics' 10. The loss is scaled by the batch, so a fine-tune's gradient norm is
    in the hundreds to thousands and a clip at 10 rescales every step to the same norm; Adam's per-parameter
    normalisation already bounds each update, and without the clip the default recipe's fine-tune means rose in 9
    of 12 (benchmarks/RESULTS.md). SGD's step grows with the gradient, so SGD, MuSGD and RMSprop keep the clip, as do
    students from scratch."""
    if cfg.grad_clip:
        return cfg.grad_clip
    return math.inf if fine_tunes(cfg) and cfg.optimizer in ADAM_FAMILY else ULTRALYTICS_MAX_NORM


def resolve_ema(cfg: RunConfig, steps_per_epoch: int) -> RunConfig:
    """The EMA's decay and time constant, when auto (0). From scratch: ultralytics' (0.9999, tau 2000 steps). A
    fine-tune of a few hundred steps would get a copy of the live weights from those (its decay is 0.06 after 130
    steps), so there the average spans about the last tenth of the run: decay 1 - 10 / steps, reached with a time
    constant of 3/4 of that span (the ramp is over long before the end); from 100000 steps on, ultralytics' values.
    Steps are counted at the nominal accumulation (a warm-up that accumulates less adds a few; benchmarks/RESULTS.md
    has the measurements)."""
    decay, tau = 0.9999, 2000.0
    if fine_tunes(cfg):
        steps = steps_per_epoch * cfg.epochs // target_accumulate(cfg, steps_per_epoch)
        span = max(steps * FINETUNE_EMA_SHARE, 1.0)
        decay, tau = min(1 - 1 / span, decay), min(0.75 * span, tau)
    return replace(cfg, ema_decay=cfg.ema_decay or decay, ema_tau=cfg.ema_tau or tau)


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
    check_function(callback, "callback", "(event, info)")
    info = dist.from_environment()
    with warnings.catch_warnings():
        if info.enabled and not info.is_main:  # rank 0 gives each warning; one copy per process would add nothing
            warnings.simplefilter("ignore", UserWarning)
        cfg, checkpoint = run_config(cfg, recipe, resume, overrides)
        if "," in cfg.device and not info.enabled:
            raise DistillError(f"--device {cfg.device}: several devices need torchrun (see README, multi-GPU)")
        device = dist.init(info, cfg.device) if info.enabled else select_device(cfg.device)
        try:
            # no run folder is left by a run that fails before its checkpoint; one process trains a run at a time
            with RunGuard(cfg, checkpoint, info.is_main) as guard:
                state, log, loaders, hyp, start_epoch = prepare(cfg, checkpoint, callback, info, device, guard)
                return fit(state, log, *loaders, hyp, start_epoch)
        finally:
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
    coarsest = int(student.stride.max())
    if cfg.imgsz <= coarsest:  # its maps there would be 1x1: BatchNorm cannot train on a batch of one image
        raise DistillError(
            f"--imgsz {cfg.imgsz}: the student's coarsest maps (stride {coarsest}) would be 1x1, where BatchNorm "
            f"cannot train on a batch of one image; use {2 * coarsest} or more"
        )
    cfg = seed_student(cfg, student, teacher_model) if checkpoint is None else cfg
    teacher_model = teacher_model if cfg.recipe.losses else None
    optimizer_nbs = cfg.nbs or ULTRALYTICS_NBS  # optimizer: auto counts iterations as ultralytics does
    cfg = resolve_precision(resolve_auto(cfg), device)
    stride = int(max(m.stride.max() for m in (student, teacher_model) if m is not None))
    cfg = replace(cfg, imgsz=stride_multiple(cfg.imgsz, stride))
    cfg = replace(cfg, recipe=resolved(cfg.recipe, cfg.imgsz, teacher_model))
    cfg = replace(cfg, recipe=resolved_keep(cfg.recipe, has_start, student, cfg.imgsz))
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
        log = RunLog(run_dir, cfg, callback)
    start_epoch = restore_state(state, checkpoint, log, train_loader) if checkpoint else 0
    if checkpoint and not info.is_main:  # rank 0's RNG was saved; the others draw their own streams again
        init_seeds(cfg.seed + info.rank + 1000 * start_epoch, deterministic=cfg.deterministic)
    for _ in range(start_epoch):  # the E2E loss's branch gains are a function of the epochs done
        update_criterion(student)
    if log:
        if checkpoint is None:  # a resumed run cannot change its length
            optimizer_steps = cfg.epochs * state.steps_per_epoch // target_accumulate(cfg, state.steps_per_epoch)
            warn_if_short(cfg, teacher_model, optimizer_steps)
        note = precision_note(amp_dtype, teacher_dtype if teacher else amp_dtype or torch.float32, device)
        log.start(
            pairs,
            count_params(student),
            class_names(student),
            start_epoch,
            state,
            note,
            init_note(cfg, has_adapters),
        )
    return state, log, (train_loader, val_loader), hyp, start_epoch


def fit(state: TrainState, log: RunLog | None, train_loader, val_loader, hyp, start_epoch: int) -> TrainResult | None:
    """The epoch loop: train, validate and save on rank 0, stop cleanly on SIGINT/SIGTERM, then the report."""
    cfg, device = state.cfg, state.device
    start = time.time()
    teacher_model = state.teacher.model if state.teacher else None
    # a fine-tune's starting student is "epoch 0", the mark to beat
    if log and (cfg.report or fine_tunes(cfg)) and log.baseline is None:  # a resumed run brings the one of its start
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
        report = write_report(log.run_dir, state, log, baseline, final, feature_agreement(state, val_loader))
    before = baseline.before.metrics if baseline else {}
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
