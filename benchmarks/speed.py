"""Speed benchmark: the distillation step against its floor (student step + teacher forward), and the data rate.

In one process, same batch, imgsz and device, after warm-up, median over many steps:
  1. student train step alone (forward, detection loss, backward, optimizer step): recipe ``none``;
  2. teacher forward alone, as the loop runs it (eval, no grad, bf16/fp16 on GPU);
  3. the full distillation step for each recipe;
  4. images/s the dataloader delivers alone (configured workers and augmentation).
Prints ms/step, img/s, overhead = 3 / (1 + 2), data rate vs step rate, peak memory; writes JSON with ``--out``.

``--end-to-end N`` adds N epochs of our ``train`` and of ``YOLO(student).train(distill_model=teacher)`` on the same
data, and their img/s ratio.

CPU (documented in benchmarks/RESULTS.md):
    python benchmarks/speed.py --teacher ../shared/models/bccd/yolov8s-bccd.pt \\
        --student ../shared/models/bccd/yolov8n-bccd.pt --data ../shared/data/bccd/bccd.yaml \\
        --imgsz 256 --batch 16 --steps 10 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402

from distill_cli import dist  # noqa: E402
from distill_cli.engine import preprocess, train_one_epoch  # noqa: E402
from distill_cli.training import prepare, resolve_config, select_device  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--recipes",
        nargs="+",
        default=["cwd", "mgd", "pkd", "logits", "cwd+logits", "mgd+logits", "sl2", "at", "default"],
    )
    p.add_argument("--end-to-end", type=int, default=0, metavar="EPOCHS")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args: argparse.Namespace, recipe: str, scratch: str):
    cfg = resolve_config(
        recipe=recipe,
        teacher=args.teacher,
        student=args.student,
        data=args.data,
        imgsz=args.imgsz,
        batch=args.batch,
        workers=args.workers,
        device=args.device,
        epochs=1,
        warmup_epochs=0.0,
        project=scratch,
        report=False,
        ema=True,
    )
    device = select_device(cfg.device)
    state, _, (train_loader, _), hyp, _ = prepare(cfg, None, None, dist.DistInfo(), device)
    return state, train_loader, hyp


def timed_steps(state, batches: list[dict], args: argparse.Namespace) -> list[float]:
    """ms per step of the loop's own step (train_one_epoch over one batch at a time)."""
    times = []
    for i in range(args.warmup + args.steps):
        batch = dict(batches[i % len(batches)])  # preprocess replaces keys, the cached uint8 batch stays
        sync(state.device)
        start = time.perf_counter()
        train_one_epoch(state, [batch], epoch=0)
        sync(state.device)
        if i >= args.warmup:
            times.append(1000 * (time.perf_counter() - start))
    return times


def timed_teacher(state, batches: list[dict], args: argparse.Namespace) -> list[float]:
    images = [preprocess(dict(b), state.device)["img"] for b in batches]
    times = []
    for i in range(args.warmup + args.steps):
        sync(state.device)
        start = time.perf_counter()
        state.teacher(images[i % len(images)])
        sync(state.device)
        if i >= args.warmup:
            times.append(1000 * (time.perf_counter() - start))
    return times


def data_rate(args: argparse.Namespace, hyp) -> float:
    """img/s of a fresh loader over one epoch (a used one has batches prefetched while the steps ran)."""
    from distill_cli.data import build_loader, load_data

    loader = build_loader(load_data(args.data), "train", hyp, args.batch, args.workers, 32, train=True)
    iterator = iter(loader)
    next(iterator)  # workers started
    start = time.perf_counter()
    count = sum(len(b["img"]) for b in iterator)
    return count / (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results: dict = {"args": vars(args), "steps": {}}
    with tempfile.TemporaryDirectory() as scratch:
        state, loader, hyp = build(args, "none", scratch)
        device = state.device
        results["data_img_s"] = data_rate(args, hyp)
        batches = list(islice(iter(loader), min(len(loader), 4)))
        student = statistics.median(timed_steps(state, batches, args))
        teacher_state, _, _ = build(args, "cwd", scratch)
        teacher = statistics.median(timed_teacher(teacher_state, batches, args))
        floor = student + teacher
        results["steps"]["student step"] = student
        results["steps"]["teacher forward"] = teacher
        for recipe in args.recipes:
            recipe_state, _, _ = build(args, recipe, scratch)
            results["steps"][recipe] = statistics.median(timed_steps(recipe_state, batches, args))
        results["peak_memory_mb"] = peak_memory_mb(device)
    print_table(results, floor, args)
    if args.end_to_end:
        results["end_to_end"] = end_to_end(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


def print_table(results: dict, floor: float, args: argparse.Namespace) -> None:
    print(f"| measurement (batch {args.batch}, imgsz {args.imgsz}) | ms/step | img/s | vs floor (1 + 2) |")
    print("|---|---|---|---|")
    for name, ms in results["steps"].items():
        ratio = f"{ms / floor:.2f}x" if name not in ("student step", "teacher forward") else ""
        print(f"| {name} | {ms:.1f} | {args.batch * 1000 / ms:.1f} | {ratio} |")
    step_rate = args.batch * 1000 / results["steps"].get("default", floor)
    print(
        f"\ndata: {results['data_img_s']:.1f} img/s with {args.workers} workers "
        f"({results['data_img_s'] / step_rate:.2f}x the default recipe's step rate); "
        f"peak memory {results['peak_memory_mb']:.0f} MB"
    )


def end_to_end(args: argparse.Namespace) -> dict:
    """img/s of N epochs: our train (default recipe) against ultralytics' built-in KD, same data/batch/imgsz."""
    from gain import run_ours, run_ultralytics_kd  # benchmarks/ is on sys.path when this script runs

    from distill_cli.data import load_data

    with tempfile.TemporaryDirectory() as scratch:
        runs = argparse.Namespace(**{**vars(args), "epochs": args.end_to_end, "project": scratch, "set": []})
        ours_s = run_ours(runs, "default", seed=0, report=False, val_interval=10**6)["seconds"]
        theirs_s = run_ultralytics_kd(runs, dis=6.0, seed=0, val=False)["seconds"]  # 6.0: ultralytics' default
    images = len(list(Path(load_data(args.data)["train"]).glob("*"))) * args.end_to_end
    print(
        f"\nend to end, {args.end_to_end} epochs: ours {images / ours_s:.1f} img/s ({ours_s:.1f} s), ultralytics KD "
        f"{images / theirs_s:.1f} img/s ({theirs_s:.1f} s): {theirs_s / ours_s:.2f}x"
    )
    return {"ours_s": ours_s, "ultralytics_kd_s": theirs_s, "speedup": theirs_s / ours_s, "images": images}


if __name__ == "__main__":
    sys.exit(main())
