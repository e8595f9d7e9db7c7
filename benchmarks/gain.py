"""Accuracy gain benchmark: in each setting, the same student, data, epochs and seeds trained by our loop without
distillation and with each recipe, beside the student as given, the teacher, and ultralytics' own trainer (plain
fine-tune, and optionally its built-in KD); best.pt of every run evaluated on the val and test splits.

Settings (``--settings``, CPU-sized, all on the shared BCCD data and models; see benchmarks/RESULTS.md):
  shared     fine-tune yolov8n-bccd.pt, imgsz 256, 8 epochs, batch 16 (the setting of issue #14's target)
  finetune2  fine-tune yolov8n-bccd.pt, imgsz 352, 5 epochs, batch 8 (other imgsz, epochs and batch)
  finetune3  fine-tune yolov8n-bccd.pt, imgsz 320, 12 epochs, batch 16 (a check of the defaults chosen on the two above)
  native     fine-tune yolov8n-bccd.pt at the imgsz it was trained at (512), 4 epochs, batch 16
  imgsz640   fine-tune yolov8n-bccd.pt at ultralytics' default imgsz (640, above the 512 it was trained at), 6 epochs
  batch32    fine-tune yolov8n-bccd.pt, imgsz 416, 8 epochs, batch 32 (7 optimizer steps an epoch; a check)
  finetune4  fine-tune yolov8n-bccd.pt, imgsz 288, 10 epochs, batch 12 (a check of the unclipped fine-tune)
  batch32long  batch32 over 16 epochs (112 optimizer steps: does the default's loss there come from the run's length?)
  finetune5  fine-tune yolov8n-bccd.pt, imgsz 320, 6 epochs, batch 8 (a check after the choice, like finetune4)
  finetune6  fine-tune yolov8n-bccd.pt, imgsz 384, 7 epochs, batch 24 (added after version 0.3.8's choice, to check it)
  finetune7  fine-tune yolov8n-bccd.pt, imgsz 352, 6 epochs, batch 16 (added after 0.3.13's choice of 1+2, to check it)
  finetune8  fine-tune yolov8n-bccd.pt, imgsz 448, 5 epochs, batch 16 (a check where auto keeps the teacher at 1)
  finetune9  fine-tune yolov8n-bccd.pt, imgsz 576, 5 epochs, batch 12 (a check between the student's size and 640)
  finetune10 fine-tune yolov8n-bccd.pt, imgsz 480, 6 epochs, batch 8 (a check: 26 steps an epoch, just under 512)
  finetune11 fine-tune yolov8n-bccd.pt, imgsz 192, 8 epochs, batch 16 (a check below 256 px, where auto uses 2)
  finetune12 fine-tune yolov8n-bccd.pt, imgsz 384, 10 epochs, batch 16 (a check where auto averages 1 and 2)
  finetune13 fine-tune yolov8n-bccd.pt, imgsz 320, 3 epochs, batch 8 (a check: the shortest run, auto uses 2)
  finetune14 fine-tune yolov8n-bccd.pt, imgsz 448, 3 epochs, batch 16 (a check: 39 steps, auto keeps 1)
  scratch    yolov8n.yaml from scratch, imgsz 256, 30 epochs, batch 16
  scratch2   yolov8n.yaml from scratch, imgsz 320, 15 epochs, batch 16 (other imgsz and epochs)
  yolo26     yolo26n.yaml from scratch with a yolo26s teacher trained here first (recipe none), imgsz 256
  cross26    yolo26n.yaml from scratch with the shared YOLOv8s teacher (other box encoding), imgsz 320, 15 epochs
  cross11    yolo11n.yaml from scratch with the shared YOLOv8s teacher (weight selection cannot seed it), imgsz 320
  cross11native  cross11 at 512 px, the teacher's own size (auto keeps it at 1)
  gpu        yolov8n.yaml from scratch, imgsz 512, 80 epochs, batch 16 (GPU; benchmarks/gpu.sh)
  smoke      the gpu setting in miniature, for gpu.sh's CPU smoke mode

    python benchmarks/gain.py --settings shared finetune2 scratch --seeds 0 1 2 --recipes none default \\
        --ultralytics-plain --out benchmarks/results/gain.json

Runs already in ``--out`` are not run again (delete the file to start over). Prints a markdown table per setting and
split: mean ± half-range over seeds, each seed, change against ``none``, share of the teacher-student gap closed
(run - none) / (teacher - none), wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from distill_cli.evaluation import evaluate  # noqa: E402
from distill_cli.training import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT / "shared", ROOT.parent / "shared") if p.is_dir()), ROOT.parent / "shared")
BCCD = str(SHARED / "data" / "bccd" / "bccd.yaml")
TEACHER = str(SHARED / "models" / "bccd" / "yolov8s-bccd.pt")
STUDENT = str(SHARED / "models" / "bccd" / "yolov8n-bccd.pt")


@dataclass
class Setting:
    student: str
    teacher: str
    imgsz: int
    epochs: int
    batch: int
    data: str = BCCD
    teacher_epochs: int = 0  # > 0: the teacher is a yaml, trained here first with recipe none


SETTINGS = {
    "shared": Setting(STUDENT, TEACHER, 256, 8, 16),
    "finetune2": Setting(STUDENT, TEACHER, 352, 5, 8),
    "finetune3": Setting(STUDENT, TEACHER, 320, 12, 16),
    "native": Setting(STUDENT, TEACHER, 512, 4, 16),
    "imgsz640": Setting(STUDENT, TEACHER, 640, 6, 16),
    "batch32": Setting(STUDENT, TEACHER, 416, 8, 32),
    "finetune4": Setting(STUDENT, TEACHER, 288, 10, 12),
    "batch32long": Setting(STUDENT, TEACHER, 416, 16, 32),
    "finetune5": Setting(STUDENT, TEACHER, 320, 6, 8),
    "finetune6": Setting(STUDENT, TEACHER, 384, 7, 24),
    "finetune7": Setting(STUDENT, TEACHER, 352, 6, 16),
    "finetune8": Setting(STUDENT, TEACHER, 448, 5, 16),
    "finetune9": Setting(STUDENT, TEACHER, 576, 5, 12),
    "finetune10": Setting(STUDENT, TEACHER, 480, 6, 8),
    "finetune11": Setting(STUDENT, TEACHER, 192, 8, 16),
    "finetune12": Setting(STUDENT, TEACHER, 384, 10, 16),
    "finetune13": Setting(STUDENT, TEACHER, 320, 3, 8),
    "finetune14": Setting(STUDENT, TEACHER, 448, 3, 16),
    "finetune15": Setting(STUDENT, TEACHER, 640, 3, 16),  # short, above the student's own size (session 36)
    "finetune16": Setting(STUDENT, TEACHER, 576, 3, 16),
    "finetune17": Setting(STUDENT, TEACHER, 480, 4, 16),  # short, near it: auto keeps the start (session 36)
    "finetune18": Setting(STUDENT, TEACHER, 416, 5, 16),
    "finetune19": Setting(STUDENT, TEACHER, 544, 4, 16),  # a size never run before, fixed before its runs (session 38)
    "finetune20": Setting(STUDENT, TEACHER, 448, 4, 12),  # near it, batch 12: fixed before its runs (session 39)
    "finetune21": Setting(STUDENT, TEACHER, 512, 3, 8),  # its own size, batch 8: fixed before its runs (session 40)
    "finetune22": Setting(STUDENT, TEACHER, 416, 3, 8),  # below its size, batch 8: fixed before its runs (session 41)
    "scratch": Setting("yolov8n.yaml", TEACHER, 256, 30, 16),
    "scratch2": Setting("yolov8n.yaml", TEACHER, 320, 15, 16),
    "scratch3": Setting("yolov8n.yaml", TEACHER, 512, 10, 16),  # the teacher's size: auto keeps it at 1 (session 36)
    "yolo26": Setting("yolo26n.yaml", "yolo26s.yaml", 256, 30, 16, teacher_epochs=60),
    "cross26": Setting("yolo26n.yaml", TEACHER, 320, 15, 16),  # other box encoding: the teacher's boxes re-encoded
    "cross11": Setting("yolo11n.yaml", TEACHER, 320, 15, 16),  # another family: weight selection cannot seed it
    "cross11native": Setting("yolo11n.yaml", TEACHER, 512, 15, 16),  # the same at the teacher's size: auto keeps 1
    "gpu": Setting("yolov8n.yaml", TEACHER, 512, 80, 16),  # issue #4's table (benchmarks/gpu.sh)
    "smoke": Setting("yolov8n.yaml", TEACHER, 96, 2, 8),  # gpu.sh's smoke mode: the same script, tiny, on a CPU
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=["shared"], choices=sorted(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--recipes", nargs="+", default=["none", "default"], help="'none' is the no-distillation run")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run of ours, key=value")
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--ultralytics-plain", action="store_true", help="also YOLO(student).train() without KD")
    p.add_argument("--ultralytics-kd", type=float, nargs="*", default=[], help="also YOLO.train(dis=...)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--project", default="runs/bench-gain")
    p.add_argument("--out", default="benchmarks/results/gain.json")
    return p.parse_args(argv)


def run_ours(args: argparse.Namespace, recipe: str, seed: int, **extra: object) -> dict:
    """Our loop; ``args`` gives teacher, student, data, imgsz, epochs, batch, workers, device, project and ``set``;
    ``extra`` overrides any of them (and any config field)."""
    from distill_cli.overrides import parse_overrides

    options = {
        "teacher": "" if recipe == "none" else args.teacher,  # no distillation: no teacher to name
        "student": args.student,
        "data": args.data,
        "imgsz": args.imgsz,
        "epochs": args.epochs,
        "batch": args.batch,
        "workers": args.workers,
        "device": args.device,
        "seed": seed,
        "project": args.project,
        "name": f"{Path(recipe).stem}-s{seed}",
        **parse_overrides(args.set),
        **extra,
    }
    start = time.time()
    result = train(recipe=recipe, **options)
    return {"weights": str(result.best), "seconds": time.time() - start}


def run_ultralytics(args: argparse.Namespace, dis: float | None, seed: int, **extra: object) -> dict:
    """ultralytics' own trainer, plain (``dis`` None) or with its built-in KD (``distill_model=``, weight ``dis``)."""
    from ultralytics import YOLO
    from ultralytics.engine import trainer

    from distill_cli.evaluation import threads_kept

    # its AMP self-check downloads a model on a GPU (offline here); on a CPU it answers no, as for any user
    trainer.check_amp = lambda model: next(model.parameters()).device.type not in ("cpu", "mps")
    start = time.time()
    model = YOLO(args.student)
    kd = {"distill_model": args.teacher, "dis": dis} if dis is not None else {}
    with threads_kept():  # its trainer sets the CPU threads to its own count; our runs after it keep theirs
        model.train(
            data=args.data,
            imgsz=args.imgsz,
            epochs=args.epochs,
            batch=args.batch,
            workers=args.workers,
            device=args.device or None,
            seed=seed,
            project=args.project,
            name=f"ultralytics-{'plain' if dis is None else f'dis{dis:g}'}-s{seed}",
            plots=False,
            amp=True,
            **kd,
            **extra,
        )
    return {"weights": str(Path(model.trainer.best)), "seconds": time.time() - start}


