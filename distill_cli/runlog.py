"""A run's directory: config.yaml, results.csv, checkpoint metadata, best tracking, RNG state for resume."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, config_to_dict
from .errors import DistillError
from .features import Pair
from .models import atomic_write_text
from .rules import found


@dataclass
class TrainResult:
    run_dir: Path
    best: Path
    last: Path
    best_epoch: int
    best_metrics: dict[str, float]
    final_metrics: dict[str, float]
    epochs_done: int
    skipped_steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None
    start_metrics: dict[str, float] = field(default_factory=dict)  # the student before training ("epoch 0")

    @property
    def beat_start(self) -> bool | None:
        """Whether the best epoch beat the student as given (None where that is no mark: a yaml student, or one
        trained for other classes)."""
        return fitness(self.best_metrics) > fitness(self.start_metrics) if self.start_metrics else None


def new_run_dir(
    project: str | Path, name: str, what: str = "the run directory", hint: str = "--project DIR"
) -> tuple[Path, Path | None]:
    """``project/name``, or ``name2``, ``name3``... if taken: an earlier run is never overwritten; returned with the
    outermost folder above it that this made (None: none), for ``undo``. Folders above it that this made are removed
    again when it fails."""
    project = Path(project)
    made = first_missing(project)
    try:
        project.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10000):
            candidate = project / (name if n == 1 else f"{name}{n}")
            try:
                candidate.mkdir()
                return candidate, made
            except FileExistsError:
                continue
    except BaseException as e:  # an interruption too
        prune(project, made)
        if isinstance(e, OSError):
            raise DistillError(f"cannot create {what} under '{project}' ({e.strerror}); use {hint}") from e
        raise
    raise DistillError(f"no free name '{name}N' under '{project}'; give another name")


def check_creatable(folder: str | Path, what: str = "the run directory", hint: str = "--project DIR") -> Path:
    """Raise unless ``folder`` is, or could be made, a writable folder; creates nothing (commands check their output
    place first, and create it only when there is something to put in it). Returns the folder, or the innermost one
    above it that exists: where it would be made."""
    folder = Path(folder)
    missing = first_missing(folder)
    existing = missing.parent if missing else folder
    if not existing.is_dir():
        kind = "a link to nothing, or a loop of links" if found(existing) is None else "a file"
        raise DistillError(f"cannot create {what} under '{folder}' ('{existing}' is {kind}); use {hint}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DistillError(f"cannot create {what} under '{folder}' ('{existing}' is not writable); use {hint}")
    return existing


def check_out_folder(target: Path, what: str, hint: str) -> None:
    """Raise unless a new folder ``target`` (or ``target2``... beside it, where a folder is there) can be made: a file
    or a link to nothing at ``target`` is refused, not numbered beside it."""
    taken = os.path.isdir(target)  # then target2... goes beside it, in the parent
    check_creatable(target.parent if taken else target, what, hint)


@contextlib.contextmanager
def output_dir(project: str | Path, name: str, what: str, hint: str) -> Iterator[Path]:
    """A new folder ``project/name`` (or ``name2``...) for a command's output, removed again with everything in it
    when the command fails inside the block (an interruption included)."""
    folder, made = new_run_dir(project, name, what, hint)
    with removed_on_failure(folder, made):
        yield folder


@contextlib.contextmanager
def removed_on_failure(created: Path, made: Path | None) -> Iterator[None]:
    """When the block raises, an interruption included: remove ``created`` (the folder or file it makes) and the
    folders above it that the command made (up to ``made``, the outermost), so that a failed command leaves nothing
    behind."""
    try:
        yield
    except BaseException:
        undo(created, made)
        raise


def undo(created: Path, made: Path | None) -> None:
    """Remove ``created``, then the folders above it up to ``made`` while they are empty: another command started
    beside this one may have put its own run in a project folder this one made."""
    remove(created)
    prune(created.parent, made)


def prune(folder: Path, made: Path | None) -> None:
    """Remove ``folder`` and the folders above it, up to ``made``, while they are empty (None: this made none)."""
    while made is not None and (folder == made or made in folder.parents):
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else's output), or gone
            return
        folder = folder.parent


def remove(path: Path) -> None:
    """What a failed command created: a folder, or a partly written file (or a folder, for some export formats).
    Never raises: it runs while another error is on its way to the user."""
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder`` (itself included) that does not exist yet: what creating it would add. A
    link that leads nowhere (or loops) exists: nothing can be created in its place."""
    missing = None
    while found(folder) is None and not os.path.islink(folder) and folder.parent != folder:
        missing, folder = folder, folder.parent
    return missing


def optimizer_note(cfg: RunConfig, max_norm: float) -> str:
    """The start-up line of the optimizer and the clip in use (config.yaml keeps grad_clip 0 when it was auto)."""
    clip = f"gradient clip at {max_norm:g}" if math.isfinite(max_norm) else "no gradient clip"
    return f"optimizer {cfg.optimizer}, lr0 {cfg.lr0:g}, {clip}" + ("" if cfg.grad_clip else " (grad_clip auto)")


def fitness(metrics: dict[str, float]) -> float:
    """ultralytics' model-selection score (8.4: mAP50-95 alone, ``DetMetrics.fitness``), which picks best.pt."""
    return metrics.get("mAP50-95", 0.0)


