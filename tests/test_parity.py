"""With recipe ``none`` our loop trains like ultralytics' DetectionTrainer, family by family: the same optimizer and
parameter groups, the same learning rate and momentum per group at every epoch, the same criterion state (the E2E
branch gains), the same close_mosaic, the same number of EMA updates, and the same detection loss on the same batch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from ultralytics.cfg import get_cfg
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.metrics import Metric
from ultralytics.utils.torch_utils import unwrap_model

from distill_cli import training
from distill_cli.config import RunConfig
from distill_cli.data import hyperparameters
from distill_cli.distiller import Distiller
from distill_cli.optimizer import build_optimizer, parameter_kinds
from distill_cli.runlog import fitness
from distill_cli.training import train

FAMILIES = ["yolov8n.yaml", "yolo11n.yaml", "yolo12n.yaml", "yolov10n.yaml", "yolo26n.yaml"]
# nbs 8: 2 steps an epoch accumulate 2, so the warm-up (2 steps) and its accumulation ramp leave the run an optimizer
# step after them; at nbs 64 both trainers would spend theirs at LR 0 (ours then skips the warm-up: schedule.py)
SETTINGS = {
    "epochs": 2,
    "batch": 4,
    "nbs": 8,
    "imgsz": 64,
    "workers": 0,
    "close_mosaic": 1,
    "seed": 0,
    "deterministic": True,
}


def criterion_state(model: torch.nn.Module) -> tuple:
    criterion = model.criterion
    return (getattr(criterion, "o2m", None), getattr(criterion, "o2o", None), getattr(criterion, "updates", None))


def mosaic_on(dataset) -> bool:
    """Whether the dataset's transforms still apply mosaic (close_mosaic rebuilds them with p = 0)."""
    stack = [dataset.transforms]
    while stack:
        transform = stack.pop()
        if type(transform).__name__ == "Mosaic":
            return transform.p > 0
        stack.extend(getattr(transform, "transforms", []))
    return False