def setting_args(cli: argparse.Namespace, name: str, setting: Setting) -> argparse.Namespace:
    project = str(Path(cli.project) / name)
    return argparse.Namespace(
        **{**vars(setting), **{k: getattr(cli, k) for k in ("workers", "device", "set")}}, project=project
    )


def prepared_teacher(args: argparse.Namespace, setting: Setting, results: dict) -> str:
    """The setting's teacher checkpoint; a yaml teacher is first trained here (once, cached in ``results``)."""
    if not setting.teacher_epochs:
        return setting.teacher
    if "teacher_weights" not in results:
        plain = argparse.Namespace(**{**vars(args), "student": setting.teacher, "epochs": setting.teacher_epochs})
        results["teacher_weights"] = run_ours(plain, "none", seed=0)["weights"]
    return results["teacher_weights"]


def jobs(cli: argparse.Namespace):
    """(label, function(args, seed)) for every run of a setting; ``--set`` overrides are part of our runs' labels."""
    extra = "".join(f", {o}" for o in cli.set)
    out = [(Path(r).stem + extra, lambda a, s, r=r: run_ours(a, r, s)) for r in cli.recipes]
    if cli.ultralytics_plain:
        out.append(("ultralytics plain", lambda a, s: run_ultralytics(a, None, s)))
    out += [(f"ultralytics KD dis={d:g}", lambda a, s, d=d: run_ultralytics(a, d, s)) for d in cli.ultralytics_kd]
    return out


