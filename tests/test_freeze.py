"""``freeze=N``: the student's first N layers keep their weights and BatchNorm statistics; the rest trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_cli.errors import DistillError
from distill_cli.training import train


def test_frozen_layers_keep_weights_and_statistics_while_the_rest_trains(run_kwargs: dict) -> None:
    """A yaml student updates its BatchNorm statistics, except in the frozen layers; the optimizer never moves
    them (no gradient reaches them) while the neck, the head and the adapters train."""
    start: dict[str, torch.Tensor] = {}
    states = []

    def record(event: str, info: dict) -> None:
        if event == "start":
            states.append(info["state"])
            start.update({k: v.detach().clone() for k, v in info["state"].distiller.student.state_dict().items()})

    train(recipe="cwd", freeze=10, callback=record, report=False, **run_kwargs)
    student = states[0].distiller.student
    after = student.state_dict()
    frozen = {k for k in after if int(k.split(".")[1]) < 10}
    moved = {k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, start[k])}
    assert frozen and not frozen & moved, f"frozen tensors changed: {sorted(frozen & moved)[:3]}"
    assert any(".running_mean" in k for k in moved) and any(k.endswith(".weight") for k in moved)
    assert not any(p.requires_grad for p in student.model[:10].parameters())


@pytest.mark.parametrize(
    ("recipe", "freeze", "message"),
    [
        ("none", 23, "freeze 23 leaves nothing to train: the student has 23 layers"),
        ("cwd", 16, "freeze 16 would fix student layer 15, which the recipe distils"),
    ],
)
def test_a_freeze_that_leaves_nothing_to_train_is_refused_before_a_file_is_written(
    run_kwargs: dict, recipe: str, freeze: int, message: str
) -> None:
    with pytest.raises(DistillError, match=message):
        train(recipe=recipe, freeze=freeze, report=False, **run_kwargs)
    assert not (Path(run_kwargs["project"]) / "exp").exists()
