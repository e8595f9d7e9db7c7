"""``demo``: the whole story on a drawn dataset, offline, in a few CPU minutes.

A YOLOv8s teacher is trained briefly (1.5x the student's epochs), then a YOLOv8n student twice for the same
epochs: alone, and distilled with the default recipe. The eval table shows the three side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import DemoOptions
from .data import make_synthetic_dataset
from .errors import EXIT_INTERRUPTED, DistillError
from .evaluation import evaluate
from .rules import validated
from .runlog import check_creatable, output_dir
from .training import train

IMGSZ = 64  # small images, many steps: students learn reliably within the CPU budget
BATCH = 16


def run_demo(
    out: str | Path = DemoOptions.out,
    epochs: int = DemoOptions.epochs,
    log: Callable[[str], None] | None = None,
    n_train: int = DemoOptions.n_train,
    n_val: int = DemoOptions.n_val,
    imgsz: int = DemoOptions.imgsz,
) -> dict[str, Any]:
    """Returns the output folder, the data yaml and the eval table (teacher, plain student, distilled student).
    The folder (never an earlier demo's) is removed again if the demo fails or is interrupted."""
    opts = validated(DemoOptions, locals())
    target = Path(opts.out)
    check_creatable(target.parent, "the demo folder", "--out DIR")
    try:
        with output_dir(target.parent, target.name, "the demo folder", "--out DIR") as root:
            return demo_runs(root, opts, log or (lambda message: None))
    except (KeyboardInterrupt, DistillError) as e:
        if isinstance(e, KeyboardInterrupt) or e.exit_code == EXIT_INTERRUPTED:
            raise DistillError("demo interrupted; its folder was removed: run it again", EXIT_INTERRUPTED) from None
        raise


def demo_runs(root: Path, opts: DemoOptions, say: Callable[[str], None]) -> dict[str, Any]:
    imgsz, epochs = opts.imgsz, opts.epochs
    data = str(make_synthetic_dataset(root / "data", n_train=opts.n_train, n_val=opts.n_val, size=imgsz))
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
