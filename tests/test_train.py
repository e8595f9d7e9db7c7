"""End-to-end training on generated data: every recipe runs, writes a student-only checkpoint ultralytics loads,
adapters train, the teacher never changes."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from ultralytics import YOLO

from distill_cli import engine
from distill_cli.config import RunConfig, list_recipes, load_recipe
from distill_cli.errors import DistillError
from distill_cli.settings import max_grad_norm, resolve_auto
from distill_cli.start import warn_if_short
from distill_cli.training import train


class Recorder:
    """train() callback that snapshots the live models at start."""

    def __init__(self) -> None:
        self.state = None
        self.events: list[str] = []

    def __call__(self, event: str, info: dict) -> None:
        self.events.append(event)
        if event == "start":
            self.state = info["state"]
            self.student0 = clone(self.state.distiller.student.state_dict())
            self.adapters0 = clone(self.state.distiller.terms.state_dict())
            self.teacher0 = clone(self.state.teacher.model.state_dict()) if self.state.teacher else {}


def clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize("recipe", list_recipes())
def test_one_epoch_per_recipe_writes_a_loadable_student(recipe: str, run_kwargs: dict) -> None:
    recorder = Recorder()
    result = train(recipe=recipe, callback=recorder, **run_kwargs)
    assert recorder.events[0] == "start" and recorder.events[-1] == "end"
    student = recorder.state.distiller.student
    ckpt = torch.load(result.best, map_location="cpu", weights_only=False)
    assert set(ckpt) == {"date", "version", "model", "train_args", "distill"}  # no teacher, no adapters
    assert sum(p.numel() for p in ckpt["model"].parameters()) == sum(p.numel() for p in student.parameters())
    model = YOLO(str(result.best))
    assert model.names == {0: "circle", 1: "square", 2: "triangle"}
    final = result.last
    trained = torch.load(final, map_location="cpu", weights_only=False)["model"].float().state_dict()
    assert "resume" not in torch.load(final, map_location="cpu", weights_only=False)  # finished: student only
    changed = [
        k
        for k, v in trained.items()
        if v.is_floating_point() and not torch.equal(v, recorder.student0[k].float().half().float())
    ]
    assert changed, "training did not change the student"
    if recorder.state.teacher is not None:
        for k, v in recorder.state.teacher.model.state_dict().items():
            assert torch.equal(v, recorder.teacher0[k]), f"teacher tensor {k} changed"
        params = dict(recorder.state.distiller.terms.named_parameters())
        if params:
            assert any(not torch.equal(p, recorder.adapters0[k]) for k, p in params.items()), "adapters did not train"
            assert all(p.requires_grad for p in params.values())
        opt_params = {id(p) for g in recorder.state.optimizer.param_groups for p in g["params"]}
        assert all(id(p) in opt_params for p in params.values()), "an adapter is missing from the optimizer"
        assert not any(id(p) in opt_params for p in recorder.state.teacher.model.parameters())


def test_run_dir_files_and_no_overwrite(run_kwargs: dict) -> None:
    first = train(recipe="cwd", **run_kwargs)
    second = train(recipe="cwd", **run_kwargs)
    assert first.run_dir.name == "exp" and second.run_dir.name == "exp2"
    for name in ("config.yaml", "results.csv", "weights/best.pt", "weights/last.pt"):
        assert (first.run_dir / name).is_file()
    header = (first.run_dir / "results.csv").read_text().splitlines()[0].split(",")
    for column in ("epoch", "box_loss", "cls_loss", "dfl_loss", "cwd_raw", "cwd_w", "val/mAP50-95", "val/mAP50"):
        assert column in header
    meta = torch.load(first.best, map_location="cpu", weights_only=False)["distill"]
    assert meta["teacher"] == run_kwargs["teacher"] and meta["recipe"] == "cwd" and meta["yolodistill_version"]
    assert meta["config"]["recipe"]["losses"]["cwd"]["tau"] == 1.0


def test_ultralytics_can_validate_predict_and_export_the_student(run_kwargs: dict, synthetic_data: Path) -> None:
    result = train(recipe="logits", **run_kwargs)
    model = YOLO(str(result.best))
    metrics = model.val(data=str(synthetic_data), imgsz=64, batch=4, device="cpu", plots=False)
    assert 0.0 <= metrics.box.map <= 1.0
    images = sorted((synthetic_data.parent / "images" / "val").glob("*.png"))
    assert len(model.predict(str(images[0]), imgsz=64, device="cpu", verbose=False)) == 1
    onnx_file = Path(model.export(format="onnx", imgsz=64, device="cpu"))
    assert onnx_file.is_file() and onnx_file.stat().st_size > 1_000_000


def test_class_mismatch_stops_output_distillation_before_anything_is_written(run_kwargs: dict, tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    from .conftest import save_model

    other = DetectionModel("yolov8s.yaml", nc=2, verbose=False)
    other.names = {0: "cat", 1: "dog"}
    run_kwargs["teacher"] = str(save_model(tmp_path / "other.pt", other))
    with pytest.raises(DistillError, match="'cls_kd': teacher classes .* needs the same class list"):
        train(recipe="logits", **run_kwargs)
    assert not (Path(run_kwargs["project"]) / "exp").exists()
    with pytest.warns(UserWarning, match="distilling features only"):
        train(recipe="cwd", **run_kwargs)


def random_resize_scales(dataset) -> set[float]:
    """The ``scale`` of every RandomPerspective in a dataset's transforms (inside nested Compose too)."""
    from ultralytics.data.augment import Compose, RandomPerspective

    found, todo = set(), [dataset.transforms]
    while todo:
        transform = todo.pop()
        if isinstance(transform, RandomPerspective):
            found.add(transform.scale)
        elif isinstance(transform, Compose):
            todo.extend(transform.transforms)
    return found


