"""DDP on CPU (gloo, 2 processes): a real torchrun run, gradient and adapter sync, loss scaling, hooks under DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ultralytics import YOLO

from distill_cli.config import RunConfig, load_recipe
from distill_cli.errors import DistillError

from .conftest import train_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_write_one_run(run_kwargs: dict, tmp_path: Path) -> None:
    project = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "distill_cli",
        *train_args(run_kwargs, recipe="cwd+logits", epochs=2, project=project),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in project.iterdir()] == ["exp"]  # one set of outputs, from rank 0
    rows = (project / "exp" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "cwd_raw" in rows[0]
    assert YOLO(str(project / "exp" / "weights" / "best.pt")).names[0] == "circle"


def test_batch_must_split_over_processes() -> None:
    from distill_cli.dist import per_rank_batch

    assert per_rank_batch(16, 4) == 4
    with pytest.raises(DistillError, match="--batch 3 does not split over 2 processes"):
        per_rank_batch(3, 2)
    with pytest.raises(DistillError, match="does not split"):
        per_rank_batch(1, 2)


BOXES = 16  # per image: enough that ultralytics' target-score sum exceeds its clamp at 1 even for a random model,
# so its detection loss is a mean over the batch (below the clamp it is a sum, and halves would not add up)


def fixed_batch(images: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    centres = (torch.arange(4) + 0.5) / 4
    boxes = torch.stack(
        [centres.repeat(4), centres.repeat_interleave(4), torch.full((16,), 0.2), torch.full((16,), 0.2)], 1
    )
    return {
        "img": (torch.rand(images, 3, 64, 64, generator=generator) * 255).to(torch.uint8),
        "cls": (torch.arange(BOXES * images) % 3).float().view(-1, 1),
        "bboxes": boxes.repeat(images, 1),
        "batch_idx": torch.arange(images).repeat_interleave(BOXES).float(),
    }


def one_step(rank: int, world: int, port: int, out: str, duplicate: bool, det_gain: float = 1.0) -> None:
    """One optimizer step on rank ``rank`` of ``world``; each rank gets 2 images (the same 2 when ``duplicate``)."""
    from ultralytics.nn.tasks import DetectionModel

    from distill_cli.data import hyperparameters
    from distill_cli.distiller import Distiller, Teacher, build_terms
    from distill_cli.engine import TrainState, train_one_epoch
    from distill_cli.training import build_optimizer

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    teacher, student = (
        DetectionModel("yolov8s.yaml", nc=3, verbose=False),
        DetectionModel("yolov8n.yaml", nc=3, verbose=False),
    )
    student.args = hyperparameters(imgsz=64, box=7.5 * det_gain, cls=0.5 * det_gain, dfl=1.5 * det_gain)
    cfg = RunConfig(
        recipe=load_recipe("cwd+logits"), epochs=1, batch=2 * world, optimizer="SGD", lr0=0.05, grad_clip=1e9
    )  # no clipping: it would hide a wrongly scaled gradient
    terms, pairs = build_terms(student, teacher, cfg.recipe, 64)
    distiller = Distiller(student, terms, pairs)
    model = torch.nn.parallel.DistributedDataParallel(distiller) if world > 1 else distiller
    optimizer, cfg = build_optimizer(distiller, cfg, 3, 10)
    layers = sorted({p.teacher for ps in pairs.values() for p in ps})
    state = TrainState(
        cfg,
        model,
        Teacher(teacher, layers, torch.device("cpu"), torch.float32),
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        None,
        torch.device("cpu"),
        None,
        1,
        1,
        world_size=world,
    )
    full = fixed_batch(4)
    if world == 1:
        batch = {**full, "img": full["img"][:2].repeat(2, 1, 1, 1)} if duplicate else full
    else:
        first = 0 if duplicate else 2 * rank  # this rank's two images; labels are the same layout for every pair
        rows = slice(first * BOXES, (first + 2) * BOXES)
        batch = {
            "img": full["img"][first : first + 2],
            "cls": full["cls"][rows],
            "bboxes": full["bboxes"][rows],
            "batch_idx": full["batch_idx"][: 2 * BOXES],
        }
    means = train_one_epoch(state, [batch], epoch=0)
    params = {k: v.detach().clone() for k, v in distiller.named_parameters()}
    torch.save({"means": means, "params": params}, Path(out) / f"rank{rank}-of{world}.pt")
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, out: Path, duplicate: bool, det_gain: float = 1.0) -> list[dict]:
    if world == 1:
        one_step(0, 1, 0, str(out), duplicate, det_gain)
    else:
        mp.spawn(one_step, args=(world, free_port(), str(out), duplicate, det_gain), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}-of{world}.pt") for r in range(world)]


def test_ranks_stay_in_sync_students_and_adapters(tmp_path: Path) -> None:
    rank0, rank1 = run_world(2, tmp_path, duplicate=False)  # different images on each rank
    assert rank0["means"]["cwd_raw"] > 0 and rank0["means"]["dfl_kd_raw"] > 0  # hooks fire through DDP
    assert rank0["means"]["cwd_raw"] != rank1["means"]["cwd_raw"]  # the ranks really saw different data
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs between ranks after a synced step"


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    """The global batch is [A, B, A, B] and each rank sees [A, B], so every per-batch normalisation of the
    distillation terms matches. The detection-loss gains are 0 here: for an untrained model ultralytics' loss divides
    by max(target-score sum, 1), i.e. it sums over images, and two half batches then legitimately differ from one
    whole batch (as in ultralytics' own DDP); with trained models the sum exceeds 1 and the loss is a mean."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (single,) = run_world(1, tmp_path / "one", duplicate=True, det_gain=0.0)
    rank0, _ = run_world(2, tmp_path / "two", duplicate=True, det_gain=0.0)
    for key in ("cwd_raw", "cls_kd_raw", "dfl_kd_raw", "distill_loss"):
        assert rank0["means"][key] == pytest.approx(single["means"][key], rel=1e-5), key
    assert "terms.cwd.0.adapter.weight" in single["params"]  # the adapters are part of the compared weights
    for name, value in single["params"].items():
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_torchrun_run_interrupted_then_resumed(run_kwargs: dict, tmp_path: Path) -> None:
    import signal
    import time

    project = tmp_path / "runs"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill_cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*base, *train_args(run_kwargs, epochs=40, project=project, **{"no-report": None})],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    results = project / "exp" / "results.csv"
    deadline = time.time() + 300
    while not (results.exists() and len(results.read_text().splitlines()) >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks, which stop at the same step
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    done_before = len(results.read_text().splitlines()) - 1
    assert 2 <= done_before < 40
    resumed = subprocess.run(
        [*base, "train", "--resume", str(project / "exp")], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = [int(line.split(",")[0]) for line in results.read_text().splitlines()[1:]]
    assert epochs == list(range(1, 41))  # every epoch once, none lost or repeated
    assert YOLO(str(project / "exp" / "weights" / "best.pt")).names[0] == "circle"
