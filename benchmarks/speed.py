"""Speed benchmark: the distillation step against its fp32 floor, the data rate, and (``--end-to-end N``) whole runs.

In one process, same batch, imgsz and device, after warm-up, median over ``--steps`` steps:
  1. student train step alone in fp32 (forward, detection loss, backward, optimizer step): recipe ``none``, --no-amp;
  2. teacher forward alone in fp32, unfused, eval, no grad (how a plain loop runs it);
  floor = 1 + 2; then, with the run's default precision (AMP: bf16 on CPUs that have it, fp16 on GPU):
  3. the student step and the teacher forward as our loop runs them (teacher Conv+BN-fused, low precision);
  4. the full distillation step for each recipe, as a ratio of the floor;
  5. images/s the dataloader delivers alone (configured workers and augmentation).
``--end-to-end N`` adds N epochs (validation every epoch) of: plain ultralytics training (no distillation), our
``train`` with the default recipe, and ultralytics' built-in KD (``dis=1``), on the same data, imgsz, batch, workers;
with wall time, img/s and peak memory (RSS of the process, or CUDA max allocated) of each.

CPU (documented in benchmarks/RESULTS.md):
    python benchmarks/speed.py --imgsz 256 --batch 16 --workers 2 --steps 10 --device cpu --end-to-end 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
from gain import BCCD, STUDENT, TEACHER, run_ours, run_ultralytics  # noqa: E402  (benchmarks/ is on sys.path)

from distill_cli.data import build_loader, hyperparameters, load_data  # noqa: E402
from distill_cli.engine import preprocess, train_one_epoch  # noqa: E402

RECIPES = ["cwd", "mgd", "pkd", "logits", "bckd", "crosskd", "sl2", "at", "default"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--student", default=STUDENT)
    p.add_argument("--data", default=BCCD)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--end-to-end", type=int, default=0, metavar="EPOCHS")
    p.add_argument("--out", default="")
    return p.parse_args(argv)


class Built(Exception):
    """Raised by the start callback: the state is built, no step has run (and no run folder is left)."""


def build(args: argparse.Namespace, recipe: str, scratch: str, **options: object):
    """The TrainState our loop would train with (one epoch, no warm-up, so that every step is a full step)."""
    box = {}

    def capture(event: str, info: dict) -> None:
        if event == "start":
            box["state"] = info["state"]
            raise Built

    try:
        # workers 0: the steps are fed pre-loaded batches, and idle loader workers prefetching in the background would
        # take the 2 cores from whichever measurement runs first
        run = argparse.Namespace(**{**vars(args), "epochs": 1, "project": scratch, "set": [], "workers": 0})
        run_ours(run, recipe, seed=0, warmup_epochs=0.0, report=False, callback=capture, **options)
    except Built:
        pass
    return box["state"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, args: argparse.Namespace) -> float:
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        fn(i)
        sync(device)
        if i >= args.warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def step_ms(state, batches: list[dict], args: argparse.Namespace) -> float:
    """ms per step of the loop's own step (train_one_epoch over one batch at a time)."""
    return median_ms(lambda i: train_one_epoch(state, [dict(batches[i % len(batches)])], epoch=0), state.device, args)


def teacher_ms(forward, device: torch.device, batches: list[dict], args: argparse.Namespace) -> float:
    images = [preprocess(dict(b), device)["img"] for b in batches]
    return median_ms(lambda i: forward(images[i % len(images)]), device, args)


def loader_for(args: argparse.Namespace):
    hyp = hyperparameters(imgsz=args.imgsz, batch=args.batch, workers=args.workers)
    return build_loader(load_data(args.data), "train", hyp, args.batch, args.workers, 32, train=True)


