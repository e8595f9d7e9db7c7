"""Accuracy gain benchmark: the same student, data, epochs and seeds, trained by our loop without distillation and
with each recipe (and optionally by ultralytics' built-in KD), evaluated on the same split.

CPU-sized check (about 20 minutes on 2 cores per recipe pair; see benchmarks/RESULTS.md):

    python benchmarks/gain.py --teacher ../shared/models/bccd/yolov8s-bccd.pt \\
        --student ../shared/models/bccd/yolov8n-bccd.pt --data ../shared/data/bccd/bccd.yaml \\
        --imgsz 256 --epochs 8 --batch 16 --seeds 0 --recipes none default --device cpu

Prints a markdown table (mean and spread over seeds, change against the no-distillation run, share of the
teacher-student gap closed, wall time, img/s) and writes the same as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from distill_cli.evaluation import evaluate  # noqa: E402
from distill_cli.training import train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True, help="yaml (from scratch) or .pt (fine-tune)")
    p.add_argument("--data", required=True)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--recipes", nargs="+", default=["none", "default"], help="'none' is the no-distillation run")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, key=value")
    p.add_argument("--splits", nargs="+", default=["val"], help="splits to report (val to choose, test to confirm)")
    p.add_argument("--ultralytics-kd", type=float, nargs="*", default=[], help="also run YOLO.train(dis=...)")
    p.add_argument("--project", default="runs/bench-gain")
    p.add_argument("--out", default="benchmarks/results/gain.json")
    return p.parse_args(argv)


def run_ours(args: argparse.Namespace, recipe: str, seed: int, **extra: object) -> dict:
    """Our loop: ``args`` gives teacher, student, data, imgsz, epochs, batch, workers, device, project and ``set``."""
    from distill_cli.config import parse_overrides

    start = time.time()
    result = train(
        recipe=recipe,
        teacher=args.teacher,
        student=args.student,
        data=args.data,
        imgsz=args.imgsz,
        epochs=args.epochs,
        batch=args.batch,
        workers=args.workers,
        device=args.device,
        seed=seed,
        project=args.project,
        name=f"{Path(recipe).stem}-s{seed}",
        **{**parse_overrides(args.set), **extra},
    )
    return {"weights": str(result.best), "seconds": time.time() - start}


def run_ultralytics_kd(args: argparse.Namespace, dis: float, seed: int, **extra: object) -> dict:
    """ultralytics' own trainer with its built-in KD (``distill_model=``, weight ``dis``), same settings as ours."""
    from ultralytics import YOLO
    from ultralytics.engine import trainer

    trainer.check_amp = lambda model: True  # its AMP self-check downloads a model; offline here
    start = time.time()
    model = YOLO(args.student)
    model.train(
        data=args.data,
        imgsz=args.imgsz,
        epochs=args.epochs,
        batch=args.batch,
        workers=args.workers,
        device=args.device or None,
        seed=seed,
        distill_model=args.teacher,
        dis=dis,
        project=args.project,
        name=f"ultralytics-dis{dis:g}-s{seed}",
        plots=False,
        amp=True,
        **extra,
    )
    return {"weights": str(Path(model.trainer.best)), "seconds": time.time() - start}


def summarise(
    runs: dict[str, list[dict]], teacher: dict[str, float], split: str, images: int, epochs: int
) -> list[dict]:
    base = statistics.mean(r[split]["mAP50-95"] for r in runs["none"]) if "none" in runs else None
    rows = []
    for name, seeds in runs.items():
        maps = [r[split]["mAP50-95"] for r in seeds]
        map50 = [r[split]["mAP50"] for r in seeds]
        mean = statistics.mean(maps)
        seconds = statistics.mean(r["seconds"] for r in seeds)
        gap = teacher["mAP50-95"] - base if base is not None else None
        rows.append(
            {
                "run": name,
                "mAP50-95": mean,
                "spread": (max(maps) - min(maps)) / 2,
                "mAP50": statistics.mean(map50),
                "per_seed": maps,
                "delta": None if base is None else mean - base,
                "gap_closed": None if not gap else (mean - base) / gap,
                "seconds": seconds,
                "img_per_s": images * epochs / seconds,
            }
        )
    return rows


def markdown(rows: list[dict], teacher: dict[str, float], split: str) -> str:
    lines = [
        f"| run ({split}) | mAP50-95 (± half-range) | mAP50 | Δ vs none | gap closed | wall s | img/s |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {teacher['mAP50-95']:.4f} | {teacher['mAP50']:.4f} | | | | |",
    ]
    for r in rows:
        delta = "" if r["delta"] is None else f"{r['delta']:+.4f}"
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        lines.append(
            f"| {r['run']} | {r['mAP50-95']:.4f} ± {r['spread']:.4f} | {r['mAP50']:.4f} | {delta} | {gap} "
            f"| {r['seconds']:.0f} | {r['img_per_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs: dict[str, list[dict]] = {}
    jobs = [(Path(r).stem, lambda s, r=r: run_ours(args, r, s)) for r in args.recipes]
    jobs += [(f"ultralytics-dis{d:g}", lambda s, d=d: run_ultralytics_kd(args, d, s)) for d in args.ultralytics_kd]
    for name, job in jobs:
        for seed in args.seeds:
            run = job(seed)
            for split in args.splits:
                run[split] = evaluate([run["weights"]], args.data, args.imgsz, args.batch, args.device, split)[0]
            runs.setdefault(name, []).append(run)
            print(f"{name} seed {seed}: " + ", ".join(f"{s} {run[s]['mAP50-95']:.4f}" for s in args.splits), flush=True)
    from distill_cli.data import load_data

    images = len(list(Path(load_data(args.data)["train"]).glob("*")))
    report = {
        "date": datetime.now(timezone.utc).isoformat(),
        "command": " ".join(sys.argv),
        "args": vars(args),
        "tables": {},
    }
    for split in args.splits:
        teacher = evaluate([args.teacher], args.data, args.imgsz, args.batch, args.device, split)[0]
        rows = summarise(runs, teacher, split, images, args.epochs)
        report["tables"][split] = {"teacher": teacher, "rows": rows, "markdown": markdown(rows, teacher, split)}
        print(report["tables"][split]["markdown"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