def tensorboard_writer(run_dir: Path) -> Any:
    """A SummaryWriter in the run dir, or None with a warning when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(
            "--tensorboard needs the tensorboard package (pip install tensorboard); logging to CSV only", stacklevel=3
        )
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class RunLog:
    """Writes the run's files (atomically) and tells the caller what happened through ``callback(event, info)``."""

    def __init__(
        self, run_dir: Path, cfg: RunConfig, callback: Callable[[str, dict], None] | None, *, start_is_mark: bool
    ) -> None:
        self.run_dir, self.cfg, self.callback = run_dir, cfg, callback or (lambda event, info: None)
        # a .pt student for the data's classes: validated before the first step, the mark the run must beat
        self.start_is_mark = start_is_mark
        self.last, self.best = run_dir / "weights" / "last.pt", run_dir / "weights" / "best.pt"
        self.history: list[dict[str, Any]] = []
        self.best_fitness, self.best_epoch, self.improved = -1.0, -1, False
        self.config = config_to_dict(cfg)
        self.train_args = {
            "task": "detect",
            "mode": "train",
            "model": cfg.student,
            "data": cfg.data,
            "imgsz": cfg.imgsz,
            "epochs": cfg.epochs,
            "batch": cfg.batch,
            "seed": cfg.seed,
        }
        self.started = time.time()
        self.steps: list[tuple[int, dict[str, float]]] = []  # (global step, running means) at each log point
        self.steps_per_epoch = 1
        self.baseline: Any = None  # report.Baseline, measured before the first step when the report is on
        self.tensorboard: Any = None  # opened by start()

    def start(
        self,
        pairs: dict[str, list[Pair]],
        params: int,
        names: list[str],
        resumed_from: int,
        state: Any,
        precision: str,
        student_init: str,
    ) -> None:
        """``state`` (the live TrainState) is passed for API users and tests that inspect the models; ``precision``
        and ``student_init`` are a line each for the console. Called once the run's state is built (a resumed run's
        restored): a resume refused before this leaves its folder as it was."""
        self.tensorboard = tensorboard_writer(self.run_dir) if self.cfg.tensorboard else None
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=False))
        self.steps_per_epoch = state.steps_per_epoch
        info = {
            "run_dir": str(self.run_dir),
            "params": params,
            "names": names,
            "resumed_from": resumed_from,
            "pairs": {k: [p.as_dict() for p in v] for k, v in pairs.items()},
            "epochs": self.cfg.epochs,
            "precision": precision,
            "student_init": student_init,
            "optimizer": optimizer_note(self.cfg, state.max_grad_norm),
            "recipe": self.cfg.recipe_name,
            "terms": {k: v.weight for k, v in self.cfg.recipe.losses.items()},
            "state": state,
        }
        self.callback("start", info)

    def step(self, epoch: int, index: int, means: dict[str, float]) -> None:
        step = epoch * self.steps_per_epoch + index
        self.steps.append((step, means))
        if self.tensorboard:
            for key, value in means.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        self.callback("step", {"epoch": epoch, "index": index, "means": means, "total": self.steps_per_epoch})

    def step_series(self) -> tuple[list[int], dict[str, list[float]]]:
        """Each logged value over steps (NaN where a term was not active)."""
        keys = list(dict.fromkeys(k for _, means in self.steps for k in means))
        return [s for s, _ in self.steps], {k: [m.get(k, float("nan")) for _, m in self.steps] for k in keys}

    def epoch(
        self, epoch: int, means: dict[str, float], metrics: dict[str, float], lrs: list[float], state: Any
    ) -> None:
        row = {
            "epoch": epoch + 1,
            "time": round(time.time() - self.started, 2),
            **{k: round(v, 6) for k, v in means.items()},
        }
        row.update({f"val/{k}": round(v, 5) for k, v in metrics.items()})
        row.update({f"lr/pg{i}": lr for i, lr in enumerate(lrs)})
        row.update({f"balance/{k}": round(v, 6) for k, v in state.balance.items()})
        row["skipped_steps"] = state.skipped_steps
        self.history.append(row)
        self.improved = bool(metrics) and fitness(metrics) > self.best_fitness
        if self.improved:
            self.best_fitness, self.best_epoch = fitness(metrics), epoch
        self.write_csv()
        if self.tensorboard:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"epoch/{key}", value, epoch + 1)
            self.tensorboard.flush()
        self.callback("epoch", {**row, "epochs": self.cfg.epochs, "improved": self.improved})

    def write_csv(self) -> None:
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.run_dir / "results.csv", buffer.getvalue())

    def metadata(self, epoch: int) -> dict[str, Any]:
        metrics = {k[4:]: v for k, v in (self.history[-1] if self.history else {}).items() if k.startswith("val/")}
        return {
            "teacher": self.cfg.teacher,
            "recipe": self.cfg.recipe_name,
            "config": self.config,
            "epoch": epoch + 1,
            "metrics": metrics,
            "best_fitness": self.best_fitness,
        }

    def restore(self, history: list[dict[str, Any]], best_fitness: float, best_epoch: int, baseline: Any) -> None:
        self.history, self.best_fitness, self.best_epoch = list(history), best_fitness, best_epoch
        self.baseline = baseline

    def metrics_of(self, epoch: int) -> dict[str, float]:
        row = next((r for r in self.history if r["epoch"] == epoch + 1), {})
        return {k[4:]: v for k, v in row.items() if k.startswith("val/")}

    def finish(
        self, seconds: float, skipped_steps: int, report: Path | None = None, start_metrics: dict | None = None
    ) -> TrainResult:
        result = TrainResult(
            self.run_dir,
            self.best,
            self.last,
            self.best_epoch + 1,
            self.metrics_of(self.best_epoch),
            self.metrics_of(len(self.history) - 1),
            len(self.history),
            skipped_steps,
            seconds,
            self.history,
            report,
            start_metrics or {},
        )
        if self.tensorboard:
            self.tensorboard.close()
        self.callback("end", {"result": result})
        return result
