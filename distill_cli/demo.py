"""``demo``: the whole story on a drawn dataset, offline, in a few CPU minutes.

A YOLOv8s teacher is trained briefly (1.5x the student's epochs), then a YOLOv8n student twice for the same
epochs: alone, and distilled with the default recipe. The eval table shows the three side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import make_synthetic_dataset
from .evaluation import evaluate
from .runlog import new_run_dir
from .training import train

IMGSZ = 64  # small images, many steps: students learn reliably within the CPU budget
BATCH = 16


def run_demo(
    out: str | Path = "runs/demo",
    epochs: int = 20,
    log: Callable[[str], None] | None = None,
    n_train: int = 256,
    n_val: int = 64,
    imgsz: int = IMGSZ,
) -> dict[str, Any]:
    """Returns the output folder, the data yaml and the eval table (teacher, plain student, distilled student)."""
    say = log or (lambda message: None)
    root = new_run_dir(Path(out).parent, Path(out).name)  # never reuses an earlier demo's folder
    data = str(make_synthetic_dataset(root / "data", n_train=n_train, n_val=n_val, size=imgsz))
    common = {
        "data": data,
        "imgsz": imgsz,
        "batch": BATCH,
        "workers": 2,
        "project": str(root),
        "close_mosaic": max(1, epochs // 4),
        "warmup_epochs": 1.0,
        "nbs": BATCH,  # an optimizer step every batch: a tiny dataset needs the updates more than the smoothing
        "val_interval": 1000,
        "device": "cpu",
    }
    teacher_epochs = epochs * 3 // 2
    say(f"[bold]1/3[/] training the teacher (YOLOv8s, {teacher_epochs} epochs) on {data}")
    teacher = train(recipe="none", student="yolov8s.yaml", epochs=teacher_epochs, name="teacher", **common)
    say("[bold]2/3[/] training the student alone (YOLOv8n, no distillation)")
    plain = train(recipe="none", student="yolov8n.yaml", epochs=epochs, name="student_plain", **common)
    say("[bold]3/3[/] distilling the student from the teacher (default recipe)")
    distilled = train(
        recipe="default",
        teacher=str(teacher.best),
        student="yolov8n.yaml",
        epochs=epochs,
        name="student_distilled",
        **common,
    )
    weights = [str(teacher.best), str(plain.best), str(distilled.best)]
    table = evaluate(weights, data, imgsz=imgsz, batch=BATCH, device="cpu")
    for row, label in zip(table, ("teacher", "student (plain)", "student (distilled)"), strict=True):
        row["weights"], row["model"] = row["model"], label
    return {"out": str(root), "data": data, "table": table}
