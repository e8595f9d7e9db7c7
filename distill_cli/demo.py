"""``demo``: the whole story on a drawn dataset, offline, in a few CPU minutes.

A YOLOv8s teacher is trained briefly, then a YOLOv8n student twice for the same epochs: alone, and distilled with the
default recipe. The eval table shows the three side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .data import make_synthetic_dataset
from .evaluate import evaluate
from .runlog import new_run_dir
from .train import train

IMGSZ = 128
BATCH = 16


def run_demo(out: str | Path = "runs/demo", epochs: int = 12, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = log or (lambda message: None)
    root = new_run_dir(Path(out).parent, Path(out).name)  # never reuses an earlier demo's folder
    data = str(make_synthetic_dataset(root / "data", n_train=160, n_val=48, size=IMGSZ))
    common = {"data": data, "imgsz": IMGSZ, "batch": BATCH, "workers": 2, "project": str(root), "close_mosaic": 3,
              "val_interval": 1000}
    say(f"[bold]1/3[/] training the teacher (YOLOv8s, {2 * epochs} epochs) on {data}")
    teacher = train(recipe="none", student="yolov8s.yaml", epochs=2 * epochs, name="teacher", **common)
    say("[bold]2/3[/] training the student alone (YOLOv8n, no distillation)")
    plain = train(recipe="none", student="yolov8n.yaml", epochs=epochs, name="student_plain", **common)
    say("[bold]3/3[/] distilling the student from the teacher (default recipe)")
    distilled = train(recipe="default", teacher=str(teacher.best), student="yolov8n.yaml", epochs=epochs,
                      name="student_distilled", **common)
    weights = [str(teacher.best), str(plain.best), str(distilled.best)]
    table = evaluate(weights, data, imgsz=IMGSZ, batch=BATCH, device="cpu")
    for row, label in zip(table, ("teacher", "student (plain)", "student (distilled)")):
        row["model"] = f"{label}: {row['model']}"
    return {"out": str(root), "data": data, "table": table}
