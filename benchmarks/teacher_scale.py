"""The teacher on images shrunk to a student's size, seen as they are and upsampled (recipe ``teacher_scale``).

Each split image is shrunk (bilinear) so that its long side is the student's size, then ultralytics validates the
teacher on it at that size and at the (largest) view ``auto`` picks (or ``--scale``; letterboxing upsamples, ``rect``
batches as ``YOLO.val``): what the teacher could teach a student trained at that size. Then the head that training
reads: ``distiller.Teacher`` at scale 1 and at that scale on square letterboxed batches (as training's), its head
decoded on the student's anchors as a Detect head decodes its own; above 1 that is the mapped head of
``distill_cli/teacher_scale.py`` (with views joined by +, their average), so the column checks the mapping end to
end. No training; about two minutes per size on 2 CPU cores.

    python benchmarks/teacher_scale.py --sizes 256 288 320 352 384 416 --out teacher-scale.json [--scale 2 | 1+2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
import yaml  # noqa: E402
from gain import BCCD, TEACHER  # noqa: E402  (benchmarks/ is the script's folder: gain.py's data and models)
from PIL import Image  # noqa: E402
from ultralytics import YOLO  # noqa: E402

from distill_cli.config import TEACHER_SCALE_TEXT, load_recipe, teacher_scale_problem  # noqa: E402
from distill_cli.distiller import Teacher  # noqa: E402
from distill_cli.evaluation import run_validator  # noqa: E402
from distill_cli.models import load_model  # noqa: E402
from distill_cli.teacher_scale import resolved, view_scales, view_size  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--data", default=BCCD)
    p.add_argument("--split", default="val")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 288, 320, 352, 384, 416])
    p.add_argument("--scale", help="the teacher's scale or views, as teacher_scale (default: what auto picks, else 2)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.scale is not None and (teacher_scale_problem(args.scale) or max(view_scales(args.scale)) == 1):
        p.error(f"--scale must be {TEACHER_SCALE_TEXT}, not auto, with a view above 1")
    return args


def shrunk_split(data: str, split: str, size: int, root: Path) -> Path:
    """A data yaml whose split is every image of ``split`` shrunk to a long side of ``size``, labels as they are."""
    spec = yaml.safe_load(Path(data).read_text())
    base = Path(data).parent / spec.get("path", ".")
    images = base / spec[split]
    (root / "images").mkdir(parents=True)
    (root / "labels").symlink_to(images.parent.parent / "labels" / images.name)
    for path in sorted(images.iterdir()):
        with Image.open(path) as image:
            ratio = size / max(image.size)
            shrunk = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.BILINEAR)
            shrunk.save(root / "images" / path.name, quality=95)
    out = root / "data.yaml"
    out.write_text(yaml.safe_dump({"path": str(root), "train": "images", "val": "images", "names": spec["names"]}))
    return out


def training_view(teacher: str, scale: str, data: Path, size: int) -> float:
    """mAP50-95 of the head a training step reads from ``distiller.Teacher`` at ``scale`` (a teacher_scale), decoded
    on the student's anchors; the validator sees a teacher model whose forward is that (square batches, as training
    letterboxes)."""
    model = load_model(teacher, "teacher")
    viewed = Teacher(copy.deepcopy(model), [], torch.device("cpu"), torch.float32, view_scales(scale))

    def forward(x: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, dict]:
        head = viewed(x).head["one2many"]
        return viewed.head._inference(head), head  # the Detect head's own decode, on the student's grid

    model.forward = forward  # an instance attribute: the validator's backend calls it as the model's forward
    split = {"data": str(data), "imgsz": size, "batch": 16, "device": "cpu", "split": "val", "rect": False}
    return run_validator(model, split).metrics["mAP50-95"]


def upsampled(args: argparse.Namespace, teacher: torch.nn.Module, size: int) -> str:
    """``--scale``, else the teacher_scale auto picks for a student at ``size`` (2 where it picks 1, to show the
    view)."""
    if args.scale:
        return args.scale
    scale = resolved(load_recipe("default"), size, teacher).teacher_scale
    return scale if scale != "1" else "2"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    teacher = load_model(args.teacher, "teacher")
    rows = []
    for size in args.sizes:
        scale = upsampled(args, teacher, size)
        view = view_size((size, size), max(view_scales(scale)), int(teacher.stride.max()))[0]
        with tempfile.TemporaryDirectory() as folder:
            data = shrunk_split(args.data, args.split, size, Path(folder) / "split")
            scores = {
                at: YOLO(args.teacher).val(data=str(data), imgsz=at, batch=16, device="cpu", plots=False).box.map
                for at in (size, view)
            }
            seen = {s: training_view(args.teacher, s, data, size) for s in ("1", scale)}
        rows.append(
            {"size": size, "scale": scale, "view": view, "as_is": scores[size], "at_view": scores[view]}
            | {"head_1": seen["1"], "head_scaled": seen[scale]}
        )
        print(
            f"{size}: teacher {scores[size]:.4f} as is, {scores[view]:.4f} at {view}; the head training reads"
            f" (square batches): {seen['1']:.4f} at teacher_scale 1, {seen[scale]:.4f} at {scale}",
            flush=True,
        )
    Path(args.out).write_text(json.dumps({"teacher": args.teacher, "split": args.split, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
