"""Data: ultralytics' YOLO dataset and dataloader (with its augmentations), and a synthetic dataset for demo/tests."""

from __future__ import annotations

import contextlib
import errno
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from ultralytics.cfg import get_cfg
from ultralytics.data.build import build_dataloader, build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.utils import DATASETS_DIR, IterableSimpleNamespace

from .config import read_yaml
from .errors import DistillError
from .options import SyntheticOptions
from .rules import api_function, found, is_file, is_number, not_a_file, path_too_long, shown, validated
from .runlog import check_creatable, first_missing, remove, undo

SYNTHETIC_CLASSES = ["circle", "square", "triangle"]


NOT_SPLITS = {"path", "names", "nc", "download", "yaml_file", "channels"}  # a data yaml's keys that name no images


def load_data(path: str | Path, split: str = "val") -> dict[str, Any]:
    """Check an ultralytics data yaml without downloading anything; return ultralytics' resolved dict.

    Paths are resolved by ultralytics itself (``check_det_dataset``), so ours and the validator's agree: a relative
    ``path:`` is taken from the current folder, then from ultralytics' datasets folder, never from beside the yaml.
    """
    path = Path(path)
    if not is_file(path):
        raise DistillError(f"data yaml '{path}' {not_a_file(path)}; give an ultralytics data yaml (train/val/names)")
    raw = read_yaml(path, "data yaml")
    if not isinstance(raw, dict):
        raise DistillError(f"data yaml '{path}' must be a mapping with train, val and names")
    for key in ("train", "val", "names"):
        if key not in raw or (key == "train" and raw[key] in (None, [])):  # 'train:' with nothing after it: no split
            state = "empty" if key in raw else "missing"
            raise DistillError(
                f"data yaml '{path}': '{key}' is {state}; an ultralytics data yaml needs train, val, names"
            )
    names = raw["names"]
    if not isinstance(names, (list, dict)) or not names:
        raise DistillError(f"data yaml '{path}': 'names' must be a non-empty list or mapping of class names")
    ids = sorted(k for k in names if isinstance(k, int)) if isinstance(names, dict) else []
    if ids and ids != list(range(len(names))):  # ultralytics would renumber them: class ids would change meaning
        raise DistillError(
            f"data yaml '{path}': 'names' ids must be 0 to {len(names) - 1}, got {', '.join(map(str, ids))}"
        )
    if "nc" in raw and not (is_number(raw["nc"]) and float(raw["nc"]).is_integer()):  # nc: '3', .inf, 2.5
        raise DistillError(f"data yaml '{path}': 'nc' must be a whole number of classes, got {shown(raw['nc'])}")
    if "nc" in raw and len(names) != raw["nc"]:
        raise DistillError(f"data yaml '{path}': nc={raw['nc']} but {len(names)} names; make them agree")
    if raw.get(split) and split not in NOT_SPLITS and not is_split(split, raw[split]):  # val: 5
        raise DistillError(
            f"data yaml '{path}': '{split}' must name images (a path or a list of paths), got {shown(raw[split])}"
        )
    if not is_split(split, raw.get(split)):
        splits = ", ".join(k for k in ("train", "val", "test", "minival") if is_split(k, raw.get(k)))
        raise DistillError(f"data yaml '{path}' has no '{split}' split; it has: {splits}")
    try:
        data = check_det_dataset(str(path), autodownload=False, split=split)
    except Exception as e:  # ultralytics raises FileNotFoundError, SyntaxError, KeyError... for bad yamls
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
            raise DistillError(path_too_long(e.filename or path)) from e
        hint = ""
        if raw.get("path") and not Path(raw["path"]).is_absolute():
            hint = (
                f" (its relative path '{raw['path']}' is resolved from the current folder, then from ultralytics' "
                f"datasets folder '{DATASETS_DIR}', not beside the yaml: make it absolute)"
            )
        raise DistillError(f"data yaml '{path}' is not usable: {str(e).strip().splitlines()[0]}{hint}") from e
    for key in ("train", split):
        for entry in data[key] if isinstance(data[key], list) else [data[key]]:
            target = Path(entry)
            status = found(target)
            if status is None or (stat.S_ISDIR(status.st_mode) and not any(target.iterdir())):
                raise DistillError(f"data yaml '{path}': split '{key}' points at '{target}', which is missing or empty")
    # in id order: 'names: {2: c, 0: a, 1: b}' is ultralytics' {0: a, 1: b, 2: c}, and the run numbers names in order
    data["names"] = {i: data["names"][i] for i in sorted(data["names"])}
    return data


def is_split(key: str, value: Any) -> bool:
    """Whether a data yaml's ``key: value`` names images: a path or a list of paths, under a key that is none of the
    yaml's other settings (``--split path`` would read the whole dataset root as one split)."""
    if key in NOT_SPLITS or not value:
        return False
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(entry, str) for entry in value))


def hyperparameters(**overrides: Any) -> IterableSimpleNamespace:
    """ultralytics' default hyper-parameters (augmentation, loss gains) with our run's overrides."""
    return get_cfg(overrides={"task": "detect", "mode": "train", **overrides})


