"""``compare``: any set of models side by side in a report: eval table, per-class AP, PR curves, sample predictions."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from ultralytics import YOLO
from ultralytics.data.utils import IMG_FORMATS, img2label_paths

from . import plots
from .data import load_data
from .evaluation import evaluate, threads_kept
from .options import CompareOptions, EvalOptions
from .report import per_class_markdown
from .rules import api_function, validated
from .runlog import check_out_folder, output_dir

GT_COLOR = (40, 200, 40)
PRED_COLOR = (40, 60, 230)  # BGR: red


@api_function
def compare(
    weights: list[str],
    data: str,
    imgsz: int = CompareOptions.imgsz,
    batch: int = CompareOptions.batch,
    device: str = CompareOptions.device,
    split: str = CompareOptions.split,
    out: str | Path = CompareOptions.out,
    samples: int = CompareOptions.samples,
    trust_checkpoint: bool = False,
    allow_class_mismatch: bool = False,
) -> dict[str, Any]:
    """Evaluate ``weights`` on ``split`` (the same numbers as ``eval``) and write ``report.md`` with plots into a new
    folder ``out`` (or ``out2``...), which appears only when the report is complete."""
    opts = validated(CompareOptions, locals())
    target = Path(opts.out)
    check_out_folder(target, "the report folder", "--out DIR")
    rows = evaluate(**{**{f.name: getattr(opts, f.name) for f in dataclasses.fields(EvalOptions)}, "details": True})
    labels = model_labels(opts.weights)
    images = sample_images(load_data(opts.data, opts.split)[opts.split], opts.samples)
    table = [{k: v for k, v in r.items() if k not in ("per_class", "pr")} for r in rows]
    with output_dir(target.parent, target.name, "the report folder", "--out DIR") as out_dir:
        plots.pr_curves(
            {lab: (r["pr"]["recall"], r["pr"]["precision"]) for lab, r in zip(labels, rows, strict=True)},
            out_dir / "pr_curves.png",
        )
        if images:
            grid = [
                [draw_ground_truth(path)]
                + [draw_predictions(path, w, r["imgsz"]) for w, r in zip(opts.weights, rows, strict=True)]
                for path in images
            ]
            plots.image_grid(grid, ["ground truth", *labels], out_dir / "predictions.png")
        report = out_dir / "report.md"
        report.write_text(markdown(table, labels, rows, opts.data, opts.split, bool(images), out_dir))
    return {"out": str(out_dir), "report": str(report), "table": table}


def model_labels(weights: list[str]) -> list[str]:
    """Short, unique names: the file stem, with its run folder when stems repeat (best, best, ...), else the path
    as given (two runs of one name in two projects)."""
    stems = [Path(w).stem for w in weights]
    runs = [f"{Path(w).parent.parent.name}/{Path(w).stem}" if Path(w).parent.name == "weights" else w for w in weights]
    return next(labels for labels in (stems, runs, weights) if len(set(labels)) == len(labels))


def sample_images(source: str | list[str], count: int) -> list[Path]:
    """The first ``count`` images of the split that OpenCV can read (the validator skips a corrupt one too)."""
    files: list[Path] = []
    for entry in map(Path, source if isinstance(source, list) else [source]):
        named: Iterable[Path] = entry.rglob("*") if entry.is_dir() else ()
        if entry.is_file():  # a list of images, a line each; './' is beside the list, as ultralytics reads it
            lines = (line.strip() for line in entry.read_text(errors="replace").splitlines())
            named = (entry.parent / line[2:] if line.startswith("./") else Path(line) for line in lines if line)
        files += sorted(p for p in named if p.suffix[1:].lower() in IMG_FORMATS)
    readable = (path for path in files if cv2.imread(str(path)) is not None)
    return list(itertools.islice(readable, count))


def draw_ground_truth(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    height, width = image.shape[:2]
    label = Path(img2label_paths([str(path)])[0])
    try:
        lines = label.read_text().splitlines() if label.is_file() else []
    except (OSError, UnicodeDecodeError):  # a label file the validator cannot read either: drawn without boxes
        lines = []
    rows = [parsed for line in lines if (parsed := box_row(line))]
    boxes = [
        ((x - w / 2) * width, (y - h / 2) * height, (x + w / 2) * width, (y + h / 2) * height) for _, x, y, w, h in rows
    ]
    return annotate(image, boxes, [str(int(row[0])) for row in rows], GT_COLOR)


def box_row(line: str) -> tuple[float, ...] | None:
    """``class x y w h`` of a label line (of a polygon ``class x1 y1 x2 y2 ...``, its bounding box, as ultralytics'
    loader takes it), or None for a line the validator skips too (wrong count, not numbers, negative, coordinates
    outside 0-1)."""
    try:
        values = tuple(float(v) for v in line.split())
    except ValueError:
        return None
    if not np.isfinite(values).all():
        return None
    if len(values) > 6 and len(values) % 2:
        xs, ys = values[1::2], values[2::2]
        width, height = max(xs) - min(xs), max(ys) - min(ys)
        values = (values[0], min(xs) + width / 2, min(ys) + height / 2, width, height)
    valid = len(values) == 5 and all(0 <= v <= 1 for v in values[1:]) and values[0] >= 0
    return values if valid else None


def draw_predictions(path: Path, weights: str, imgsz: int) -> np.ndarray:
    """Boxes of one model (conf >= 0.25)."""
    with threads_kept():
        result = YOLO(weights, task="detect").predict(str(path), imgsz=imgsz, conf=0.25, device="cpu", verbose=False)[0]
    texts = [f"{int(c)} {p:.2f}" for c, p in zip(result.boxes.cls.tolist(), result.boxes.conf.tolist(), strict=True)]
    return annotate(cv2.imread(str(path)), result.boxes.xyxy.tolist(), texts, PRED_COLOR)


def annotate(image: np.ndarray, boxes: list, texts: list[str], color: tuple[int, int, int]) -> np.ndarray:
    """Draw xyxy boxes with OpenCV's built-in font (nothing downloaded); small images are enlarged first so that
    the labels stay readable. Returns RGB."""
    scale = max(1, round(320 / max(image.shape[:2])))
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    for (x1, y1, x2, y2), text in zip(boxes, texts, strict=True):
        top_left = (int(x1 * scale), int(y1 * scale))
        cv2.rectangle(image, top_left, (int(x2 * scale), int(y2 * scale)), color, 2)
        cv2.putText(image, text, (top_left[0], max(top_left[1] - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1)
    return image[:, :, ::-1]


def markdown(
    table: list[dict],
    labels: list[str],
    rows: list[dict],
    data: str,
    split: str,
    with_samples: bool,
    out_dir: Path,
) -> str:
    sizes = "/".join(map(str, sorted({r["imgsz"] for r in table})))  # each model at its stride's multiple
    lines = [
        f"# Model comparison on the {split} split of `{data}` (imgsz {sizes})",
        "",
        "| model | params | GFLOPs | mAP50-95 | mAP50 | ms/img |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {lab} | {r['params']:,} | {r['gflops']:.2f} | {r['mAP50-95']:.4f} | {r['mAP50']:.4f} | "
        f"{r['ms_per_img']:.2f} |"
        for lab, r in zip(labels, table, strict=True)
    ]
    per_class = {lab: r["per_class"] for lab, r in zip(labels, rows, strict=True)}
    lines += ["", *per_class_markdown(per_class, out_dir / "per_class_ap.png", "per_class_ap.png")]
    lines += ["", "## Precision-recall (IoU 0.5, mean over classes)", "", "![PR curves](pr_curves.png)", ""]
    if with_samples:
        lines += [
            "## Sample predictions (green: ground truth, red: predictions with conf >= 0.25)",
            "",
            "![predictions](predictions.png)",
            "",
        ]
    return "\n".join(lines)
