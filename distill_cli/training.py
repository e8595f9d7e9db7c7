"""Build everything a distillation run needs, loop over epochs, validate, checkpoint, resume."""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.utils.torch_utils import ModelEMA, init_seeds

from .config import RunConfig, apply_overrides, config_from_dict, load_recipe
from .data import build_loader, hyperparameters, load_data
from .distiller import Distiller, Teacher, build_terms
from .engine import TrainState, nominal_accumulate, target_accumulate, train_one_epoch, validate
from .errors import EXIT_INTERRUPTED, DistillError
from .models import class_names, count_params, load_model, read_checkpoint, save_student
from .runlog import RunLog, TrainResult, capture_rng, new_run_dir, restore_rng

Callback = Callable[[str, dict[str, Any]], None]


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the loop stops after the current step."""


def resolve_config(cfg: RunConfig | None = None, recipe: str | None = None, **overrides: Any) -> RunConfig:
    """A RunConfig from an optional base, a recipe name/path and field overrides (``epochs=5``,
    ``**{"losses.cwd.weight": 2}``)."""
    cfg = cfg or RunConfig()
    if recipe is not None:
        cfg = replace(cfg, recipe=load_recipe(recipe), recipe_name=recipe)
    elif not cfg.recipe.losses and cfg.recipe_name:
        cfg = replace(cfg, recipe=load_recipe(cfg.recipe_name))
    return apply_overrides(cfg, overrides) if overrides else cfg


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


def amp_dtypes(cfg: RunConfig, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(student autocast dtype or None for fp32, teacher dtype): bf16 where supported, else fp16; fp32 on CPU."""
    if device.type != "cuda":
        return None, torch.float32
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (half if cfg.amp else None), half


def build_optimizer(
    model: Distiller, cfg: RunConfig, nc: int, iterations: int
) -> tuple[torch.optim.Optimizer, RunConfig]:
    """ultralytics' recipe: weight decay on conv/linear weights only; ``auto`` picks AdamW with a fitted LR for short
    runs and SGD for long ones. Adapters and generators are in the optimizer with the student."""
    if cfg.optimizer == "auto":
        long_run = iterations > 10000
        lr = 0.01 if long_run else round(0.002 * 5 / (4 + nc), 6)
        cfg = replace(cfg, optimizer="SGD" if long_run else "AdamW", lr0=lr, momentum=0.9, warmup_bias_lr=0.0)
    decay, no_decay, biases = [], [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if name == "bias":
                biases.append(param)
            elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                no_decay.append(param)
            else:
                decay.append(param)
    weight_decay = cfg.weight_decay * cfg.batch * nominal_accumulate(cfg) / cfg.nbs
    if cfg.optimizer == "AdamW":
        optimizer_cls, options = torch.optim.AdamW, {"betas": (cfg.momentum, 0.999)}
    elif cfg.optimizer == "SGD":
        optimizer_cls, options = torch.optim.SGD, {"momentum": cfg.momentum, "nesterov": True}
    else:
        raise DistillError(f"optimizer '{cfg.optimizer}' unknown; valid: auto, SGD, AdamW")
    groups = [
        {"params": biases, "weight_decay": 0.0, "param_group": "bias"},
        {"params": decay, "weight_decay": weight_decay, "param_group": "weight"},
        {"params": no_decay, "weight_decay": 0.0, "param_group": "bn"},
    ]
    optimizer = optimizer_cls(groups, lr=cfg.lr0, **options)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.lr0)
    return optimizer, cfg


def load_models(cfg: RunConfig, data: dict) -> tuple[nn.Module | None, nn.Module]:
    """(teacher or None when the recipe distils nothing, student with the data's class names)."""
    names = data["names"]
    teacher = load_model(cfg.teacher, "teacher", trust=cfg.trust_checkpoint) if cfg.recipe.losses else None
    student = load_model(cfg.student, "student", nc=len(names), trust=cfg.trust_checkpoint)
    if student.model[-1].nc != len(names):
        raise DistillError(
            f"student has {student.model[-1].nc} classes but the data has {len(names)}; "
            f"start from a yaml (e.g. yolov8n.yaml) or a checkpoint trained on these classes"
        )
    student.names = dict(enumerate(names.values() if isinstance(names, dict) else names))
    for name, param in student.named_parameters():  # saved checkpoints come frozen; the DFL decoder stays fixed
        param.requires_grad_(".dfl" not in name)
    if teacher is not None and str(cfg.teacher).endswith((".yaml", ".yml")):
        warnings.warn("the teacher is built from a yaml, so it is untrained; give its trained .pt", stacklevel=2)
    return teacher, student


