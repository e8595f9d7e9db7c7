"""Terminal output: rich tables, JSON for scripts, and the training progress display."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


json_stream: TextIO | None = None  # where --json output goes while stdout carries ultralytics' logs (cli.py)


def print_json(data: Any) -> None:
    text = json.dumps(finite_json(data), indent=2, default=str, allow_nan=False)
    (json_stream or sys.stdout).write(text + "\n")


def finite_json(value: Any) -> Any:
    """``value`` with each NaN or infinite float as None (null): JSON has no such numbers, and the ``NaN`` that
    ``json.dumps`` writes by default is refused by strict parsers (a run's losses or mAP can be NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """Numbers are never cut; in a narrow terminal text cells (paths) wrap instead of ending in an ellipsis, so two
    checkpoints of one folder stay told apart."""
    out = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        numeric = all(isinstance(row[i], (int, float)) for row in rows)
        width = max([len(column), *(len(_cell(row[i])) for row in rows)]) if numeric else None
        out.add_column(column, justify="right" if numeric else "left", min_width=width, overflow="fold")
    for row in rows:
        out.add_row(*(_cell(v) for v in row))
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)


def print_probe(report: dict[str, Any]) -> None:
    for role in ("teacher", "student"):
        rows = [
            [i["index"], i["module"], f"{i['channels']}x{i['height']}x{i['width']}", i["stride"], i["section"]]
            for i in report[role]["layers"]
        ]
        console.print(
            table(
                f"{role}: {report[role]['model']} (imgsz {report['imgsz']})",
                ["index", "module", "C x H x W", "stride", "section"],
                rows,
            )
        )
    for name, pairs in report["pairs"].items():
        rows = [[p["student"], p["teacher"], p["stride"], p["adapter"]] for p in pairs]
        selection = report["selection"][name]
        console.print(
            table(f"pairing '{name}' (layers: {selection})", ["student", "teacher", "stride", "adapter"], rows)
        )
    rows = [[name, verdict] for name, verdict in report["output_terms"].items()]
    console.print(table("output and cross-head terms on this pair", ["method", "applies?"], rows))
    console.print(f"student init from the teacher's weights (recipe init: teacher): {report['weight_selection']}")
    console.print(f"teacher scale (--recipe's teacher_scale, else the default's): {report['teacher_scale']}")
    if report["note"]:
        console.print(f"note: {report['note']}")


EVAL_COLUMNS = ["model", "params", "gflops", "mAP50-95", "mAP50", "ms_per_img"]


def print_eval(rows: list[dict[str, Any]], title: str = "evaluation") -> None:
    console.print(table(title, EVAL_COLUMNS, [[r[c] for c in EVAL_COLUMNS] for r in rows]))


class TrainProgress:
    """``train`` callback: a progress bar per epoch with the running loss terms, a line per validation."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task = None
        self.balance_shown = False

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        getattr(self, f"on_{event}")(info)

    def on_start(self, info: dict[str, Any]) -> None:
        console.print(f"[bold]run dir[/] {info['run_dir']}  student params {info['params']:,}  classes {info['names']}")
        console.print(f"  {info['precision']}")
        console.print(f"  {info['student_init']}")
        console.print(f"  {info['optimizer']}")
        terms = ", ".join(f"{k} x{w:g}" for k, w in info["terms"].items()) or "no distillation"
        console.print(f"  recipe {info['recipe']}: {terms}")
        for term, pairs in info["pairs"].items():
            if pairs:
                console.print(
                    f"  {term}: " + ", ".join(f"{p['student']}->{p['teacher']} ({p['adapter']})" for p in pairs)
                )
        if info["resumed_from"]:
            console.print(f"  resuming at epoch {info['resumed_from'] + 1}")

    def on_step(self, info: dict[str, Any]) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}", style="bold"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=info.get("total"), epoch=info["epoch"] + 1)
        means = info["means"]
        shown = {k: v for k, v in means.items() if k.endswith("_loss") or k.endswith("_w")}
        text = " ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in shown.items())
        self.progress.update(self.task, completed=info["index"] + 1, description=text, epoch=info["epoch"] + 1)

    def on_epoch(self, info: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        metrics = (
            f"mAP50-95 {info['val/mAP50-95']:.4f} mAP50 {info['val/mAP50']:.4f}" if "val/mAP50-95" in info else "no val"
        )
        mark = " *best*" if info.get("improved") else ""
        console.print(
            f"epoch {info['epoch']}/{info['epochs']}  loss {info.get('det_loss', 0):.4f} "
            f"distill {info.get('distill_loss', 0):.4f}  {metrics}{mark}"
        )
        factors = {k.removeprefix("balance/"): v for k, v in info.items() if k.startswith("balance/")}
        if factors and not self.balance_shown:
            self.balance_shown = True
            console.print("automatic balance chose: " + ", ".join(f"{k} x{v:.4g}" for k, v in factors.items()))

    def on_end(self, info: dict[str, Any]) -> None:
        result = info["result"]
        best = result.best_metrics.get("mAP50-95", float("nan"))
        start = result.start_metrics.get("mAP50-95")
        rows = [
            ["best epoch", str(result.best_epoch)],
            ["best mAP50-95", f"{best:.4f}"],
            ["best mAP50", f"{result.best_metrics.get('mAP50', float('nan')):.4f}"],
            ["change vs the starting student", f"{best - start:+.4f} (from {start:.4f})" if start is not None else "-"],
            ["time", f"{result.seconds:.1f} s"],
            ["skipped steps", str(result.skipped_steps)],
            ["best.pt", str(result.best)],
            ["report", str(result.report or "-")],
        ]
        console.print(table("training done", ["", "value"], rows))
        if result.beat_start is False:
            from .report import NO_EPOCH_BEAT_THE_START

            console.print(f"[yellow]{NO_EPOCH_BEAT_THE_START}[/]")


@contextlib.contextmanager
def json_alone_on_stdout() -> Iterator[None]:
    """With --json stdout holds the JSON alone: ultralytics writes its logs and progress bars to stdout (its errors
    at any verbosity, its first-run settings notice), so while the command runs they go to stderr, and
    ``print_json`` to the real stdout."""
    global json_stream
    json_stream = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import torch  # noqa: F401  before ultralytics, which would leave torch one thread (see __init__.py)
            from ultralytics.utils import LOGGER  # imported here first, its handler takes the redirected stream

            for handler in LOGGER.handlers:  # imported earlier, it holds the real stdout: redirect_stdout misses it
                if isinstance(handler, logging.StreamHandler) and handler.stream is json_stream:
                    handler.setStream(sys.stderr)
            yield
    finally:
        json_stream = None