@contextlib.contextmanager
def split_errors(split: str) -> Iterator[None]:
    """ultralytics' errors for a split it cannot build a dataset from, as one line (its message, colours removed);
    of its ValueErrors only "No labels found" (a train split without labels), the others are bugs to show."""
    try:
        yield
    except (FileNotFoundError, RuntimeError, AssertionError, ValueError) as e:  # ultralytics' "no usable images"
        if isinstance(e, ValueError) and "No labels found" not in str(e):
            raise
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [type(e).__name__]
        raise DistillError(f"split '{split}' has no usable images ({lines[0]})") from e


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
    with split_errors(split):
        dataset = build_yolo_dataset(
            hyp, data[split], batch, data, mode="train" if train else "val", rect=not train, stride=stride
        )
    warn_skipped(dataset, split, len(data["names"]))
    if len(dataset) == 0:
        raise DistillError(f"split '{split}' has no usable images")
    loader = build_dataloader(
        dataset, batch, workers, shuffle=train, rank=rank, drop_last=False, pin_memory=torch.cuda.is_available()
    )
    if train:  # the batch sampler draws its indices from an order that a resume can restore
        order = EpochOrder(len(dataset), hyp.seed) if rank == -1 else DistributedEpochOrder(dataset, seed=hyp.seed)
        loader.order = loader.batch_sampler.sampler.sampler = order
    return loader


def warn_skipped(dataset: Any, split: str, nc: int) -> None:
    """ultralytics drops corrupt images and labels without a word: say how many, and why they can be dropped; and
    say when no image of the split has a label (every score would be 0)."""
    total = len(dataset.get_img_files(dataset.img_path))
    if len(dataset.labels) < total:
        warnings.warn(
            f"{total - len(dataset.labels)} of {total} {split} images skipped: an unreadable or corrupt image, an "
            f"image under 10 pixels, a label line that is not 'class x y w h', a class id outside the {nc} names, "
            f"or coordinates outside 0-1 (--verbose shows ultralytics' reason per image)",
            stacklevel=3,
        )
    if dataset.labels and not any(len(label["cls"]) for label in dataset.labels):
        what = "the student would learn only background" if split == "train" else "its mAP is 0 whatever the model"
        warnings.warn(f"no {split} image has a label: {what}", stacklevel=3)


class EpochOrder(torch.utils.data.Sampler):
    """The train split's shuffle: epoch ``e``'s order depends only on the seed and ``e`` (the k-th pass after
    ``start(e)`` is epoch e + k), not on what else drew random numbers, so a resumed run sees the order the
    uninterrupted run saw. (A torch RandomSampler draws from the loader's generator, which a new iterator also draws
    from: the resumed run would shuffle differently.)"""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def start(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        self.epoch += 1
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(seed)).tolist())


class DistributedEpochOrder(torch.utils.data.distributed.DistributedSampler):
    """DDP's shuffle (each rank its share of one permutation per epoch) under :class:`EpochOrder`'s rule: the k-th
    pass after ``start(e)`` is epoch e + k. ``set_epoch`` before each epoch would come one pass late: the loader's
    persistent workers begin the next pass while the current one ends."""

    def start(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = super().__iter__()  # the permutation of self.epoch, drawn now
        self.epoch += 1
        return indices


def loader_state(loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    """What the train loader carries from one epoch to the next: mosaic's buffer of recently loaded images (with
    worker processes each worker has its own, which is not saved)."""
    return {"mosaic_buffer": [int(i) for i in getattr(loader.dataset, "buffer", [])]}


def restore_loader(loader: torch.utils.data.DataLoader, state: dict[str, Any] | None, epoch: int) -> None:
    """Continue at ``epoch`` with the order and mosaic buffer the uninterrupted run had."""
    if hasattr(loader, "order"):
        loader.order.start(epoch)
    dataset = loader.dataset
    if state and hasattr(dataset, "buffer"):
        dataset.buffer.clear()
        for index in state["mosaic_buffer"]:  # loading appends to the buffer, in the saved order
            dataset.load_image(index)


@api_function
def make_synthetic_dataset(
    root: str | Path, n_train: int = 64, n_val: int = 16, size: int = 128, seed: int = 0
) -> Path:
    """Draw a small detection dataset of filled shapes (circle, square, triangle) in YOLO format; return its yaml.

    Images are ``size`` x ``size`` with 1-4 shapes on a noisy background; the same seed gives the same files.
    ``root`` must be new or empty (nothing is overwritten); what this made is removed again if it fails.
    """
    opts = validated(SyntheticOptions, locals())
    root = Path(opts.root)
    status = found(root)
    if status is not None and (not stat.S_ISDIR(status.st_mode) or any(root.iterdir())):
        raise DistillError(f"'{root}' is not an empty folder; give a new or empty one (nothing is overwritten)")
    check_creatable(root, "the dataset", "another root")
    made = first_missing(root)
    try:
        draw_dataset(root, opts)
    except BaseException:
        if made:
            undo(root, made)
        else:  # an empty folder before: all in it is this call's
            for path in list(root.iterdir()):
                remove(path)
        raise
    return root / "data.yaml"


def draw_dataset(root: Path, opts: SyntheticOptions) -> None:
    rng = np.random.default_rng(opts.seed)
    for split, count in (("train", opts.n_train), ("val", opts.n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, labels = _draw_image(rng, opts.size)
            # encoded here and written by Python: a full disk is an OSError that says so (cv2.imwrite returns False)
            (root / "images" / split / f"{i:04d}.png").write_bytes(cv2.imencode(".png", image)[1].tobytes())
            (root / "labels" / split / f"{i:04d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
            )
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(SYNTHETIC_CLASSES))
    text = f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
    (root / "data.yaml").write_text(text)


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
