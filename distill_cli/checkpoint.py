"""Checkpoints of a run: student-only files, and the resume state that makes an interrupted run continue exactly."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, dist
from .config import RunConfig, blank_problem, config_from_dict
from .data import loader_state, restore_loader
from .engine import TrainState, trained_params
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, DistillError, sigterm_interrupts
from .models import class_names, is_model_yaml, read_checkpoint, save_student
from .report import Baseline
from .rules import is_dir, is_file, is_number, shown
from .runlock import RunLock, claim, release
from .runlog import RunLog, check_creatable, new_run_dir, undo
from .schedule import target_accumulate

# resume loads safely only, so there is no --trust-checkpoint to offer
UNSAFE_RESUME = (
    "resume reads only files that load safely (a run whose student holds code of its own, started with "
    "--trust-checkpoint, cannot be resumed: start it again)"
)


def capture_rng(loader: Any = None) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    generator = getattr(loader, "generator", None)
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], loader: Any = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loader" in state and getattr(loader, "generator", None) is not None:
        loader.generator.set_state(state["loader"])


def save_checkpoints(state: TrainState, log: RunLog, train_loader, epoch: int, final: bool) -> None:
    """last.pt every epoch (with resume state until the run ends), best.pt when fitness improves (not before the
    first epoch: epoch -1 is the resumable start of an epoch 0 that may be interrupted)."""
    model = state.ema.ema if state.ema else state.distiller.student
    meta = log.metadata(epoch)
    resume = None if final else resume_state(state, epoch, log, train_loader)
    save_student(log.last, model, log.train_args, meta, resume)
    if epoch >= 0 and (log.improved or not log.best.exists()):
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
        "bad_steps": state.bad_steps,  # skipped in a row: the stop after max_bad_steps counts across a resume
        "routine_skips": state.routine_skips,  # with steps_taken: a run that never stepped stops, resumed or not
        "steps_taken": state.steps_taken,
        "run_dir": str(log.run_dir.resolve()),
        "frozen": frozen_fingerprint(state),
        # gradients summed since the last optimizer step (an accumulation may span an epoch's end); None when none
        "grads": [p.grad for p in trained_params(state)],
        "history": log.history,
        "best_fitness": log.best_fitness,
        "best_epoch": log.best_epoch,
        "baseline": asdict(log.baseline) if log.baseline else None,
        "rng": capture_rng(train_loader),
        "loader": loader_state(train_loader),
    }


def load_resume(path: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    if not isinstance(path, (str, os.PathLike)) or blank_problem(str(path)):  # the CLI takes an empty value as none
        raise DistillError(f"--resume: give a run dir or its weights/last.pt, got {shown(path)}")
    path = Path(path)
    last = path / "weights" / "last.pt" if is_dir(path) else path
    if not is_file(last):
        raise DistillError(f"--resume {path}: no last.pt there; give a run dir or its weights/last.pt")
    ckpt = read_checkpoint(last, "checkpoint to resume", trust=False, advice=UNSAFE_RESUME)
    resume, ours = ckpt.get("resume"), ckpt.get("distill")
    if not isinstance(ours, dict) or not isinstance(ours.get("config"), dict):
        raise DistillError(f"--resume {path}: not a checkpoint of a yolodistill run; give a run dir or its last.pt")
    if not resume:
        why = "that run finished" if last.name == "last.pt" else "only a run's weights/last.pt holds it, until it ends"
        raise DistillError(f"--resume {path}: no resume state in {last.name}; {why}")
    made_by = ours.get("yolodistill_version")
    if made_by != __version__:  # the training state (optimizer groups, balance, config fields) differs between versions
        raise DistillError(
            f"--resume {path}: that run was started by yolodistill {made_by} and this is {__version__}; finish it with "
            f"{made_by}, or start it again"
        )
    cfg = config_from_dict(ours["config"])
    if cfg.recipe is None:  # every run saves the recipe it resolved
        raise DistillError(f"--resume {path}: its config holds no recipe; give the run dir of a yolodistill run")
    state = resume if isinstance(resume, dict) else {}  # an edited file may hold anything
    saved = state.get("run_dir")
    run_dir = resumed_run_dir(last, saved) if state and isinstance(saved, (str, type(None))) else None
    epoch = state.get("epoch")
    if run_dir is None or not isinstance(epoch, int) or not -1 <= epoch < cfg.epochs - 1:
        raise DistillError(f"--resume {path}: its resume state is incomplete; give the run dir of a yolodistill run")
    if not is_dir(run_dir):  # a last.pt moved out of its weights folder goes on in its run's folder
        raise DistillError(
            f"--resume {path}: the folder its run started in, '{run_dir}', is not found; put this file in a folder "
            f"as <folder>/weights/last.pt and resume <folder>"
        )
    damage = counters_problem(state)
    if damage:
        raise DistillError(f"--resume {path}: its resume state is damaged ({damage}); start a new run")
    own = run_dir / "weights" / "last.pt"
    if own.exists() and not own.samefile(last):  # a copy of last.pt would write over the run that went on without it
        raise DistillError(
            f"--resume {path}: its run folder '{run_dir}' holds its own last.pt; resume '{run_dir}', or copy that "
            f"folder with this file as its weights/last.pt and resume the copy"
        )
    read = last.stat()  # RunGuard checks, once it holds the run's lock, that the run did not move on since
    model = ckpt.get("model")  # the EMA (or the student), as YOLO() reads it
    names = getattr(model, "names", None) if isinstance(model, torch.nn.Module) else None
    names = class_names(model) if isinstance(names, (dict, list)) else None  # check_resumed_classes reads them
    return cfg, {**resume, "run_dir": str(run_dir), "read": (str(last), read.st_ino, read.st_mtime_ns), "names": names}


SKIP_COUNTS = ("routine_skips", "steps_taken")


def counters_problem(state: dict[str, Any]) -> str | None:
    """Why the saved step counters are none a run writes (an edited file), or None: a negative step or an
    accumulation of 0 trained on, with the warm-up and the optimizer steps out of place; more steps skipped in a row
    than skipped in all moved the stop after ``max_bad_steps``; more back-offs than skips, or more steps taken than
    steps not skipped, moved the stop of a run that never stepped."""
    names = ("step", "last_opt_step", "accumulate", "skipped_steps", "bad_steps", *SKIP_COUNTS)
    counters = {k: state.get(k) for k in names}
    for name, value in counters.items():
        if type(value) is not int:
            return f"{name} {shown(value)} is no whole number"
    step, last, accumulate, skipped, in_a_row, routine, taken = counters.values()
    bounds = {
        "step": step >= 0,
        "last_opt_step": -1 <= last < max(step, 0),
        "accumulate": accumulate >= 1,
        "skipped_steps": 0 <= skipped <= step,
        "bad_steps": 0 <= in_a_row <= skipped,
        "routine_skips": 0 <= routine <= skipped,
        "steps_taken": 0 <= taken <= step - skipped,  # a step is skipped, or taken, or in an accumulation
    }
    bad = next((name for name, ok in bounds.items() if not ok), None)
    if bad is None:
        return None
    return f"step {step}" if bad == "step" else f"{bad} {counters[bad]} at step {step}"


def moved_on(last: str, inode: int, mtime_ns: int) -> bool:
    """Whether ``last`` is no longer the file read (checkpoints are replaced by a rename: a new inode)."""
    try:
        now = os.stat(last)
    except OSError:
        return True
    return (now.st_ino, now.st_mtime_ns) != (inode, mtime_ns)


def resumed_run_dir(last: Path, saved: str | None) -> Path | None:
    """The run continues in the folder that holds its last.pt, wherever that folder is now, named as the user named
    it where that names it (a new run's paths are as --project gives them, so --json names both alike), else
    absolute (``--resume .`` from inside it); the saved run dir only for a last.pt moved out of its weights folder."""
    weights = Path(os.path.abspath(last)).parent
    if weights.name != "weights":
        return Path(saved) if saved else None
    named = last.parent.parent
    return named if last.parent.name == "weights" and named.name not in ("", "..") else weights.parent


def check_resumed_classes(checkpoint: dict[str, Any] | None, student: torch.nn.Module) -> None:
    """A resumed run's data yaml names the classes it trained for: the same number renamed or reordered loaded
    without a word (best.pt kept the old names, last.pt took the new); another number failed on the layers' sizes."""
    then, now = (checkpoint or {}).get("names"), class_names(student)
    if then is None or then == now:
        return
    i = next(i for i, pair in enumerate(itertools.zip_longest(then, now)) if pair[0] != pair[1])
    was, named = (repr(names[i]) if i < len(names) else "none" for names in (then, now))
    raise DistillError(
        f"--resume {checkpoint['run_dir']}: the run trained for {len(then)} classes and its data yaml now names "
        f"{len(now)} (class {i}: {was} then, {named} now); put the yaml's names back, or start a new run"
    )


def restore_state(state: TrainState, ckpt: dict[str, Any], log: RunLog | None, train_loader) -> int:
    """The run's state from its last.pt; the epoch to go on with. A state that does not fit the run as built now
    (the data's classes changed, the file was edited) is bad input."""
    try:
        return load_state(state, ckpt, log, train_loader)
    except (LookupError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "state_dict" not in str(e):  # out of memory, a device error: no bad input
            raise
        lines = str(e).splitlines() or [type(e).__name__]
        detail = next((line.strip() for line in lines if "size mismatch" in line), lines[0])[:160]
        raise DistillError(
            f"--resume {ckpt['run_dir']}: its saved state does not fit the run as built now (did the data yaml's "
            f"classes or the models change?): {detail}; start a new run"
        ) from e


def progress_problem(ckpt: dict[str, Any], cfg: RunConfig, steps_per_epoch: int) -> str | None:
    """Why the saved progress is none this run writes at its saved epoch (an edited file, or a train split that
    changed size since), or None: each trained on with the schedules, the EMA's decay or best.pt out of place."""
    epoch, step, accumulate = ckpt["epoch"], ckpt["step"], ckpt["accumulate"]
    if step != (epoch + 1) * steps_per_epoch:  # last.pt is written at the run's start and at each epoch's end
        where = f"epoch {epoch + 1} ends at {steps_per_epoch} steps an epoch"
        return f"step {step} is not where {where}: did the train split or the number of processes change?"
    target = target_accumulate(cfg, steps_per_epoch)
    if accumulate > target:
        return f"accumulate {accumulate} is above the run's {target}"
    updates, fitness, best = ckpt["ema_updates"], ckpt["best_fitness"], ckpt["best_epoch"]
    if type(updates) is not int or not 0 <= updates <= step:  # one EMA update per optimizer step
        return f"ema_updates {shown(updates)} at step {step}"
    if not is_number(fitness) or not (fitness == -1 or 0 <= fitness <= 1) or type(best) is not int:
        return f"best_fitness {shown(fitness)} or best_epoch {shown(best)} is no fitness or epoch"
    if not -1 <= best <= epoch:
        return f"best_epoch {best} at epoch {epoch}"
    return balance_problem(ckpt["balance"], ckpt["balance_sums"], set(cfg.recipe.losses))


def balance_problem(balance: Any, sums: Any, terms: set[str]) -> str | None:
    """Why the saved automatic balance is none a run writes, or None: factors (term -> a positive number) and the
    calibration's sums (term or det_loss -> [sum, count > 0])."""
    if not isinstance(balance, dict) or not isinstance(sums, dict):
        return "balance or balance_sums is no mapping"
    for name, factor in balance.items():
        if name not in terms or not is_number(factor) or not 0 < factor < math.inf:
            return f"balance of {shown(name)}: {shown(factor)}"
    for name, pair in sums.items():
        numbers = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(is_number(v) for v in pair)
        if name not in terms | {"det_loss"} or not numbers or not math.isfinite(sum(pair)) or pair[1] <= 0:
            return f"balance_sums of {shown(name)}: {shown(pair)}"
    return None


def frozen_fingerprint(state: TrainState) -> list[float] | None:
    """A sum over the weights of each frozen model the run distils from (the teacher, then the student as given where
    the run keeps it), as loaded: a resume that loaded other files in their place went on distilling from them without
    a word. None for a teacher built from a yaml (random, and per rank: an untrained teacher's smoke test)."""
    if state.teacher is None or is_model_yaml(state.cfg.teacher):
        return None
    return state.teacher.fingerprint


def check_frozen_models(ckpt: dict[str, Any], state: TrainState) -> None:
    """Refuse a resume whose teacher (or kept start) is not the model the run began with; a last.pt before 0.3.32
    holds no sums. Every rank decides together: one refusing alone would leave the others waiting."""
    saved, now = ckpt.get("frozen"), frozen_fingerprint(state)
    changed = []  # which models differ: 0 the teacher, 1 the start
    if saved is not None and now is not None:
        fits = isinstance(saved, list) and len(saved) == len(now)
        pairs = zip(saved, now, strict=True) if fits else [(None, None)]  # a damaged list: say the teacher
        changed = [i for i, (a, b) in enumerate(pairs) if not (is_number(a) and math.isclose(a, b, rel_tol=1e-9))]
    if dist.all_agree(not changed, state.device):
        return
    changed = changed or [0]  # another rank's: the same files, so the same one
    which = "the teacher" if changed[0] == 0 else "the student as given (distilled beside the teacher)"
    raise DistillError(
        f"--resume {ckpt['run_dir']}: {which} is not the model the run began with (was its file replaced?); put that "
        "file back to resume the run"
    )


def load_state(state: TrainState, ckpt: dict[str, Any], log: RunLog | None, train_loader) -> int:
    check_frozen_models(ckpt, state)
    problem = progress_problem(ckpt, state.cfg, state.steps_per_epoch)
    if problem:
        raise DistillError(
            f"--resume {ckpt['run_dir']}: its saved progress does not fit the run as built now ({problem}); start a "
            f"new run"
        )
    distiller = state.distiller
    distiller.student.load_state_dict(ckpt["student"])
    distiller.terms.load_state_dict(ckpt["terms"])
    if state.ema and ckpt["ema"] is not None:
        state.ema.ema.load_state_dict(ckpt["ema"])
        state.ema.updates = ckpt["ema_updates"]
    state.optimizer.load_state_dict(ckpt["optimizer"])
    for param, grad in zip(trained_params(state), ckpt["grads"], strict=True):
        param.grad = None if grad is None else grad.to(param.device)
    if ckpt["scaler"]:  # empty when the scaler is off (bf16, fp32)
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step, state.last_opt_step, state.accumulate = ckpt["step"], ckpt["last_opt_step"], ckpt["accumulate"]
    state.balance, state.balance_sums = dict(ckpt["balance"]), dict(ckpt["balance_sums"])
    state.skipped_steps, state.bad_steps = ckpt["skipped_steps"], ckpt["bad_steps"]
    state.routine_skips, state.steps_taken = (ckpt[k] for k in SKIP_COUNTS)
    if log is not None:  # rank 0 only
        if not isinstance(ckpt["history"], list) or not all(isinstance(row, dict) for row in ckpt["history"]):
            raise TypeError("its history is not a list of epoch rows")  # read later, far from here
        baseline = Baseline.from_dict(ckpt["baseline"]) if ckpt.get("baseline") else None
        log.restore(ckpt["history"], ckpt["best_fitness"], ckpt["best_epoch"], baseline)
    restore_loader(train_loader, ckpt.get("loader"), ckpt["epoch"] + 1)
    restore_rng(ckpt["rng"], train_loader)
    return ckpt["epoch"] + 1


def resumable(last: Path) -> bool:
    """Whether ``last`` is an unfinished run's last.pt (it holds the resume state)."""
    try:
        return last.is_file() and bool(read_checkpoint(last, "checkpoint", trust=False).get("resume"))
    except DistillError:
        return False


class RunGuard:
    """The run directory of a new run appears once the run is ready to train, and goes away again if the run fails
    before its first checkpoint: nothing half-made is left. During start-up SIGTERM interrupts as SIGINT does; an
    interruption before the first checkpoint says that nothing was saved. A resumed run's directory stays."""

    def __init__(self, cfg: RunConfig, checkpoint: dict[str, Any] | None, is_main: bool = True) -> None:
        self.project = None if checkpoint else cfg.project
        self.run_dir: Path | None = Path(checkpoint["run_dir"]) if checkpoint else None
        self.created, self.made, self.is_main = False, None, is_main
        self.mark: RunLock | None = None  # rank 0's lock on the run folder (runlock.claim)
        self.read = checkpoint.get("read") if checkpoint else None  # the last.pt resumed, as it was read
        self.signals = contextlib.ExitStack()

    def create(self, project: str, name: str) -> Path:
        self.run_dir, self.made = new_run_dir(project, name)  # made: the project folder too, if this run creates it
        self.created = True
        self.mark = claim(self.run_dir)
        return self.run_dir

    def __enter__(self) -> RunGuard:
        if self.project is not None:
            check_creatable(self.project)
        if self.run_dir is not None and self.is_main:  # a resume: refused while another process trains the run
            self.mark = claim(self.run_dir)
            if self.read and moved_on(*self.read):  # it finished or saved an epoch while this one started
                release(self.mark)
                raise DistillError(f"'{self.run_dir}' saved another epoch while this resume started; resume it again")
        self.signals.enter_context(sigterm_interrupts())
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        self.signals.close()
        release(self.mark)
        if exc_type is None or self.run_dir is None:
            return self._interrupted(None) if exc_type and issubclass(exc_type, KeyboardInterrupt) else False
        last = self.run_dir / "weights" / "last.pt"
        if self.created and not last.is_file():
            undo(self.run_dir, self.made)
            return self._interrupted(None) if issubclass(exc_type, KeyboardInterrupt) else False
        can_resume = resumable(last)
        if issubclass(exc_type, KeyboardInterrupt):
            return self._interrupted(self.run_dir if can_resume else None, finished=not can_resume)
        told = isinstance(exc, DistillError) and (
            exc.exit_code == EXIT_INTERRUPTED or (exc.exit_code == EXIT_USAGE and not self.created)
        )  # it said how to resume, or a resume was refused: "resume" would contradict it
        if can_resume and not told:
            warnings.warn(f"{last} is kept; resume: yolodistill train --resume {self.run_dir}", stacklevel=2)
        return False

    def _interrupted(self, resume_dir: Path | None, finished: bool = False) -> bool:
        if resume_dir is not None:
            message = f"interrupted; resume: yolodistill train --resume {resume_dir}"
        elif finished:
            message = f"interrupted after the last epoch; the weights in {self.run_dir}/weights are complete"
        else:
            message = (
                "interrupted before the first checkpoint: nothing was saved (no run folder is left); "
                "start again with the same command"
            )
        raise DistillError(message, EXIT_INTERRUPTED) from None
