"""Shared fixtures: a generated dataset, tiny checkpoints, and the optional real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
BCCD_YAML = SHARED / "data" / "bccd" / "bccd.yaml"
BCCD_TEACHER = SHARED / "models" / "bccd" / "yolov8s-bccd.pt"
BCCD_STUDENT = SHARED / "models" / "bccd" / "yolov8n-bccd.pt"
needs_shared = pytest.mark.skipif(not BCCD_TEACHER.is_file(), reason=f"real models not found at {SHARED}")

TINY = {"imgsz": 64, "batch": 4, "workers": 0, "device": "cpu", "epochs": 1}


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distill_cli.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=8, n_val=4, size=64)


def save_model(path: Path, model: torch.nn.Module) -> Path:
    from distill_cli.models import save_student

    save_student(path, model, {"task": "detect"}, {"teacher": "", "recipe": "test"})
    return path


def saved_teacher(path: Path, yaml_file: str, imgsz: int) -> Path:
    """A checkpoint of an untrained teacher with the synthetic classes, trained (its train_args say) at ``imgsz``."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.data import SYNTHETIC_CLASSES
    from distill_cli.models import save_student

    torch.manual_seed(0)
    model = DetectionModel(yaml_file, nc=3, verbose=False)
    model.names = dict(enumerate(SYNTHETIC_CLASSES))
    save_student(path, model, {"task": "detect", "imgsz": imgsz}, {"teacher": "", "recipe": "test"})
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) YOLOv8s checkpoint with the synthetic dataset's classes."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.data import SYNTHETIC_CLASSES

    torch.manual_seed(0)
    model = DetectionModel("yolov8s.yaml", nc=3, verbose=False)
    model.names = dict(enumerate(SYNTHETIC_CLASSES))
    return save_model(tmp_path_factory.mktemp("models") / "teacher.pt", model)


@pytest.fixture()
def run_kwargs(tmp_path: Path, synthetic_data: Path, tiny_teacher: Path) -> dict:
    return {
        **TINY,
        "teacher": str(tiny_teacher),
        "student": "yolov8n.yaml",
        "data": str(synthetic_data),
        "project": str(tmp_path / "runs"),
        "name": "exp",
    }


def train_args(run_kwargs: dict, **options: object) -> list[str]:
    """``train`` command-line arguments for the tiny run in ``run_kwargs``, with ``options`` added or replaced
    (a value of None gives a bare flag: ``**{"no-report": None}``)."""
    values = {
        "teacher": run_kwargs["teacher"],
        "student": "yolov8n.yaml",
        "data": run_kwargs["data"],
        "recipe": "cwd",
        "epochs": 1,
        "batch": 4,
        "imgsz": 64,
        "workers": 0,
        "device": "cpu",
        "project": run_kwargs["project"],
        **options,
    }
    pairs = ([f"--{key}"] if value is None else [f"--{key}", str(value)] for key, value in values.items())
    return ["train", *(item for pair in pairs for item in pair)]


def tree(root: Path) -> set[str]:
    """Every path below ``root``, relative: what a command left behind."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def quiet_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder, holding one file, for a test that must leave it as it was (default outputs land here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("a file that was here before")
    return tmp_path


@pytest.fixture(scope="module")
def teacher_net() -> torch.nn.Module:
    """An untrained YOLOv8n of three classes (its head stands in for a teacher's)."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", nc=3, verbose=False)
