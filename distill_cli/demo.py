"""``demo``: the whole story on a drawn dataset, offline, in a few CPU minutes.

For each family (YOLOv8, and YOLO26: end-to-end, no DFL bins) a small teacher ("s") is trained briefly (1.5x the
student's epochs), then an "n" student twice for the same epochs: alone, and distilled with the default recipe. The
eval table shows the six side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import make_synthetic_dataset
from .errors import EXIT_INTERRUPTED, DistillError
from .evaluation import evaluate
from .options import DemoOptions
from .rules import api_function, check_function, validated
from .runlog import check_out_folder, output_dir
from .training import train

IMGSZ = 64  # small images, many steps: students learn reliably within the CPU budget
BATCH = 16
FAMILIES = {"YOLOv8": ("yolov8s.yaml", "yolov8n.yaml"), "YOLO26": ("yolo26s.yaml", "yolo26n.yaml")}


@api_function
def run_demo(
    out: str | Path = DemoOptions.out,
    epochs: int = DemoOptions.epochs,
    log: Callable[[str], None] | None = None,
    n_train: int = DemoOptions.n_train,
    n_val: int = DemoOptions.n_val,
    imgsz: int = DemoOptions.imgsz,
    seed: int = DemoOptions.seed,
) -> dict[str, Any]:
    """Returns the output folder, the data yaml and the eval table (per family: teacher, plain and distilled student).
    The folder (never an earlier demo's) is removed again if the demo fails or is interrupted."""
    opts = validated(DemoOptions, locals())
    check_function(log, "log", "(message)", 1)
    target = Path(opts.out)
    check_out_folder(target, "the demo folder", "--out DIR")
    try:
        with output_dir(target.parent, target.name, "the demo folder", "--out DIR") as root:
            return demo_runs(root, opts, log or (lambda message: None))
    except (KeyboardInterrupt, DistillError) as e:
        if isinstance(e, KeyboardInterrupt) or e.exit_code == EXIT_INTERRUPTED:
            raise DistillError("demo interrupted; its folder was removed: run it again", EXIT_INTERRUPTED) from None
        raise


def demo_settings(data: str, imgsz: int, epochs: int, project: Path, seed: int) -> dict[str, Any]:
    """The training options every demo run shares (benchmarks/deeper.py trains with them too)."""
    return {
        "data": data,
        "imgsz": imgsz,
        "batch": BATCH,
        "workers": 2,
        "project": str(project),
        "close_mosaic": max(1, epochs // 4),
        "warmup_epochs": 1.0,
        "nbs": BATCH,  # an optimizer step every batch: a tiny dataset needs the updates more than the smoothing
        "val_interval": 1000,
        "device": "cpu",
        "seed": seed,
    }


def demo_runs(root: Path, opts: DemoOptions, say: Callable[[str], None]) -> dict[str, Any]:
    imgsz, epochs = opts.imgsz, opts.epochs
    data = str(make_synthetic_dataset(root / "data", opts.n_train, opts.n_val, size=imgsz, seed=opts.seed))
    common = demo_settings(data, imgsz, epochs, root, opts.seed)
    rows: list[tuple[str, str]] = []
    total = 3 * len(FAMILIES)
    for i, (family, (teacher_cfg, student_cfg)) in enumerate(FAMILIES.items()):
        tag, teacher_epochs = family.lower(), epochs * 3 // 2
        say(f"[bold]{3 * i + 1}/{total}[/] training the {family} teacher ({teacher_cfg}, {teacher_epochs} epochs)")
        teacher = train(recipe="none", student=teacher_cfg, epochs=teacher_epochs, name=f"{tag}_teacher", **common)
        say(f"[bold]{3 * i + 2}/{total}[/] training the {family} student alone ({student_cfg}, {epochs} epochs)")
        plain = train(recipe="none", student=student_cfg, epochs=epochs, name=f"{tag}_student_plain", **common)
        say(f"[bold]{3 * i + 3}/{total}[/] distilling the {family} student from its teacher (default recipe)")
        distilled = train(
            recipe="default",
            teacher=str(teacher.best),
            student=student_cfg,
            epochs=epochs,
            name=f"{tag}_student_distilled",
            **common,
        )
        for run, label in ((teacher, "teacher"), (plain, "student (plain)"), (distilled, "student (distilled)")):
            rows.append((f"{family} {label}", str(run.best)))
    table = evaluate([w for _, w in rows], data, imgsz=imgsz, batch=BATCH, device="cpu")
    for row, (label, _) in zip(table, rows, strict=True):
        row["label"] = label  # "model" stays the checkpoint's path, as in eval's and compare's rows
    return {"out": str(root), "data": data, "table": table}
