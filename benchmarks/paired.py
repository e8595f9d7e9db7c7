"""Is one recipe's lead over another larger than what the split's images alone make it vary? A paired bootstrap over
images: each run's best.pt is validated once per split (as ``benchmarks/gain.py`` scores it) with its per-image
matches kept; then the split's images are drawn with replacement, the same draw for every run, and mAP50-95 is
recomputed from the drawn images' matches. The spread of ``A - B`` over the draws is the difference a fresh split of
that size, from the same source, could show.

    python benchmarks/paired.py --imgsz 416 --name batch32 \\
        --a runs/k/batch32/default-s{0,1,2}/weights/best.pt --b runs/k/batch32/none-s{0,1,2}/weights/best.pt

``--a`` and ``--b`` pair by position (seed with seed). Printed per split: each pair's difference on the whole split,
their mean, and the 2.5th-97.5th percentiles of that mean over the draws (``--draws``; seed 0 draws them), with the
share of draws where it is above 0; and a single run's spread over the draws (the half-width of its own 95% interval,
averaged over the runs: one score's uncertainty, wider than a paired difference's, whose shared images cancel).
The seeds' spread is another noise (training); this one is the split's. Runs are scored on the CPU at batch 16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import numpy as np  # noqa: E402
from gain import BCCD  # noqa: E402  (benchmarks/ is the script's folder: gain.py's data)
from ultralytics.utils.metrics import DetMetrics, ap_per_class  # noqa: E402

from distill_cli.evaluation import evaluate  # noqa: E402

KEPT = ("tp", "conf", "pred_cls", "target_cls")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs="+", required=True, help="best.pt of recipe A's runs, one per seed")
    p.add_argument("--b", nargs="+", required=True, help="best.pt of recipe B's runs, the same seeds in that order")
    p.add_argument("--name", default="", help="the setting's name, for the table")
    p.add_argument("--data", default=BCCD)
    p.add_argument("--imgsz", type=int, required=True)
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--out", help="append the result to this JSON list")
    args = p.parse_args(argv)
    if len(args.a) != len(args.b):
        p.error(f"--a has {len(args.a)} runs and --b {len(args.b)}: they pair seed with seed")
    return args


def per_image_matches(weights: str, data: str, imgsz: int, split: str) -> tuple[float, list[tuple[str, dict]]]:
    """The run's mAP50-95 on the split, as gain.py scores it (on the CPU), and each image's file name and matches in
    the validator's order (a name may repeat: two folders of one split)."""
    images: list[tuple[str, dict]] = []
    update = DetMetrics.update_stats

    def record(self: DetMetrics, stat: dict) -> None:
        images.append((stat["im_name"], {k: stat[k] for k in KEPT}))
        update(self, stat)

    DetMetrics.update_stats = record
    try:
        score = evaluate([weights], data, imgsz, 16, "cpu", split)[0]["mAP50-95"]
    finally:
        DetMetrics.update_stats = update
    return score, images


def map5095(images: list[dict]) -> float:
    """mAP50-95 of these images' matches, as ultralytics' DetMetrics computes it (classes with a target only)."""
    stats = {k: np.concatenate([image[k] for image in images], 0) for k in KEPT}
    ap = ap_per_class(stats["tp"], stats["conf"], stats["pred_cls"], stats["target_cls"])[5]
    return float(ap.mean()) if len(ap) else 0.0


def bootstrap(runs: list[list[dict]], draws: int) -> np.ndarray:
    """mAP50-95 of every run (columns) on each draw of the images with replacement (rows), the same draw per row;
    each run's images in one order."""
    count = len(runs[0])
    rng = np.random.default_rng(0)
    out = np.empty((draws, len(runs)))
    for d in range(draws):
        drawn = rng.integers(0, count, count)
        out[d] = [map5095([run[i] for i in drawn]) for run in runs]
    return out


def compare(args: argparse.Namespace, split: str) -> dict:
    """One split: the whole-split differences and their mean's spread over the draws."""
    scored = [per_image_matches(w, args.data, args.imgsz, split) for w in args.a + args.b]
    whole = np.array([score for score, _ in scored])
    names = [name for name, _ in scored[0][1]]
    for weights, (score, images) in zip(args.a + args.b, scored, strict=True):
        if [name for name, _ in images] != names:  # the validator's order is the split's: the same for every run
            raise SystemExit(f"{weights}: its images came in another order than {args.a[0]}'s")
        if abs(map5095([m for _, m in images]) - score) > 1e-6:  # else the draws would not be gain.py's number
            raise SystemExit(f"{weights}: mAP recomputed from its images differs from the validator's {score:.4f}")
    drawn = bootstrap([[m for _, m in images] for _, images in scored], args.draws)
    n = len(args.a)
    diff, drawn_diff = whole[:n] - whole[n:], (drawn[:, :n] - drawn[:, n:]).mean(1)
    low, high = np.percentile(drawn_diff, [2.5, 97.5])
    run_low, run_high = np.percentile(drawn, [2.5, 97.5], axis=0)
    return {
        "setting": args.name,
        "split": split,
        "images": len(names),
        "a": whole[:n].tolist(),
        "b": whole[n:].tolist(),
        "diffs": diff.tolist(),
        "mean_diff": float(diff.mean()),
        "interval": [float(low), float(high)],
        "share_above_0": float((drawn_diff > 0).mean()),
        "run_half_width": float(((run_high - run_low) / 2).mean()),
    }


def row(r: dict) -> str:
    low, high = r["interval"]
    diffs = " / ".join(f"{d:+.4f}" for d in r["diffs"])
    return (
        f"| {r['setting']} | {r['split']} ({r['images']} images) | {diffs} | {r['mean_diff']:+.4f} | "
        f"{low:+.4f} to {high:+.4f} | {r['share_above_0']:.2f} | ±{r['run_half_width']:.4f} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = [compare(args, split) for split in args.splits]
    print("| setting | split | A - B per seed | mean | 95% over image draws | draws above 0 | one run ± |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(row(r))
    if args.out:
        out = Path(args.out)
        earlier = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(earlier + results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
