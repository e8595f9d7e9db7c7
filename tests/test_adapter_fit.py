"""Adapters that start as the least-squares map from the student's layer to the teacher's (recipe ``adapters: fit``)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from distill_cli import training
from distill_cli.adapter_fit import RIDGE, accumulate, adapter_targets, fit_adapters, ridge_solution
from distill_cli.config import RunConfig, recipe_from_dict
from distill_cli.data import SYNTHETIC_CLASSES, hyperparameters
from distill_cli.distiller import Distiller, Teacher, build_terms
from distill_cli.engine import student_train_mode
from distill_cli.errors import DistillError
from distill_cli.features import as_rows
from distill_cli.models import load_model
from distill_cli.report import feature_agreement
from distill_cli.training import train

from .test_resume import interrupt_after_epoch


def test_the_ridge_solution_matches_an_independent_least_squares_solve() -> None:
    """``W = C_ts (C_ss + lambda I)^-1`` against ``lstsq`` of the centred rows stacked on ``sqrt(n lambda) I``."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 2, 0.5, 3, 1], dtype=torch.float64)
    s = torch.randn(400, 5, generator=generator, dtype=torch.float64) * scales + 3.0  # off-centre: the centring counts
    t = (
        s @ torch.randn(5, 3, generator=generator, dtype=torch.float64)
        + torch.randn(400, 3, generator=generator, dtype=torch.float64) * 0.1
        + 2.0
    )
    acc: dict[str, torch.Tensor] = {}
    accumulate(acc, s[:150], t[:150])  # in two parts, as image by image
    accumulate(acc, s[150:], t[150:])
    weight, bias = ridge_solution(acc)

    n, sc, tc = len(s), s - s.mean(0), t - t.mean(0)
    lam = RIDGE * sc.var(0, correction=0).mean()
    rows = torch.cat([sc, (n * lam).sqrt() * torch.eye(5, dtype=torch.float64)])
    targets = torch.cat([tc, torch.zeros(5, 3, dtype=torch.float64)])
    expected = torch.linalg.lstsq(rows, targets).solution.T
    torch.testing.assert_close(weight, expected)
    torch.testing.assert_close(bias, t.mean(0) - expected @ s.mean(0))


def test_an_exact_linear_map_is_recovered() -> None:
    generator = torch.Generator().manual_seed(1)
    s = torch.randn(1000, 4, generator=generator, dtype=torch.float64)
    true_w, true_b = (
        torch.tensor([[1.0, -2, 0, 0.5], [0, 1, 3, -1]], dtype=torch.float64),
        torch.tensor([0.5, -1.0], dtype=torch.float64),
    )
    acc: dict[str, torch.Tensor] = {}
    accumulate(acc, s, s @ true_w.T + true_b)
    weight, bias = ridge_solution(acc)
    torch.testing.assert_close(weight, true_w, atol=0.01, rtol=0.01)  # the ridge shrinks by about 0.1%
    torch.testing.assert_close(bias, true_b, atol=0.01, rtol=0.01)


UPDATE = RunConfig(bn_stats="update")  # a yaml student: BatchNorm on batch statistics while training


def cwd_distiller(tiny_teacher: Path, term: str = "cwd") -> tuple[Distiller, Teacher]:
    """A random yaml student (its BatchNorm running statistics still the initial ones) and the tiny teacher."""
    teacher_model = load_model(tiny_teacher)
    torch.manual_seed(0)
    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    student.names = dict(enumerate(SYNTHETIC_CLASSES))
    student.args = hyperparameters()
    terms, pairs = build_terms(student, teacher_model, recipe_from_dict({"losses": {term: {"weight": 1.0}}}), 64)
    teacher = Teacher(teacher_model, sorted({p.teacher for p in pairs[term]}), torch.device("cpu"), torch.float32)
    distiller = Distiller(student, terms, pairs).train()
    distiller.bind_teacher(teacher)
    return distiller, teacher


def rows(feature_maps: list[torch.Tensor]) -> torch.Tensor:
    """(B, C, H, W) maps -> (B*H*W, C) rows in fp64."""
    return torch.cat([as_rows(m) for m in feature_maps]).double()


def training_maps(distiller: Distiller, teacher: Teacher, images: list[torch.Tensor]) -> list[tuple]:
    """Per adapter: the student's and the teacher's maps as rows, as a training step sees them."""
    student, student_maps, teacher_maps = distiller.student, [], []
    student_train_mode(student, UPDATE)
    with torch.no_grad():
        for img in images:
            student(img)
            student_maps.append(distiller.hooks.pop())
            teacher_maps.append(teacher(img).feats)
    return [
        (conv, rows([m[s] for m in student_maps]), rows([m[t] for m in teacher_maps]))
        for conv, s, t in adapter_targets(distiller)
    ]


