"""What distillation did, per run: report.md with loss, mAP, schedule, per-class AP and feature-agreement plots."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import plots
from .config import RunConfig
from .engine import TrainState, preprocess, validate
from .evaluation import Validation
from .features import as_rows
from .models import atomic_write_text, class_names
from .runlog import fitness
from .schedule import weight_factor

NO_EPOCH_BEAT_THE_START = (
    "No epoch beat the student you started from: keep your own checkpoint (best.pt is the best trained epoch)."
)
AGREEMENT_BATCHES = 2
AGREEMENT_ROWS = 4096  # positions sampled per pair: CKA needs a few thousand, not every pixel


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., ICML 2019) of (n, p) and (n, q) representations:
    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` after centring columns. 1 = same up to rotation and scale."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp(min=1e-12))


@torch.no_grad()
def feature_agreement(state: TrainState, loader) -> dict[str, float]:
    """CKA between each adapted student map and its teacher map on a few validation batches, keyed 'term s->t'."""
    distiller = state.distiller
    feature_terms = {n: m for n, m in distiller.terms.items() if isinstance(m, nn.ModuleList) and len(m)}
    if state.teacher is None or not feature_terms:
        return {}
    student, was_training = distiller.student, distiller.student.training
    student.eval()
    pairs: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    generator = torch.Generator().manual_seed(0)
    try:
        for batch in islice(loader, AGREEMENT_BATCHES):
            images = preprocess(batch, state.device)["img"]
            teacher_maps = state.teacher.features(images)
            student(images)
            feats = distiller.hooks.pop()
            for name, losses in feature_terms.items():
                for loss, pair in zip(losses, distiller.pairs[name], strict=True):
                    s, t = (
                        as_rows(loss.adapter(feats[pair.student]).float()),
                        as_rows(teacher_maps[pair.teacher].float()),
                    )
                    keep = torch.randperm(len(s), generator=generator)[:AGREEMENT_ROWS].to(s.device)
                    bucket = pairs.setdefault(f"{name} {pair.student}->{pair.teacher}", ([], []))
                    bucket[0].append(s[keep].cpu())
                    bucket[1].append(t[keep].cpu())
    finally:
        student.train(was_training)
    return {key: linear_cka(torch.cat(s), torch.cat(t)) for key, (s, t) in pairs.items()}


@dataclass
class Baseline:
    """Measured before the first step: teacher and starting student on the validation split, feature agreement."""

    teacher: Validation | None
    before: Validation
    agreement: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        """Back from ``dataclasses.asdict`` (as stored in last.pt for a resumed run's report)."""
        teacher = Validation(**data["teacher"]) if data["teacher"] else None
        return cls(teacher, Validation(**data["before"]), dict(data["agreement"]))


def measure_baseline(state: TrainState, teacher_model: torch.nn.Module | None, loader, full: bool) -> Baseline:
    """The starting student ("epoch 0"); with ``full`` (the report) also the teacher, validated only when it predicts
    the student's classes (else its mAP here means nothing), and the feature agreement."""
    student = state.ema.ema if state.ema else state.distiller.student
    before = validate(student, loader, state.cfg, state.device)
    if not full:
        return Baseline(None, before)
    same_classes = teacher_model is not None and class_names(teacher_model) == class_names(student)
    teacher = validate(teacher_model, loader, state.cfg, state.device) if same_classes else None
    return Baseline(teacher, before, feature_agreement(state, loader))


@dataclass
class RunOutcome:
    """What report.md reads, gathered when a run ends: its results and settings, no training state."""

    run_dir: Path
    cfg: RunConfig
    log: Any  # the RunLog: history, step series, best epoch
    baseline: Baseline
    final: Validation | None  # the last epoch's validation
    agreement_after: dict[str, float]  # feature_agreement after training
    balance: dict[str, float]  # each term's automatic factor, as it ended
    steps_per_epoch: int


def write_report(run: RunOutcome) -> Path:
    """report.md and its PNGs (``report/``) in the run dir, both or neither: the PNGs are drawn into a hidden folder
    that becomes ``report/`` once all are drawn (a failed or interrupted drawing leaves nothing). Returns the path."""
    partial, figures, path = (run.run_dir / name for name in (".report-partial", "report", "report.md"))
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        text = report_text(run, partial)
        shutil.rmtree(figures, ignore_errors=True)
        partial.rename(figures)
        atomic_write_text(path, text)
    except BaseException:  # a stop or a full disk between the two: no figures without their report.md
        shutil.rmtree(figures, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return path


def report_text(run: RunOutcome, figures: Path) -> str:
    """report.md's text; its figures are drawn into ``figures`` (the markdown names them under report/)."""
    cfg, log, baseline, final = run.cfg, run.log, run.baseline, run.final
    lines = [
        f"# Distillation report: {run.run_dir.name}",
        "",
        f"teacher `{cfg.teacher or '-'}` -> student `{cfg.student}`, recipe `{cfg.recipe_name}`, data `{cfg.data}`, "
        f"{cfg.epochs} epochs at imgsz {cfg.imgsz}, batch {cfg.batch}",
        "",
    ]
    lines += summary_table(baseline, final, log)
    steps, series = log.step_series()
    if steps:
        plots.loss_curves(steps, series, figures / "losses.png")
        lines += ["## Loss terms", "", "![losses](report/losses.png)", ""]
    start = {"epoch": 0, **{f"val/{k}": v for k, v in baseline.before.metrics.items()}}  # the student as given
    validated = [start, *(row for row in log.history if "val/mAP50-95" in row)]
    if len(validated) > 1:
        teacher = baseline.teacher.metrics if baseline.teacher else {}
        plots.metric_curves(
            [r["epoch"] for r in validated],
            {k: [r[f"val/{k}"] for r in validated] for k in ("mAP50-95", "mAP50")},
            teacher,
            figures / "metrics.png",
        )
        lines += ["## Validation mAP", "", "![metrics](report/metrics.png)", ""]
    if cfg.recipe.losses:
        plots.schedules(*schedule_series(run), run.steps_per_epoch, figures / "schedules.png")
        lines += ["## Distillation weights", "", "![schedules](report/schedules.png)", ""]
    lines += per_class_section(baseline, final, figures)
    lines += agreement_section(baseline.agreement, run.agreement_after, figures)
    return "\n".join(lines) + "\n"


def summary_table(baseline: Baseline, final: Validation | None, log: Any) -> list[str]:
    """The teacher and the student before and after; a fine-tune that no epoch improved says to keep the student
    given (a yaml student's start, or one whose class layers are new, is no checkpoint of the user's)."""
    rows = [("teacher", baseline.teacher), ("student before", baseline.before), ("student after (last epoch)", final)]
    lines = ["| model | mAP50-95 | mAP50 |", "|---|---|---|"]
    lines += [f"| {name} | {v.metrics['mAP50-95']:.4f} | {v.metrics['mAP50']:.4f} |" for name, v in rows if v]
    lines += ["", f"Best epoch {log.best_epoch + 1} (fitness {log.best_fitness:.4f}); `weights/best.pt`."]
    if log.start_is_mark and log.best_fitness <= fitness(baseline.before.metrics):
        lines.append(NO_EPOCH_BEAT_THE_START)
    return [*lines, ""]


def schedule_series(run: RunOutcome) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    cfg = run.cfg
    steps = np.arange(cfg.epochs * run.steps_per_epoch)
    weights = {
        name: np.array(
            [
                spec.weight
                * run.balance.get(name, 1.0)
                * weight_factor(spec.schedule, int(s), cfg.epochs, run.steps_per_epoch)
                for s in steps
            ]
        )
        for name, spec in cfg.recipe.losses.items()
    }
    return steps, weights


def per_class_section(baseline: Baseline, final: Validation | None, figures: Path) -> list[str]:
    runs = {"teacher": baseline.teacher, "student before": baseline.before, "student after": final}
    per_class = {k: v.per_class for k, v in runs.items() if v is not None and v.per_class}
    return per_class_markdown(per_class, figures / "per_class_ap.png", "report/per_class_ap.png") if per_class else []


def per_class_markdown(per_class: dict[str, dict[str, float]], figure: Path, link: str) -> list[str]:
    """Bars (written to ``figure``) and a table of per-class AP50-95, one column per model."""
    classes = list(next(iter(per_class.values())))
    series = {model: [aps.get(c, 0.0) for c in classes] for model, aps in per_class.items()}
    plots.grouped_bars(classes, series, "AP50-95", "per-class AP", figure)
    lines = [
        "## Per-class AP50-95",
        "",
        f"![per-class AP]({link})",
        "",
        "| class | " + " | ".join(per_class) + " |",
        "|---" * (len(per_class) + 1) + "|",
    ]
    lines += [f"| {c} | " + " | ".join(f"{aps.get(c, 0.0):.4f}" for aps in per_class.values()) + " |" for c in classes]
    return [*lines, ""]


def agreement_section(before: dict[str, float], after: dict[str, float], figures: Path) -> list[str]:
    if not before:
        return []
    keys = list(before)
    plots.grouped_bars(
        keys,
        {"before": [before[k] for k in keys], "after": [after.get(k, 0.0) for k in keys]},
        "linear CKA",
        "adapted student vs teacher features",
        figures / "feature_agreement.png",
    )
    lines = [
        "## Feature agreement (linear CKA, adapted student vs teacher)",
        "",
        "![feature agreement](report/feature_agreement.png)",
        "",
        "| pair | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {before[k]:.4f} | {after.get(k, float('nan')):.4f} |" for k in keys]
    return [*lines, ""]