def data_rate(args: argparse.Namespace) -> float:
    """img/s of a fresh loader over one epoch."""
    iterator = iter(loader_for(args))
    next(iterator)  # workers started
    start = time.perf_counter()
    count = sum(len(b["img"]) for b in iterator)
    return count / (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations, else resident memory. Linux's ru_maxrss survives execve, so
    in a child started by this script it would report the parent's peak; the kernel's VmHWM is this image's own."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steps_table(args: argparse.Namespace, scratch: str) -> dict:
    batches = list(islice(iter(loader_for(argparse.Namespace(**{**vars(args), "workers": 0}))), 4))
    fp32 = build(args, "cwd", scratch, amp=False)
    device = fp32.device
    unfused = copy.deepcopy(fp32.teacher.model).eval()
    results = {
        "student step fp32": step_ms(build(args, "none", scratch, amp=False), batches, args),
        "teacher forward fp32 (unfused)": teacher_ms(torch.no_grad()(unfused), device, batches, args),
    }
    floor = results["student step fp32"] + results["teacher forward fp32 (unfused)"]
    amp = build(args, "cwd", scratch)
    results["student step (run precision)"] = step_ms(build(args, "none", scratch), batches, args)
    results["teacher forward (run precision, fused)"] = teacher_ms(amp.teacher, device, batches, args)
    for recipe in args.recipes:
        results[recipe] = step_ms(build(args, recipe, scratch), batches, args)
    return {"ms": results, "floor_ms": floor, "precision": str(amp.amp_dtype), "peak_memory_mb": peak_memory_mb(device)}


def print_steps(table: dict, args: argparse.Namespace) -> None:
    print(
        f"| measurement (batch {args.batch}, imgsz {args.imgsz}, {table['precision']}) | ms/step | img/s | vs floor |"
    )
    print("|---|---|---|---|")
    for name, ms in table["ms"].items():
        print(f"| {name} | {ms:.1f} | {args.batch * 1000 / ms:.1f} | {ms / table['floor_ms']:.2f}x |")
    print(
        f"\nfloor (fp32 student step + fp32 teacher forward) {table['floor_ms']:.1f} ms; "
        f"data {table['data_img_s']:.1f} img/s with {args.workers} workers; "
        f"peak memory {table['peak_memory_mb']:.0f} MB"
    )


def end_to_end(args: argparse.Namespace, scratch: str) -> dict:
    """Wall time of N epochs: plain ultralytics, ours without and with distillation (default recipe), ultralytics'
    built-in KD, each without plots or report; then ours default with its run report (teacher validation, feature
    agreement, figures), to show what the report costs. Each in a fresh process so that its peak memory is its own."""
    import subprocess

    rows = {}
    for label in ("ultralytics plain", "ours none", "ours default", "ultralytics KD dis=1", "ours default + report"):
        cmd = [sys.executable, __file__, "--one-run", label, *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SPEED_SCRATCH": scratch})
        rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
    images = len(loader_for(args).dataset) * args.end_to_end
    print(f"\n| end to end, {args.end_to_end} epochs | wall s | img/s | vs plain ultralytics | peak MB |")
    print("|---|---|---|---|---|")
    plain = rows["ultralytics plain"]["seconds"]
    for label, row in rows.items():
        print(
            f"| {label} | {row['seconds']:.1f} | {images / row['seconds']:.1f} | {row['seconds'] / plain:.2f}x "
            f"| {row['peak_mb']:.0f} |"
        )
    return rows


def one_run(label: str, args: argparse.Namespace) -> None:
    """One end-to-end run in this process; prints its wall time and peak memory as JSON."""
    runs = argparse.Namespace(
        **{**vars(args), "epochs": args.end_to_end, "project": os.environ["SPEED_SCRATCH"], "set": []}
    )
    if label.startswith("ours "):
        recipe = label.split()[1]
        seconds = run_ours(runs, recipe, seed=0, report=label.endswith("report"))["seconds"]
    else:
        seconds = run_ultralytics(runs, 1.0 if "KD" in label else None, seed=0)["seconds"]
    print(json.dumps({"seconds": seconds, "peak_mb": peak_memory_mb(torch.device(args.device or "cpu"))}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--one-run":
        return one_run(argv[1], parse_args(argv[2:]))
    args = parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        table = steps_table(args, scratch)
        table["data_img_s"] = data_rate(args)
        print_steps(table, args)
        if args.end_to_end:
            table["end_to_end"] = end_to_end(args, scratch)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), **table}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
