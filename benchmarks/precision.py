"""How much each autocast precision moves the detection loss: ultralytics' box decode and loss on one BCCD batch,
computed in fp32 and under fp16 and bf16 autocast, from the same fp32 head outputs (CPU; both dtypes autocast there).

    python benchmarks/precision.py --imgsz 256 --batch 16

Prints the decoded-box error against fp32 (mean / max, grid units) and the relative change of each loss item. Our
loop computes the loss outside autocast for this reason (distill_cli/distiller.py, ``detection_loss``).
"""

from __future__ import annotations

import argparse
import os
from itertools import islice

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
from gain import BCCD, STUDENT  # noqa: E402
from ultralytics.utils.tal import make_anchors  # noqa: E402

from distill_cli.data import build_loader, hyperparameters, load_data  # noqa: E402
from distill_cli.distiller import head_branches  # noqa: E402
from distill_cli.engine import preprocess  # noqa: E402
from distill_cli.models import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    hyp = hyperparameters(imgsz=args.imgsz, batch=args.batch)
    loader = build_loader(load_data(BCCD), "train", hyp, args.batch, 0, 32, train=True)
    batch = preprocess(next(islice(iter(loader), 1)), torch.device("cpu"))
    student = load_model(STUDENT)
    student.args = hyp
    criterion = student.init_criterion()
    with torch.no_grad():
        head = head_branches(student.train()(batch["img"]))["one2many"]
    pred = head["boxes"].permute(0, 2, 1).contiguous()
    anchors, _ = make_anchors(head["feats"], criterion.stride, 0.5)
    reference = criterion.bbox_decode(anchors, pred)
    _, loss32, _ = criterion.get_assigned_targets_and_loss(head, batch)
    print(
        f"| autocast (batch {args.batch}, imgsz {args.imgsz}) | box decode error mean / max (grid units) |"
        " box loss | cls loss | dfl loss |"
    )
    print("|---|---|---|---|---|")
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            decoded = criterion.bbox_decode(anchors, pred).float()
            _, loss, _ = criterion.get_assigned_targets_and_loss(head, batch)
        error = (decoded - reference).abs()
        moved = " | ".join(f"{100 * float((loss[i] - loss32[i]) / loss32[i]):+.3f}%" for i in range(3))
        print(f"| {name} | {error.mean():.4f} / {error.max():.3f} | {moved} |")


if __name__ == "__main__":
    main()