@pytest.mark.parametrize("term", ["cwd", "crosskd"])
def test_fitted_adapters_are_the_ridge_optimum_of_training_mode_maps(term: str, tiny_teacher: Path) -> None:
    """At the fitted weights the gradient of ``sum ||W s + b - t||^2 + n lambda ||W||^2`` (autograd, fp64, over the
    maps a training step sees) vanishes; a fit from eval-mode maps of a random student would be ~1e5 too large."""
    distiller, teacher = cwd_distiller(tiny_teacher, term)
    images = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    student_before = copy.deepcopy(distiller.student.state_dict())  # BatchNorm running statistics included
    fit_adapters(distiller, teacher, images, UPDATE)
    after = distiller.student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in student_before.items()) and distiller.student.training

    maps = training_maps(distiller, teacher, images)
    assert len(maps) == 3
    for conv, s, t in maps:
        weight = conv.weight.detach().double().flatten(1).requires_grad_()
        bias = conv.bias.detach().double().requires_grad_()
        lam = RIDGE * s.var(0, correction=0).mean()
        objective = ((s @ weight.T + bias - t) ** 2).sum() + len(s) * lam * (weight**2).sum()
        grad_w, grad_b = torch.autograd.grad(objective, (weight, bias))
        scale = (t**2).sum().sqrt() * s.abs().max()  # the size of the gradient's terms
        assert grad_w.abs().max() < 1e-4 * scale and grad_b.abs().max() < 1e-4 * scale


def test_a_new_run_fits_its_adapters_and_a_resumed_random_or_output_only_one_does_not(
    run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(training, "fit_adapters", lambda distiller, teacher, images, cfg: calls.append(list(images)))
    train(recipe="cwd", report=False, **run_kwargs)
    assert len(calls) == 1 and calls[0][0].shape[1:] == (3, 64, 64)  # the first train images at the run's size
    train(recipe="cwd", report=False, **{**run_kwargs, "name": "random", "adapters": "random"})
    train(recipe="default", report=False, **{**run_kwargs, "name": "plain"})  # output terms: no adapter to fit
    assert len(calls) == 1
    with pytest.raises(DistillError):
        train(recipe="cwd", callback=interrupt_after_epoch(1), **{**run_kwargs, "name": "cut", "epochs": 2})
    train(resume=Path(run_kwargs["project"]) / "cut")  # the adapters come from last.pt
    assert len(calls) == 2


def test_non_finite_maps_leave_the_adapters_as_they_were_with_a_warning(tiny_teacher: Path) -> None:
    distiller, teacher = cwd_distiller(tiny_teacher)
    before = copy.deepcopy(distiller.terms.state_dict())
    image = torch.rand(1, 3, 64, 64)
    image[0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="not finite, so it starts at random"):
        fit_adapters(distiller, teacher, [image], UPDATE)
    assert all(torch.equal(distiller.terms.state_dict()[k], v) for k, v in before.items())


def test_the_adapter_fit_and_the_reports_feature_check_read_the_teacher_alone_not_the_kept_start(
    tiny_teacher: Path,
) -> None:
    """Both read only the teacher's maps: the start (keep_start) answers nothing there, and the maps are those of a
    training step's teacher pass (bf16 would not change which pass runs)."""
    distiller, teacher = cwd_distiller(tiny_teacher)
    layers = sorted({pair.teacher for pair in distiller.pairs["cwd"]})
    with_start = Teacher(teacher.model, layers, torch.device("cpu"), torch.float32, start=distiller.student)
    start_calls: list[int] = []
    with_start.start.register_forward_hook(lambda *_: start_calls.append(1))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps, answered = with_start.features(images), with_start(images).feats
    assert maps.keys() == answered.keys() and all(torch.equal(maps[k], answered[k]) for k in maps)
    assert len(start_calls) == 1  # the full answer's pass of the start
    start_calls.clear()
    fit_adapters(distiller, with_start, [images], UPDATE)
    state = SimpleNamespace(distiller=distiller, teacher=with_start, device=torch.device("cpu"))
    batch = {"img": (images * 255).to(torch.uint8), **{k: torch.zeros(0) for k in ("cls", "bboxes", "batch_idx")}}
    assert feature_agreement(state, [batch]).keys() == {f"cwd {p.student}->{p.teacher}" for p in distiller.pairs["cwd"]}
    assert start_calls == []
