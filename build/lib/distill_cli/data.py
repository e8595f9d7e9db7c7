"""Data: ultralytics' YOLO dataset and dataloader (with its augmentations), and a synthetic dataset for demo/tests."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from ultralytics.cfg import get_cfg
from ultralytics.data.build import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.utils import IterableSimpleNamespace

from .config import read_yaml
from .errors import DistillError

SYNTHETIC_CLASSES = ["circle", "square", "triangle"]


def load_data(path: str | Path, split: str = "val") -> dict[str, Any]:
    """Check an ultralytics data yaml without downloading anything; return ultralytics' resolved dict."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"data yaml '{path}' not found; give an ultralytics data yaml (train/val/names)")
    raw = read_yaml(path, "data yaml")
    if not isinstance(raw, dict):
        raise DistillError(f"data yaml '{path}' must be a mapping with train, val and names")
    for key in ("train", "val", "names"):
        if key not in raw:
            raise DistillError(
                f"data yaml '{path}' has no '{key}' key; an ultralytics data yaml needs train, val, names"
            )
    names = raw["names"]
    if "nc" in raw and len(names) != raw["nc"]:
        raise DistillError(f"data yaml '{path}': nc={raw['nc']} but {len(names)} names; make them agree")
    root = Path(raw["path"]) if raw.get("path") else path.parent
    if not root.exists() and not root.is_absolute():
        root = path.parent / root
    for key in ("train", split):
        for entry in raw[key] if isinstance(raw[key], list) else [raw[key]]:
            target = Path(entry) if Path(entry).is_absolute() else root / entry
            if not target.exists() or (target.is_dir() and not any(target.iterdir())):
                raise DistillError(f"data yaml '{path}': split '{key}' points at '{target}', which is missing or empty")
    try:
        return check_det_dataset(str(path), autodownload=False)
    except Exception as e:  # ultralytics raises FileNotFoundError, SyntaxError, KeyError... for bad yamls
        raise DistillError(f"data yaml '{path}' is not usable: {str(e).strip().splitlines()[0]}") from e


def hyperparameters(**overrides: Any) -> IterableSimpleNamespace:
    """ultralytics' default hyper-parameters (augmentation, loss gains) with our run's overrides."""
    return get_cfg(overrides={"task": "detect", "mode": "train", **overrides})


def build_loader(
    data: dict,
    split: str,
    hyp: IterableSimpleNamespace,
    batch: int,
    workers: int,
    stride: int,
    train: bool,
    rank: int = -1,
) -> torch.utils.data.DataLoader:
    """ultralytics' YOLODataset + InfiniteDataLoader: mosaic etc. when ``train``, rectangular batches otherwise."""
    try:
        dataset = build_yolo_dataset(
            hyp, data[split], batch, data, mode="train" if train else "val", rect=not train, stride=stride
        )
    except (FileNotFoundError, RuntimeError, AssertionError) as e:  # ultralytics' words for "no usable images"
        raise DistillError(f"split '{split}': {str(e).strip().splitlines()[0]}") from e
    total = len(dataset.get_img_files(dataset.img_path))
    if len(dataset.labels) < total:  # ultralytics drops corrupt images and labels; say how many
        warnings.warn(
            f"{total - len(dataset.labels)} of {total} {split} images skipped (unreadable image, class id outside "
            f"the {len(data['names'])} names, or coordinates outside 0-1)",
            stacklevel=2,
        )
    if len(dataset) == 0:
        raise DistillError(f"split '{split}' has no usable images")
    return build_dataloader(
        dataset, batch, workers, shuffle=train, rank=rank, drop_last=False, pin_memory=torch.cuda.is_available()
    )


def make_synthetic_dataset(
    root: str | Path, n_train: int = 64, n_val: int = 16, size: int = 128, seed: int = 0
) -> Path:
    """Draw a small detection dataset of filled shapes (circle, square, triangle) in YOLO format; return its yaml.

    Images are ``size`` x ``size`` with 1-4 shapes on a noisy background; the same seed gives the same files.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, labels = _draw_image(rng, size)
            cv2.imwrite(str(root / "images" / split / f"{i:04d}.png"), image)
            (root / "labels" / split / f"{i:04d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
            )
    yaml_path = root / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(SYNTHETIC_CLASSES))
    yaml_path.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return yaml_path


def _draw_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple]]:
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    labels = []
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
        half = int(rng.integers(size // 12, size // 5))
        cx, cy = (int(v) for v in rng.integers(half, size - half, 2))
        color = tuple(int(v) for v in rng.integers(120, 256, 3))
        if cls == 0:
            cv2.circle(image, (cx, cy), half, color, -1)
        elif cls == 1:
            cv2.rectangle(image, (cx - half, cy - half), (cx + half, cy + half), color, -1)
        else:
            points = np.array([[cx, cy - half], [cx - half, cy + half], [cx + half, cy + half]], np.int32)
            cv2.fillPoly(image, [points], color)
        labels.append((cls, cx / size, cy / size, 2 * half / size, 2 * half / size))
    return image, labels