def summarise(runs: dict[str, dict[str, dict]], reference: dict[str, dict], split: str) -> list[dict]:
    """One row per label over its seeds that have ``split``; "delta" and "gap closed" against ``none`` on the same
    seeds (a row with fewer seeds than ``none`` is not compared with none's other seeds)."""
    none = {seed: run[split] for seed, run in runs.get("none", {}).items() if split in run}
    teacher = reference["teacher"][split]
    rows = []
    for name, seeds in runs.items():
        maps = {seed: run[split] for seed, run in sorted(seeds.items(), key=lambda item: int(item[0])) if split in run}
        mean = statistics.mean(maps.values())
        shared = [seed for seed in maps if seed in none]
        base = statistics.mean(none[seed] for seed in shared) if shared else None
        delta = None if base is None else statistics.mean(maps[seed] for seed in shared) - base
        gap = None if base is None else teacher - base
        rows.append(
            {
                "run": name,
                "mAP50-95": mean,
                "spread": (max(maps.values()) - min(maps.values())) / 2,
                "per_seed": maps,
                "delta": delta,
                # a teacher scored at the student's size can be below none (at 192 px): then there is no gap to close
                "gap_closed": None if not gap or gap < 0 else delta / gap,
                "seconds": statistics.mean(seeds[seed]["seconds"] for seed in maps),
            }
        )
    return rows


