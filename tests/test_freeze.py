"""``freeze=N``: the student's first N layers keep their weights and BatchNorm statistics; the rest trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_cli.errors import DistillError
from distill_cli.training import train


@pytest.mark.parametrize("trained", [False, True], ids=["yaml", "pt"])
def test_frozen_layers_keep_weights_and_statistics_while_the_rest_trains(
    run_kwargs: dict, tmp_path: Path, trained: bool
) -> None:
    """A yaml student updates its BatchNorm statistics, except in the frozen layers; a .pt student keeps them all.
    Either way the optimizer never moves layers 0-9 while the neck and the head train."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.data import SYNTHETIC_CLASSES

    from .conftest import save_model

    student_spec = "yolov8n.yaml"
    if trained:
        model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
        model.names = dict(enumerate(SYNTHETIC_CLASSES))
        student_spec = str(save_model(tmp_path / "student.pt", model))
    start: dict[str, torch.Tensor] = {}
    states, lines = [], []

    def record(event: str, info: dict) -> None:
        if event == "start":
            states.append(info["state"])
            lines.append(info["student_init"])
            start.update({k: v.detach().clone() for k, v in info["state"].distiller.student.state_dict().items()})

    train(recipe="cwd", freeze=10, callback=record, report=False, **{**run_kwargs, "student": student_spec})
    student = states[0].distiller.student
    after = student.state_dict()
    moved = {k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, start[k])}
    layer = {k: int(k.split(".")[1]) for k in after}
    assert not {k for k in moved if layer[k] < 10}, "a frozen tensor changed"
    assert any(k.endswith(".weight") and 10 <= layer[k] < 22 for k in moved), "the neck did not train"
    assert any(".running_mean" in k for k in moved) != trained
    assert not any(p.requires_grad for p in student.model[:10].parameters())
    assert all(p.requires_grad for p in student.model[10:-1].parameters())
    assert lines[0].endswith("; layers 0-9 frozen; adapters: fit")


@pytest.mark.parametrize(
    ("recipe", "freeze", "message"),
    [
        ("none", 23, r"freeze 23 leaves nothing to train: the student has 23 layers; freeze <= 22"),
        ("cwd", 16, r"freeze 16 would fix student layer 15, which 'cwd' distils; freeze <= 15"),
        ("crosskd", 19, r"freeze 19 would fix student layer 15, which 'crosskd' distils; freeze <= 15"),
    ],
)
def test_a_freeze_that_would_fix_every_layer_or_a_distilled_one_is_refused_before_a_file_is_written(
    run_kwargs: dict, recipe: str, freeze: int, message: str
) -> None:
    with pytest.raises(DistillError, match=message):
        train(recipe=recipe, freeze=freeze, report=False, **run_kwargs)
    assert not Path(run_kwargs["project"]).exists()
