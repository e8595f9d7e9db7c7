"""Weight selection from a deeper teacher: on the demo's drawn data (64 px, 256 train / 64 val images, the demo's
training options), a YOLOv8m teacher is trained first (recipe none, 1.5x the student's epochs), then a YOLOv8n
student from its yaml three times for the same epochs: alone, distilled with the default recipe (which seeds it
with a selection of the v8m's weights: its first blocks of each C2f, each concatenated part at its own spread), and
distilled with the default recipe from a random start. Every run is scored on the val split.

    python benchmarks/deeper.py --seeds 0 1 2 --out benchmarks/results/deeper.json

Runs already in ``--out`` are not run again. Prints a markdown table: mean ± half-range over seeds and each seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from distill_cli.data import SYNTHETIC_CLASSES, make_synthetic_dataset  # noqa: E402
from distill_cli.demo import demo_settings  # noqa: E402
from distill_cli.evaluation import evaluate  # noqa: E402
from distill_cli.models import load_model  # noqa: E402
from distill_cli.training import train  # noqa: E402
from distill_cli.weight_selection import selection_problem  # noqa: E402

RUNS = {  # label: (run folder, recipe, teacher needed, overrides)
    "student alone": ("student", "none", False, {}),
    "default (selection from the teacher)": ("default", "default", True, {}),
    "default, random start": ("default-random", "default", True, {"init": "random"}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--teacher", default="yolov8m.yaml")
    p.add_argument("--student", default="yolov8n.yaml")
    p.add_argument("--out", default="benchmarks/results/deeper.json")
    return p.parse_args(argv)


def run_seed(args: argparse.Namespace, seed: int, root: Path) -> dict[str, dict]:
    data = str(make_synthetic_dataset(root / "data", 256, 64, size=64, seed=seed))
    common = demo_settings(data, 64, args.epochs, root, seed)
    started = time.time()
    teacher = train(recipe="none", student=args.teacher, epochs=args.epochs * 3 // 2, name="teacher", **common)
    rows = {"teacher": {"weights": str(teacher.best), "wall_s": round(time.time() - started)}}
    for label, (name, recipe, with_teacher, extra) in RUNS.items():
        started = time.time()
        run = train(
            recipe=recipe,
            student=args.student,
            teacher=str(teacher.best) if with_teacher else "",
            epochs=args.epochs,
            name=name,
            **common,
            **extra,
        )
        rows[label] = {"weights": str(run.best), "wall_s": round(time.time() - started)}
    scored = evaluate([r["weights"] for r in rows.values()], data, imgsz=64, batch=16, device="cpu")
    for row, score in zip(rows.values(), scored, strict=True):
        row["val"] = score["mAP50-95"]
    return rows


def table(results: dict[str, dict]) -> str:
    lines = ["| run (val mAP50-95) | mean ± half-range | per seed | wall s, mean |", "|---|---|---|---|"]
    labels = ["teacher", *RUNS]
    for label in labels:
        maps = [results[s][label]["val"] for s in sorted(results)]
        walls = [results[s][label]["wall_s"] for s in sorted(results)]
        half = (max(maps) - min(maps)) / 2
        per_seed = " / ".join(f"{m:.3f}" for m in maps)
        lines.append(
            f"| {label} | {statistics.mean(maps):.3f} ± {half:.3f} | {per_seed} | {round(statistics.mean(walls))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nc = len(SYNTHETIC_CLASSES)
    problem = selection_problem(load_model(args.student, nc=nc), load_model(args.teacher, nc=nc))
    if problem:  # the "selection" row would start at random too: say so before the teacher's training
        sys.exit(f"error: {args.teacher} cannot seed {args.student}: {problem}")
    out, settings = Path(args.out), {"epochs": args.epochs, "teacher": args.teacher, "student": args.student}
    saved = json.loads(out.read_text()) if out.exists() else {"command": " ".join(sys.argv), **settings, "seeds": {}}
    if any(saved.get(key) != value for key, value in settings.items()):
        sys.exit(f"error: {out} holds runs of other settings; give another --out")
    for seed in args.seeds:
        if str(seed) in saved["seeds"]:
            continue
        with tempfile.TemporaryDirectory(prefix=f"deeper-s{seed}-") as tmp:
            saved["seeds"][str(seed)] = run_seed(args, seed, Path(tmp))
        for row in saved["seeds"][str(seed)].values():
            row.pop("weights")  # the runs lived in a temporary folder
        out.write_text(json.dumps(saved, indent=1))
        print(f"seed {seed}: " + ", ".join(f"{k} {v['val']:.3f}" for k, v in saved["seeds"][str(seed)].items()))
    saved["markdown"] = table(saved["seeds"])  # every seed run with these settings
    out.write_text(json.dumps(saved, indent=1))
    print(saved["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