def markdown(name: str, rows: list[dict], reference: dict[str, dict], split: str) -> str:
    lines = [
        f"| {name} ({split}) | mAP50-95 (± half-range) | per seed | Δ vs none (same seeds) | gap closed | wall s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {label} | {ref[split]:.4f} | | | | |" for label, ref in reference.items()]
    for r in rows:
        delta = "" if r["delta"] is None else f"{r['delta']:+.4f}"
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        seeds = " / ".join(f"{seed}: {m:.4f}" for seed, m in r["per_seed"].items())
        lines.append(
            f"| {r['run']} | {r['mAP50-95']:.4f} ± {r['spread']:.4f} | {seeds} | {delta} | {gap} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def scores(weights: str, args: argparse.Namespace, splits: list[str]) -> dict[str, float]:
    return {s: evaluate([weights], args.data, args.imgsz, 16, args.device, s)[0]["mAP50-95"] for s in splits}


def main(argv: list[str] | None = None) -> None:
    cli = parse_args(argv)
    out = Path(cli.out)
    report = json.loads(out.read_text()) if out.is_file() else {"command": " ".join(sys.argv), "settings": {}}
    for name in cli.settings:
        setting = SETTINGS[name]
        args = setting_args(cli, name, setting)
        results = report["settings"].setdefault(name, {"setting": vars(setting), "runs": {}})
        args.teacher = prepared_teacher(args, setting, results)
        reference = {"teacher": scores(args.teacher, args, cli.splits)}
        if setting.student.endswith(".pt"):
            reference["student as given"] = scores(setting.student, args, cli.splits)
        for label, job in jobs(cli):
            for seed in cli.seeds:
                done = results["runs"].setdefault(label, {})
                if str(seed) not in done:
                    run = job(args, seed)
                    done[str(seed)] = {**run, **scores(run["weights"], args, cli.splits)}
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(report, indent=1))
                print(
                    f"{name} {label} seed {seed}: " + ", ".join(f"{s} {done[str(seed)][s]:.4f}" for s in cli.splits),
                    flush=True,
                )
        # every seed the file holds for these runs: a later call that adds seeds summarises them all
        runs = {label: results["runs"][label] for label, _ in jobs(cli)}
        results["reference"] = reference
        for split in cli.splits:
            rows = summarise(runs, reference, split)
            results[f"markdown_{split}"] = markdown(name, rows, reference, split)
            print(results[f"markdown_{split}"], flush=True)
        out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