def ultralytics_run(model: str, data: Path, project: Path) -> dict:
    """Train with ultralytics' own trainer; record per epoch what our loop must reproduce, and the first batch."""
    trainer = DetectionTrainer(
        overrides={
            "model": model,
            "data": str(data),
            "device": "cpu",
            "amp": False,
            "plots": False,
            "val": False,
            "project": str(project),
            "name": "ultralytics",
            "verbose": False,
            **SETTINGS,
        }
    )
    seen: dict = {"lrs": [], "momenta": [], "criterion": [], "mosaic": []}
    original_preprocess = trainer.preprocess_batch

    def preprocess(batch: dict) -> dict:
        batch = original_preprocess(batch)
        if "batch" not in seen:
            seen["batch"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            seen["model"] = copy.deepcopy(unwrap_model(trainer.model))
        return batch

    def on_batch_start(t: DetectionTrainer) -> None:
        if len(seen["mosaic"]) == t.epoch:
            seen["mosaic"].append(mosaic_on(t.train_loader.dataset))

    def on_batch_end(t: DetectionTrainer) -> None:
        seen.setdefault("loss", float(t.loss))

    def on_epoch_end(t: DetectionTrainer) -> None:
        seen["lrs"].append([g["lr"] for g in t.optimizer.param_groups])
        seen["momenta"].append([g.get("momentum") for g in t.optimizer.param_groups])
        seen["criterion"].append(criterion_state(unwrap_model(t.model)))

    trainer.preprocess_batch = preprocess
    trainer.add_callback("on_train_batch_start", on_batch_start)
    trainer.add_callback("on_train_batch_end", on_batch_end)
    trainer.add_callback("on_train_epoch_end", on_epoch_end)
    trainer.train()
    seen["optimizer"] = type(trainer.optimizer).__name__
    seen["ema_updates"] = trainer.ema.updates
    return seen


def our_run(model: str, data: Path, project: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    seen: dict = {"lrs": [], "momenta": [], "criterion": [], "mosaic": []}
    original_start = training.start_epoch_data

    def start_epoch_data(train_loader, *args) -> None:
        original_start(train_loader, *args)
        seen["mosaic"].append(mosaic_on(train_loader.dataset))

    def callback(event: str, info: dict) -> None:
        if event == "start":
            seen["state"] = info["state"]
        if event == "epoch":
            state = seen["state"]
            seen["lrs"].append([g["lr"] for g in state.optimizer.param_groups])
            seen["momenta"].append([g.get("momentum") for g in state.optimizer.param_groups])
            seen["criterion"].append(criterion_state(state.distiller.student))

    monkeypatch.setattr(training, "start_epoch_data", start_epoch_data)
    train(
        recipe="none",
        student=model,
        data=str(data),
        device="cpu",
        project=str(project),
        name="ours",
        report=False,
        callback=callback,
        **SETTINGS,
    )
    seen["optimizer"] = type(seen["state"].optimizer).__name__
    seen["ema_updates"] = seen["state"].ema.updates
    return seen


@pytest.mark.parametrize("model", FAMILIES)
def test_recipe_none_trains_like_ultralytics(
    model: str, synthetic_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = ultralytics_run(model, synthetic_data, tmp_path)
    ours = our_run(model, synthetic_data, tmp_path, monkeypatch)
    assert ours["optimizer"] == theirs["optimizer"]
    assert len(ours["lrs"]) == len(theirs["lrs"]) == SETTINGS["epochs"]
    for mine, ref in zip(ours["lrs"], theirs["lrs"], strict=True):
        assert mine == pytest.approx(ref, rel=1e-9)
    assert ours["momenta"] == theirs["momenta"]
    assert ours["criterion"] == theirs["criterion"]  # E2E: o2m/o2o decayed per epoch over the run's epochs
    assert ours["mosaic"] == theirs["mosaic"] == [True, False]
    assert ours["ema_updates"] == theirs["ema_updates"]
    # the same model on the same batch: our detection loss (per image, x batch) is ultralytics' loss
    student = copy.deepcopy(theirs["model"])
    student.args = hyperparameters(epochs=SETTINGS["epochs"])
    student.criterion = student.init_criterion()
    batch = theirs["batch"]
    det, _ = Distiller(student, {}, {}).train()(batch, None, ())
    assert float(det.total) * batch["img"].shape[0] == pytest.approx(theirs["loss"], rel=1e-5)


@pytest.mark.parametrize("model", ["yolov8n.yaml", "yolo26n.yaml"])
@pytest.mark.parametrize("iterations", [100, 20000])
def test_optimizer_groups_match_ultralytics(model: str, iterations: int) -> None:
    """Short runs: AdamW at the fitted LR; long runs: MuSGD with the class head at 3x the LR. Same groups, same
    parameters in each, same LR, momentum and weight decay."""
    torch.manual_seed(0)
    student = DetectionModel(model, nc=3, verbose=False)
    args = get_cfg(overrides={"batch": 16})
    stand_in = SimpleNamespace(args=args, data={"nc": 3})
    decay = args.weight_decay * args.batch * round(args.nbs / args.batch) / args.nbs
    theirs = BaseTrainer.build_optimizer(stand_in, student, "auto", args.lr0, args.momentum, decay, iterations)
    cfg = RunConfig(batch=16, nbs=64)
    ours, chosen = build_optimizer(Distiller(student, {}, {}), cfg, 3, iterations)
    assert type(ours) is type(theirs) and chosen.optimizer == type(theirs).__name__
    assert len(ours.param_groups) == len(theirs.param_groups)
    for mine, ref in zip(ours.param_groups, theirs.param_groups, strict=True):
        assert [id(p) for p in mine["params"]] == [id(p) for p in ref["params"]]
        for key in ("lr", "weight_decay", "momentum", "betas", "nesterov", "use_muon", "param_group"):
            assert mine.get(key) == ref.get(key), key


def test_adapters_of_a_term_whose_name_holds_bias_keep_weight_decay() -> None:
    """A parameter is a bias by its own name: the module path holds the recipe's term names (any word), and a term
    named ``cwd_bias`` used to send its adapters' weights to the bias group (no decay, bias warm-up LR)."""
    terms = nn.ModuleDict({"cwd_bias": nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))})
    kinds = parameter_kinds(terms, muon=False)
    conv, norm = terms["cwd_bias"]
    ids = {kind: [id(p) for p in params] for kind, params in kinds.items()}
    assert ids == {"weight": [id(conv.weight)], "bn": [id(norm.weight)], "bias": [id(conv.bias), id(norm.bias)]}


def test_best_pt_is_chosen_by_ultralytics_fitness() -> None:
    """ultralytics 8.4 keeps the epoch with the highest mAP50-95 (mAP50 weighs 0): of two epochs, the one with the
    higher mAP50-95 wins even when its mAP50 is lower."""
    epochs = [{"mAP50": 0.60, "mAP50-95": 0.400}, {"mAP50": 0.50, "mAP50-95": 0.405}]
    for metrics in epochs:
        theirs = Metric()
        theirs.mean_results = lambda m=metrics: [0.8, 0.7, m["mAP50"], m["mAP50-95"]]
        assert fitness(metrics) == pytest.approx(theirs.fitness())
    assert max(range(2), key=lambda i: fitness(epochs[i])) == 1