def checked_imgsz(cfg: RunConfig, stride: int) -> RunConfig:
    size = max(stride, math.ceil(cfg.imgsz / stride) * stride)
    if size != cfg.imgsz:
        warnings.warn(f"imgsz {cfg.imgsz} is not a multiple of the stride {stride}; using {size}", stacklevel=2)
    return replace(cfg, imgsz=size)


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
    """
    checkpoint = None
    if resume is not None:
        cfg, checkpoint = load_resume(resume)
    else:
        cfg = resolve_config(cfg, recipe, **overrides)
    for key in ("teacher", "student", "data") if cfg.recipe.losses else ("student", "data"):
        if not getattr(cfg, key):
            raise DistillError(f"no {key} given; pass --{key}")
    if cfg.batch < 1 or cfg.epochs < 1:
        raise DistillError("--batch and --epochs must be at least 1")
    device = select_device(cfg.device)
    init_seeds(cfg.seed, deterministic=cfg.deterministic)
    # oneDNN's CPU convolutions are not bitwise reproducible across processes (buffer alignment picks kernels):
    # deterministic runs use PyTorch's own kernels, so that a resumed run equals an uninterrupted one bit for bit.
    torch.backends.mkldnn.enabled = not (cfg.deterministic and device.type == "cpu")
    data = load_data(cfg.data, cfg.val_split)
    teacher_model, student = load_models(cfg, data)
    stride = int(max(m.stride.max() for m in (student, teacher_model) if m is not None))
    cfg = checked_imgsz(cfg, stride)
    hyp = hyperparameters(
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        close_mosaic=cfg.close_mosaic,
        cache=cfg.cache,
        fraction=cfg.fraction,
        workers=cfg.workers,
        seed=cfg.seed,
        deterministic=cfg.deterministic,
    )
    student.args = hyp
    terms, pairs = build_terms(student, teacher_model, cfg.recipe, cfg.imgsz) if teacher_model else ({}, {})
    run_dir = Path(checkpoint["run_dir"]) if checkpoint else new_run_dir(cfg.project, cfg.name)
    train_loader = build_loader(data, "train", hyp, cfg.batch, cfg.workers, stride, train=True)
    val_loader = build_loader(data, cfg.val_split, hyp, cfg.batch * 2, cfg.workers, stride, train=False)
    student = student.to(device)
    ema = ModelEMA(student) if cfg.ema else None  # before the Distiller hooks the student
    distiller = Distiller(student, terms, pairs).to(device)
    amp_dtype, teacher_dtype = amp_dtypes(cfg, device)
    teacher_layers = sorted({p.teacher for ps in pairs.values() for p in ps})
    teacher = Teacher(teacher_model, teacher_layers, device, teacher_dtype) if teacher_model else None
    steps_per_epoch = len(train_loader)
    iterations = math.ceil(len(train_loader.dataset) / max(cfg.batch, cfg.nbs)) * cfg.epochs  # ultralytics' count
    optimizer, cfg = build_optimizer(distiller, cfg, len(data["names"]), iterations)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = TrainState(
        cfg, distiller, teacher, optimizer, scaler, ema, device, amp_dtype, steps_per_epoch, accumulate=1
    )
    state.accumulate = target_accumulate(state)
    log = RunLog(run_dir, cfg, callback)
    start_epoch = restore_state(state, checkpoint, log, train_loader) if checkpoint else 0
    log.start(pairs, count_params(student), class_names(student), start_epoch, state)
    return fit(state, log, train_loader, val_loader, hyp, start_epoch)


def fit(state: TrainState, log: RunLog, train_loader, val_loader, hyp, start_epoch: int) -> TrainResult:
    cfg = state.cfg
    start = time.time()
    stop = _install_signal_handlers()
    try:
        if start_epoch == 0:
            save_checkpoints(
                state, log, train_loader, epoch=-1, final=False
            )  # an interrupt in epoch 0 still leaves a last.pt
        for epoch in range(start_epoch, cfg.epochs):
            if epoch == max(cfg.epochs - cfg.close_mosaic, 0) or (
                epoch == start_epoch and epoch > cfg.epochs - cfg.close_mosaic
            ):
                train_loader.dataset.close_mosaic(hyp)
                train_loader.reset()
            means = train_one_epoch(
                state, _watch(train_loader, stop), epoch, lambda i, m, epoch=epoch: log.step(epoch, i, m)
            )
            due = (epoch + 1) % cfg.val_interval == 0 or epoch == cfg.epochs - 1
            model = state.ema.ema if state.ema else state.distiller.student
            metrics = validate(model, val_loader, cfg, log.run_dir, state.device) if due else {}
            log.epoch(epoch, means, metrics, [g["lr"] for g in state.optimizer.param_groups], state)
            save_checkpoints(state, log, train_loader, epoch, final=epoch == cfg.epochs - 1)
    except Interrupted:
        raise DistillError(
            f"interrupted; {log.last} holds the last completed epoch. Resume: yolodistill train --resume {log.run_dir}",
            EXIT_INTERRUPTED,
        ) from None
    finally:
        _restore_signal_handlers(stop)
    return log.finish(time.time() - start, state.skipped_steps)


def save_checkpoints(state: TrainState, log: RunLog, train_loader, epoch: int, final: bool) -> None:
    """last.pt every epoch (with resume state until the run ends), best.pt when fitness improves."""
    model = state.ema.ema if state.ema else state.distiller.student
    meta = log.metadata(epoch)
    resume = None if final else resume_state(state, epoch, log, train_loader)
    save_student(log.last, model, log.train_args, meta, resume)
    if log.improved or not log.best.exists():
        save_student(log.best, model, log.train_args, meta)


def resume_state(state: TrainState, epoch: int, log: RunLog, train_loader) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "step": state.step,
        "last_opt_step": state.last_opt_step,
        "accumulate": state.accumulate,
        "student": state.distiller.student.state_dict(),
        "terms": state.distiller.terms.state_dict(),
        "ema": state.ema.ema.state_dict() if state.ema else None,
        "ema_updates": state.ema.updates if state.ema else 0,
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "balance": dict(state.balance),
        "balance_sums": dict(state.balance_sums),
        "skipped_steps": state.skipped_steps,
        "run_dir": str(log.run_dir),
        "history": log.history,
        "best_fitness": log.best_fitness,
        "best_epoch": log.best_epoch,
        "rng": capture_rng(train_loader),
    }


def load_resume(path: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    path = Path(path)
    last = path / "weights" / "last.pt" if path.is_dir() else path
    if not last.is_file():
        raise DistillError(f"--resume {path}: no last.pt there; give a run dir or its weights/last.pt")
    ckpt = read_checkpoint(last, "checkpoint to resume", trust=False)
    resume = ckpt.get("resume")
    if not resume:
        raise DistillError(f"--resume {path}: that run finished (its last.pt holds no resume state)")
    cfg = config_from_dict(ckpt["distill"]["config"])
    return cfg, {**resume, "run_dir": resume["run_dir"]}


def restore_state(state: TrainState, ckpt: dict[str, Any], log: RunLog, train_loader) -> int:
    distiller = state.distiller
    distiller.student.load_state_dict(ckpt["student"])
    distiller.terms.load_state_dict(ckpt["terms"])
    if state.ema and ckpt["ema"] is not None:
        state.ema.ema.load_state_dict(ckpt["ema"])
        state.ema.updates = ckpt["ema_updates"]
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.step, state.last_opt_step, state.accumulate = ckpt["step"], ckpt["last_opt_step"], ckpt["accumulate"]
    state.balance, state.balance_sums = dict(ckpt["balance"]), dict(ckpt["balance_sums"])
    state.skipped_steps = ckpt["skipped_steps"]
    log.restore(ckpt["history"], ckpt["best_fitness"], ckpt["best_epoch"])
    restore_rng(ckpt["rng"], train_loader)
    return ckpt["epoch"] + 1


def _install_signal_handlers() -> dict[str, Any]:
    stop: dict[str, Any] = {"flag": False, "previous": {}}

    def handler(signum: int, frame: object) -> None:
        stop["flag"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            stop["previous"][sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return stop


def _restore_signal_handlers(stop: dict[str, Any]) -> None:
    for sig, previous in stop["previous"].items():
        signal.signal(sig, previous)


def _watch(loader, stop: dict[str, Any]):
    """Yield the loader's batches; raise Interrupted at the first step boundary after a signal."""

    class Watched:
        def __len__(self) -> int:
            return len(loader)

        def __iter__(self):
            for batch in loader:
                if stop["flag"]:
                    raise Interrupted
                yield batch

    return Watched()
