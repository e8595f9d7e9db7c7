"""Weight-space interpolation of fine-tuned students with the student they started from (WiSE-FT, Wortsman et al.,
CVPR 2022): every floating tensor ``a * run + (1 - a) * start``, saved as a checkpoint and scored on the val and test
splits as ``benchmarks/gain.py`` scores. No training: it reads ``best.pt`` of runs that gain.py left.

    python benchmarks/interpolate.py --imgsz 256 --alphas 0.5 0.75 \\
        --runs runs/bench-gain/shared/{default,none}-s{0,1,2}/weights/best.pt --out interp.json

The 2026-12-02 screen (benchmarks/RESULTS.md) ran this computation from a throwaway script; this one was written from
it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import torch  # noqa: E402
from gain import BCCD, STUDENT  # noqa: E402  (benchmarks/ is the script's folder: gain.py's data and models)

from distill_cli.evaluation import evaluate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="best.pt of fine-tune runs")
    p.add_argument("--start", default=STUDENT)
    p.add_argument("--data", default=BCCD)
    p.add_argument("--imgsz", type=int, required=True)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def interpolated(run: str, start: dict[str, torch.Tensor], alpha: float) -> dict:
    """The run's checkpoint with its model's floating tensors moved to ``alpha * run + (1 - alpha) * start``."""
    ckpt = torch.load(run, map_location="cpu", weights_only=False)
    model = ckpt["model"].float()
    mixed = {
        k: alpha * v + (1 - alpha) * start[k] if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    model.load_state_dict(mixed)
    return {**ckpt, "model": model.half()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = torch.load(args.start, map_location="cpu", weights_only=False)["model"].float().state_dict()
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            for alpha in args.alphas:
                path = str(Path(tmp) / "mixed.pt")
                torch.save(interpolated(run, start, alpha), path)
                split_scores = {
                    s: evaluate([path], args.data, args.imgsz, 16, "cpu", s)[0]["mAP50-95"] for s in ("val", "test")
                }
                scores[f"{run} a={alpha} imgsz={args.imgsz}"] = split_scores
                print(f"{run} a={alpha}: val {split_scores['val']:.4f}, test {split_scores['test']:.4f}", flush=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "scores": scores}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
