"""Tests for plausible bugs the rest of the suite let through (found by mutation testing): each fails on the mutated
code. The resume omissions (optimizer state, RNG state) are caught by test_resume.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill_cli.losses import DistillContext, build_loss
from distill_cli.training import train


def context(batch: int = 1, level: tuple[int, int] = (1, 3)) -> DistillContext:
    anchors = level[0] * level[1]
    return DistillContext(
        teacher_conf=torch.ones(batch, anchors),
        fg_mask=torch.ones(batch, anchors, dtype=torch.bool),
        anchors=torch.zeros(anchors, 2),
        level_sizes=[level],
    )


def test_cwd_is_kl_of_teacher_to_student_not_the_reverse() -> None:
    """KL(p_t || p_s) with distributions that are not mirror images: the reverse KL gives another number."""
    s = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 1, 3)
    t = torch.tensor([2.0, 0.0, 0.0]).view(1, 1, 1, 3)
    tau = 2.0

    def softmax(xs: list[float]) -> list[float]:
        e = [math.exp(x / tau) for x in xs]
        return [v / sum(e) for v in e]

    p_s, p_t = softmax([0.0, 1.0, 2.0]), softmax([2.0, 0.0, 0.0])
    forward = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True)) * tau**2
    reverse = sum(b * math.log(b / a) for a, b in zip(p_t, p_s, strict=True)) * tau**2
    assert abs(forward - reverse) > 0.05  # the check below tells the two apart
    loss = build_loss("cwd", {"tau": tau}, 1, 1)(s, t, context())
    assert loss.item() == pytest.approx(forward, rel=1e-5)


def test_mgd_draws_a_new_mask_every_call_at_the_given_ratio() -> None:
    torch.manual_seed(0)
    mgd = build_loss("mgd", {"ratio": 0.65}, 4, 4)
    seen: list[torch.Tensor] = []
    mgd.generator[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    s, t = torch.ones(4, 4, 32, 32), torch.zeros(4, 4, 32, 32)
    mgd(s, t, context(4, (32, 32)))
    mgd(s, t, context(4, (32, 32)))
    first, second = seen  # the generator's input is the student map (all ones) times the mask
    assert not torch.equal(first, second), "the mask was reused"
    assert not torch.equal(first[0], first[1]), "one mask for the whole batch"
    assert torch.equal(first[:, :1].expand_as(first), first), "the mask must cover all channels of a location"
    assert first.mean().item() == pytest.approx(0.35, abs=0.03)  # ratio 0.65 of the locations masked


def test_the_teacher_is_frozen_in_a_real_run(run_kwargs: dict) -> None:
    """The live teacher of a training run: eval mode, no parameter that could take a gradient, not optimised."""
    seen = {}

    def inspect(event: str, info: dict) -> None:
        if event == "start":
            state = info["state"]
            seen["requires_grad"] = [n for n, p in state.teacher.model.named_parameters() if p.requires_grad]
            seen["training"] = state.teacher.model.training
            in_optimizer = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
            seen["optimised"] = [n for n, p in state.teacher.model.named_parameters() if id(p) in in_optimizer]
            raise KeyboardInterrupt  # enough seen: stop before training

    with pytest.raises(Exception, match="interrupted"):
        train(recipe="cwd", callback=inspect, **{**run_kwargs, "report": False})
    assert seen == {"requires_grad": [], "training": False, "optimised": []}


def test_the_weight_schedule_counts_global_steps(run_kwargs: dict) -> None:
    """``stop_epoch: 1`` switches the term off from the second epoch on; a schedule fed the step within the epoch
    would never reach the stop step."""
    stop = {"losses.cwd.schedule.stop_epoch": 1, "adapters": "random"}  # fitted, CWD is ~0 on the tiny random teacher
    result = train(recipe="cwd", **{**run_kwargs, "epochs": 2, "report": False, **stop})
    first, second = result.history
    assert first["cwd_w"] > 0
    assert "cwd_w" not in second or math.isnan(float(second["cwd_w"])), second
    assert Path(result.best).is_file()
