"""A run's settings resolved before anything is built: config, recipe and overrides checked against the schema,
the resumed run's own config, the device, and the settings that depend on how the student starts (auto values)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from ultralytics.utils import DEFAULT_CFG

from .checkpoint import load_resume
from .config import (
    ULTRALYTICS_MAX_NORM,
    ULTRALYTICS_NBS,
    Recipe,
    RunConfig,
    load_recipe,
    names_its_terms,
)
from .distiller import uses_recipe_layers
from .errors import DistillError
from .optimizer import ADAM_FAMILY
from .overrides import apply_overrides
from .schedule import optimizer_steps, schedule_problem
from .start import fine_tunes, needs_teacher

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
        span = max(optimizer_steps(cfg, steps_per_epoch) * FINETUNE_EMA_SHARE, 1.0)
        decay, tau = min(1 - 1 / span, decay), min(0.75 * span, tau)
    return replace(cfg, ema_decay=cfg.ema_decay or decay, ema_tau=cfg.ema_tau or tau)
