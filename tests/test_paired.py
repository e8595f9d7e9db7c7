"""benchmarks/paired.py: mAP50-95 recomputed from each image's matches, and the paired draws over images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from .conftest import BCCD_STUDENT, BCCD_YAML, needs_shared

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired.py"


@pytest.fixture(scope="module")
def paired() -> ModuleType:
    """The script as a module; benchmarks/ on the path for its import of gain.py, as when it runs."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("paired", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def image(hits: list[bool], conf: list[float], targets: int) -> dict:
    """One image of one class: its predictions (a hit at every IoU threshold or none) and its number of targets."""
    return {
        "tp": np.array([[h] * 10 for h in hits], dtype=bool).reshape(-1, 10),
        "conf": np.array(conf, dtype=float),
        "pred_cls": np.zeros(len(hits)),
        "target_cls": np.zeros(targets),
    }


def test_map_of_hand_made_matches(paired: ModuleType) -> None:
    # ultralytics' AP: precision over a 101-point recall grid, 0 from the last recall reached on (that grid point
    # included), summed by trapezoids. Every target found, nothing else: 1 up to recall 0.99, then 1 -> 0 over 0.01
    assert paired.map5095([image([True], [0.9], 1), image([True], [0.8], 1)]) == pytest.approx(0.99 + 0.005)
    # one of two targets found: 1 up to recall 0.49, 0 from 0.5 on
    assert paired.map5095([image([True], [0.9], 1), image([], [], 1)]) == pytest.approx(0.49 + 0.005)
    # a false positive ranked above both hits: the envelope is 2 / 3 (2 hits of 3 predictions) at every recall
    assert paired.map5095([image([False, True], [0.95, 0.9], 1), image([True], [0.8], 1)]) == pytest.approx(
        0.99 * 2 / 3 + 0.005 * 2 / 3
    )


def test_a_run_drawn_beside_itself_differs_by_nothing_and_draws_repeat(paired: ModuleType) -> None:
    run = [image([True], [0.9], 1), image([False, True], [0.95, 0.5], 2), image([], [], 1)]
    drawn = paired.bootstrap([run, run], 50)
    assert np.array_equal(drawn[:, 0], drawn[:, 1]) and len(set(drawn[:, 0])) > 1  # same draw per row, draws differ
    assert np.array_equal(drawn, paired.bootstrap([run, run], 50))  # seeded


@needs_shared
def test_the_recomputed_map_is_the_validators(paired: ModuleType) -> None:
    score, images = paired.per_image_matches(str(BCCD_STUDENT), str(BCCD_YAML), 128, "test")
    assert len(images) == 72 and score > 0.1
    assert paired.map5095([matches for _, matches in images]) == pytest.approx(score, abs=1e-9)