def test_a_fine_tune_keeps_batchnorm_statistics_steps_every_batch_averages_late_and_does_not_resize(
    run_kwargs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .pt student is fine-tuned with frozen BatchNorm statistics, an optimizer step per batch, an EMA that
    averages over the last tenth of the run and no random resize of its training images; a yaml student trains as
    ultralytics trains (statistics updated, nominal batch 64, ultralytics' EMA and resize jitter)."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    from distill_cli import training
    from distill_cli.data import SYNTHETIC_CLASSES

    from .conftest import save_model

    loaders = []
    original = training.build_loader

    def recorded_loader(*args, **kwargs):
        loaders.append(original(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(training, "build_loader", recorded_loader)
    torch.manual_seed(0)
    trained = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    trained.names = dict(enumerate(SYNTHETIC_CLASSES))
    student = save_model(tmp_path / "student.pt", trained)
    for spec, frozen in ((str(student), True), ("yolov8n.yaml", False)):
        recorder = Recorder()
        result = train(
            recipe="cwd", callback=recorder, report=False, **{**run_kwargs, "student": spec, "name": spec[-4:]}
        )
        state = recorder.state
        stats = {k: v for k, v in state.distiller.student.state_dict().items() if "running_" in k}
        unchanged = all(torch.equal(v, recorder.student0[k]) for k, v in stats.items())
        assert unchanged == frozen and state.cfg.bn_stats == ("frozen" if frozen else "update")
        assert state.cfg.nbs == (run_kwargs["batch"] if frozen else 64)
        assert state.ema.updates == (result.epochs_done * state.steps_per_epoch if frozen else 1)
        steps = result.epochs_done * state.steps_per_epoch  # 2 here: a copy of the live weights in a fine-tune
        decay = 0.0 if frozen else 0.9999 * (1 - math.exp(-steps / 2000))
        assert state.ema.decay(steps) == pytest.approx(decay) and (state.cfg.ema_decay > 0) != frozen
        saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
        assert (saved["ema_decay"], saved["ema_tau"]) == (state.cfg.ema_decay, state.cfg.ema_tau)
        scale = 0.0 if frozen else DEFAULT_CFG.scale  # ultralytics' 0.5
        train_set = next(loader.dataset for loader in loaders if loader.dataset.augment)
        assert saved["scale"] == scale and random_resize_scales(train_set) == {scale}
        loaders.clear()


class Trained(torch.nn.Module):
    """A teacher as far as the warning reads it: the image size of its training arguments."""

    def __init__(self, imgsz: int | None) -> None:
        super().__init__()
        self.args = {"imgsz": imgsz} if imgsz else {}


@pytest.mark.parametrize(
    ("student", "recipe", "view", "imgsz", "trained", "steps", "warned"),
    [
        ("s.pt", "default", "1", 448, 512, 99, True),  # the default with keep_start 0 (below, each case's)
        ("s.pt", "default", "1.0", 448, 512, 99, True),  # the same view written as a float
        ("s.pt", "logits", "1", 512, 512, 39, True),  # any recipe with the class term, at the teacher's own size
        ("s.pt", "default", "1", 640, 512, 39, False),  # above the teacher's size: 2 of 28 cells lost there
        ("s.pt", "default", "1", 576, 512, 39, False),
        ("s.pt", "default", "1", 400, 520, 39, False),  # trained at 1.3x the run's size: not near it
        ("s.pt", "default", "1", 448, 512, 100, False),  # 100 steps or more
        ("s.pt", "default", "1+2", 448, 512, 39, False),  # a larger view
        ("s.pt", "default", "1", 384, 512, 39, False),  # where auto would not keep 1: not measured
        ("s.pt", "default", "1", 448, None, 39, False),  # the teacher's training size unknown
        ("s.pt", "mgd", "1", 448, 512, 39, False),  # no class term
        ("s.pt", "none", "1", 448, 512, 39, False),  # nothing distilled
        ("s.yaml", "default", "1", 448, 512, 39, False),  # from scratch: not a fine-tune
        ("s.pt", "default+keep", "1", 448, 512, 39, False),  # the student as given kept beside the teacher
    ],
)
def test_a_short_fine_tune_with_the_teacher_at_1_at_or_below_its_size_is_warned(
    student: str, recipe: str, view: str, imgsz: int, trained: int | None, steps: int, warned: bool
) -> None:
    keep = "1" if recipe.endswith("+keep") else "0"
    recipe = recipe.removesuffix("+keep")
    recipe_given = replace(load_recipe(recipe), teacher_scale=view, keep_start=keep)
    cfg = RunConfig(student=student, recipe=recipe_given, recipe_name=recipe, imgsz=imgsz)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_short(cfg, Trained(trained), steps)
    assert [str(w.message).split(",")[0] for w in caught] == ([f"{steps} optimizer steps"] if warned else [])


def near_native_fine_tune(run_kwargs: dict, tmp_path: Path) -> dict:
    """``run_kwargs`` for a fine-tune of a saved student by a teacher trained at the run's size (the teacher at 1)."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.data import SYNTHETIC_CLASSES

    from .conftest import save_model, saved_teacher

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = dict(enumerate(SYNTHETIC_CLASSES))
    student = save_model(tmp_path / "student.pt", model)
    teacher = saved_teacher(tmp_path / "teacher.pt", "yolov8s.yaml", 64)
    return {**run_kwargs, "student": str(student), "teacher": str(teacher)}


def short_run_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "optimizer steps, with the teacher at 1" in str(w.message)]


@pytest.mark.parametrize("nbs", [0, 8])
def test_train_counts_a_fine_tunes_optimizer_steps_for_the_warning(run_kwargs: dict, tmp_path: Path, nbs: int) -> None:
    """One epoch of the synthetic data's batches with a teacher trained at the run's size: a step each (a fine-tune's
    auto nbs is its batch), or one every two batches with nbs 8 at batch 4."""
    recorder = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(recipe="logits", callback=recorder, nbs=nbs, **near_native_fine_tune(run_kwargs, tmp_path))
    short = short_run_warnings(caught)
    steps = recorder.state.steps_per_epoch // (2 if nbs else 1)
    assert short and short[0].startswith(f"{steps} optimizer steps,"), short
    assert recorder.state.steps_per_epoch >= 2 and result.epochs_done == 1  # so that nbs 8 halves the count


def test_a_resumed_short_fine_tune_is_not_warned_again(run_kwargs: dict, tmp_path: Path) -> None:
    """The warning is advice on the run's length, which a resumed run cannot change: it was given at the start."""
    from .test_resume import interrupt_after_epoch

    kwargs = {**near_native_fine_tune(run_kwargs, tmp_path), "epochs": 2}
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DistillError, match="--resume"):
        warnings.simplefilter("always")
        train(recipe="logits", callback=interrupt_after_epoch(1), **kwargs)
    assert short_run_warnings(caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(resume=Path(kwargs["project"]) / kwargs["name"]).epochs_done == 2
    assert not short_run_warnings(caught)


@pytest.mark.parametrize(
    ("student", "scale", "expected"),
    [("s.pt", None, 0.0), ("s.yaml", None, 0.5), ("s.yaml", 0.0, 0.0), ("s.pt", 0.5, 0.5), ("s.pt", 0.2, 0.2)],
)
def test_scale_auto_is_no_resize_in_a_fine_tune_and_ultralytics_from_scratch_and_a_given_value_wins(
    student: str, scale: float | None, expected: float
) -> None:
    assert resolve_auto(RunConfig(student=student, scale=scale)).scale == expected


def test_a_short_fine_tune_averages_its_weights_and_a_long_one_gets_ultralytics_ema() -> None:
    """ultralytics' EMA is still a copy of the live weights at the end of a 130-step fine-tune (decay 0.063): ours
    averages over its last ~13 steps (decay 0.923, reached well before the end); from 100000 steps on, and from
    scratch, it is ultralytics' EMA; values given with --set are kept."""
    from torch import nn
    from ultralytics.utils.torch_utils import ModelEMA

    from distill_cli.config import RunConfig
    from distill_cli.settings import resolve_ema

    def ema(batches: int, **fields: object) -> tuple[float, float]:  # one epoch of ``batches``
        cfg = resolve_ema(RunConfig(**{"student": "s.pt", "batch": 8, "nbs": 8, "epochs": 1, **fields}), batches)
        return cfg.ema_decay, cfg.ema_tau

    assert ema(130) == pytest.approx((1 - 1 / 13, 9.75))
    decay, tau = ema(130)  # ultralytics' ramp, decay x (1 - e^(-updates / tau)), is over by the last step
    assert ModelEMA(nn.Linear(1, 1), decay, tau).decay(130) == pytest.approx(1 - 1 / 13, abs=1e-5)
    assert ema(520, nbs=32) == ema(130)  # 4 batches a step: the same 130 optimizer steps
    assert ema(3, nbs=64) == (0.0, 0.75)  # under 10 steps: a copy of the live weights
    assert ema(5_000) == pytest.approx((0.998, 375))  # decay and time constant both fitted
    assert ema(30_000) == pytest.approx((1 - 1 / 3000, 2000))  # long enough for tau 2000, decay still fitted
    ultralytics = (0.9999, 2000.0)
    assert ema(400_000) == ema(130, student="yolov8n.yaml") == ultralytics
    assert ema(130, ema_decay=0.9999, ema_tau=2000) == ultralytics


def test_a_fine_tune_picks_its_optimizer_by_ultralytics_iteration_count(
    run_kwargs: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step every batch must not make optimizer: auto count 64/batch times more iterations than ultralytics
    (which would pick MuSGD where ultralytics picks AdamW); the chosen precision is written into the config, and
    with grad_clip auto an AdamW fine-tune runs unclipped and its start-up line says so."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli import training
    from distill_cli.data import SYNTHETIC_CLASSES

    from .conftest import save_model

    counted = []
    original = training.build_optimizer
    monkeypatch.setattr(training, "build_optimizer", lambda m, c, nc, it: counted.append(it) or original(m, c, nc, it))
    max_norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        engine.nn.utils, "clip_grad_norm_", lambda p, max_norm: max_norms.append(max_norm) or clip(p, max_norm)
    )
    trained = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    trained.names = dict(enumerate(SYNTHETIC_CLASSES))
    started: list[dict] = []

    def callback(event: str, info: dict) -> None:
        started.extend([info] if event == "start" else [])

    student = str(save_model(tmp_path / "s.pt", trained))
    result = train(recipe="cwd", report=False, callback=callback, **{**run_kwargs, "student": student})
    assert counted == [1]  # ceil(8 images / max(batch 4, 64)) x 1 epoch, as ultralytics counts
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["nbs"] == 4 and saved["bn_stats"] == "frozen" and saved["amp_dtype"] in ("bf16", "fp32")
    # grad_clip auto: an AdamW fine-tune's steps are not clipped
    assert saved["optimizer"] == "AdamW" and saved["grad_clip"] == 0
    assert max_norms and set(max_norms) == {math.inf}
    assert started[0]["optimizer"] == "optimizer AdamW, lr0 0.001429, no gradient clip (grad_clip auto)"


@pytest.mark.parametrize(
    ("student", "optimizer", "grad_clip", "expected"),
    [
        ("s.pt", "AdamW", 0.0, math.inf),  # auto: an Adam-family fine-tune runs without the clip
        ("s.pt", "NAdam", 0.0, math.inf),
        ("s.pt", "SGD", 0.0, 10.0),  # SGD's step grows with the gradient: ultralytics' clip
        ("yolov8n.yaml", "AdamW", 0.0, 10.0),  # from scratch: ultralytics' clip
        ("s.pt", "AdamW", 3.0, 3.0),  # a value given is always the clip
        ("yolov8n.yaml", "SGD", 1e9, 1e9),
    ],
)
def test_the_clip_is_off_only_for_an_adam_fine_tune_when_auto(
    student: str, optimizer: str, grad_clip: float, expected: float
) -> None:
    assert max_grad_norm(RunConfig(student=student, optimizer=optimizer, grad_clip=grad_clip)) == expected


def test_clip_summary_is_the_mean_norm_and_the_share_of_steps_rescaled() -> None:
    assert engine.clip_summary([4.0, 12.0, 20.0, float("inf")], max_norm=10.0) == {"grad_norm": 12.0, "clipped": 2 / 3}
    assert engine.clip_summary([float("nan")], max_norm=10.0) == {}


@pytest.mark.parametrize("grad_clip", [1e-6, 1e12])
def test_results_record_each_epochs_gradient_norm_before_the_clip(
    grad_clip: float, run_kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    norms: list[float] = []  # this epoch's, reset by the callback at each epoch's end
    per_epoch: list[list[float]] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, **kwargs):
        norm = clip(params, max_norm, **kwargs)
        norms.append(float(norm))
        return norm

    def callback(event: str, info: dict) -> None:
        if event == "epoch":
            per_epoch.append(list(norms))
            norms.clear()

    monkeypatch.setattr(engine.nn.utils, "clip_grad_norm_", recording_clip)
    # nbs = batch: an optimizer step every batch, 2 a epoch; the mean must be over them, epoch by epoch
    options = {**run_kwargs, "epochs": 2, "nbs": 4, "grad_clip": grad_clip}
    result = train(recipe="default", callback=callback, **options)
    assert [len(n) for n in per_epoch] == [2, 2]
    for row, seen in zip(result.history, per_epoch, strict=True):
        assert row["grad_norm"] == pytest.approx(sum(seen) / len(seen), rel=1e-5)
        assert row["clipped"] == (1.0 if grad_clip < 1 else 0.0)
    header = (result.run_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert {"grad_norm", "clipped"} <= set(header)


def test_training_steps_run_on_the_process_thread_count_after_each_validation(run_kwargs: dict) -> None:
    """ultralytics' validator sets torch's CPU threads to its own NUM_THREADS (1 on a 2-core machine) for good; the
    steps after the first validation ran on those until the count was put back after each validation."""
    from ultralytics.utils import torch_utils

    before = torch.get_num_threads()
    threads = 2 if torch_utils.NUM_THREADS == 1 else 1  # a count the validator would not leave
    seen: list[int] = []

    def callback(event: str, info: dict) -> None:
        if event in ("step", "epoch"):
            seen.append(torch.get_num_threads())

    torch.set_num_threads(threads)
    try:
        train(recipe="default", callback=callback, **{**run_kwargs, "epochs": 2})
    finally:
        torch.set_num_threads(before)
    assert len(seen) >= 4 and set(seen) == {threads}


def test_the_api_imports_torch_before_ultralytics_which_would_leave_it_one_thread() -> None:
    """ultralytics sets OMP_NUM_THREADS=1 where it is unset, and a torch imported after it starts on 1 thread;
    ``compare``'s module imports ultralytics first, so the API imports torch before any of its modules."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}

    def threads(code: str) -> int:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    expected = threads("import torch; print(torch.get_num_threads())")
    assert threads("from distill_cli import compare; import torch; print(torch.get_num_threads())") == expected
