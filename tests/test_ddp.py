"""DDP on CPU (gloo, 2 processes): a real torchrun run, gradient and adapter sync, loss scaling, hooks under DDP."""

from __future__ import annotations

import json
import math
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
from distill_cli.engine import STOPPED
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
        *train_args(run_kwargs, recipe="cwd+logits", epochs=2, project=project, json=None),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["epochs_done"] == 2  # rank 0's summary; rank 1 returns nothing and prints nothing
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
    from distill_cli.optimizer import build_optimizer

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
    cfg = RunConfig(recipe=load_recipe("cwd+logits"), epochs=1, batch=2 * world, nbs=64, optimizer="SGD", lr0=0.05)
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
        max_grad_norm=math.inf,  # no clipping: it would hide a wrongly scaled gradient
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
        dist.barrier()  # as in check_on_rank: no rank tears its group down while another still reads a collective
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


def record_iterations(rank: int, world: int, port: int, kwargs: dict, out: str) -> None:
    """Run train() as rank ``rank`` of ``world`` and write the iteration count it gave build_optimizer."""
    from distill_cli import training

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    original = training.build_optimizer

    def recording(model, cfg, nc, iterations):
        Path(out, f"rank{rank}-of{world}.txt").write_text(str(iterations))
        return original(model, cfg, nc, iterations)

    training.build_optimizer = recording
    training.train(recipe="none", **{**kwargs, "name": f"world{world}"})
    names = [Path(task, "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    Path(out, f"threads-rank{rank}-of{world}.txt").write_text("\n".join(names))


def test_optimizer_choice_does_not_depend_on_the_number_of_processes(run_kwargs: dict, tmp_path: Path) -> None:
    """``optimizer: auto`` picks by the run's iteration count; each rank's dataset is already the whole split, so
    the count must not be multiplied by the world size (that turned AdamW runs into SGD/MuSGD runs under DDP)."""
    kwargs = {**run_kwargs, "student": "yolov8n.yaml", "nbs": 4, "epochs": 1, "report": False}
    record_iterations(0, 1, 0, kwargs, str(tmp_path))
    mp.spawn(record_iterations, args=(2, free_port(), kwargs, str(tmp_path)), nprocs=2, join=True)
    counts = {p.name: int(p.read_text()) for p in tmp_path.glob("rank*.txt")}
    assert counts == {"rank0-of1.txt": 2, "rank0-of2.txt": 2, "rank1-of2.txt": 2}  # 8 images / batch 4, 1 epoch


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from Linux's /proc")
def test_a_finished_run_leaves_no_process_group_threads(run_kwargs: dict, tmp_path: Path) -> None:
    """Each rank's gloo threads end with train(), not at interpreter exit: threads that outlived the group ran into
    the interpreter's teardown, where a rank now and then aborted after a complete run (exit -6, 'terminate called
    without an active exception')."""
    kwargs = {**run_kwargs, "epochs": 1, "report": False}
    mp.spawn(record_iterations, args=(2, free_port(), kwargs, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        names = (tmp_path / f"threads-rank{rank}-of2.txt").read_text().split()
        assert not [name for name in names if "gloo" in name], names


def train_in_a_group_made_before(rank: int, world: int, port: int, kwargs: dict, out: str) -> None:
    """Join a process group, run train() in it, and write whether the group is still there afterwards."""
    from distill_cli import training

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    training.train(recipe="none", **kwargs)
    Path(out, f"rank{rank}.txt").write_text(str(dist.is_initialized()))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def test_a_process_group_the_caller_made_outlives_the_run(run_kwargs: dict, tmp_path: Path) -> None:
    """train() destroyed a group it had not made, so the caller's next collective failed."""
    kwargs = {**run_kwargs, "epochs": 1, "report": False}
    mp.spawn(train_in_a_group_made_before, args=(2, free_port(), kwargs, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["True", "True"]


def balance_on_rank(rank: int, world: int, port: int, out: str) -> None:
    """Calibrate the automatic balance on rank ``rank`` from values that differ between the ranks."""
    from distill_cli.engine import TrainState, update_balance
    from distill_cli.overrides import apply_overrides

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = apply_overrides(RunConfig(recipe=load_recipe("cwd")), {"balance.target": 1.0, "balance.steps": 1})
    state = TrainState(
        cfg,
        None,
        None,
        None,
        None,
        None,
        torch.device("cpu"),
        None,
        steps_per_epoch=1,
        accumulate=1,
        max_grad_norm=10.0,
    )
    update_balance(state, torch.tensor(2.0 + 2 * rank), {"cwd": torch.tensor(1.0 + 3 * rank)})  # det 2|4, cwd 1|4
    Path(out, f"rank{rank}.txt").write_text(str(state.balance["cwd"]))
    dist.barrier()  # as in check_on_rank
    dist.destroy_process_group()


def test_automatic_balance_factors_are_the_same_on_every_rank(tmp_path: Path) -> None:
    """Each rank sees other data (alone, rank 0 would pick 2 and rank 1 would pick 1); the factors come from the
    means over all ranks (det 3, cwd 2.5), so every rank weights the term alike and rank 0 saves the one all used."""
    mp.spawn(balance_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    factors = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    assert factors == [pytest.approx(1.2), pytest.approx(1.2)]


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_0_builds_the_datasets_first(rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 builds (and writes the labels .cache) while the others wait at a barrier, as ultralytics does; ranks
    that all rewrote the cache raced on deleting the old file."""
    from distill_cli import dist as ours

    events: list[str] = []
    monkeypatch.setattr(ours, "barrier", lambda: events.append("barrier"))
    with ours.main_first(ours.DistInfo(rank=rank, local_rank=rank, world_size=2)):
        events.append("build")
    assert events == (["build", "barrier"] if rank == 0 else ["barrier", "build"])
    events.clear()
    with ours.main_first(ours.DistInfo()):
        events.append("build")
    assert events == ["build"]


def check_on_rank(rank: int, world: int, port: int, nan_rank: int, out: str) -> None:
    """The end-of-epoch weight check on rank ``rank``, with a NaN BatchNorm statistic on rank ``nan_rank`` only."""
    from types import SimpleNamespace

    from distill_cli.engine import TrainState, check_epoch_trained

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    student = torch.nn.BatchNorm1d(2)
    if rank == nan_rank:
        student.running_mean.fill_(float("nan"))  # each rank's statistics are its own after its last forward
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    cfg = RunConfig(recipe=load_recipe("none"), epochs=2)
    model = SimpleNamespace(student=student)
    state = TrainState(cfg, model, None, optimizer, None, None, torch.device("cpu"), None, 1, 1, 10.0, step=1)
    try:
        check_epoch_trained(state, epoch=0)
        outcome = "trained on"
    except DistillError as e:
        outcome = e.message
    Path(out, f"rank{rank}.txt").write_text(outcome)
    dist.barrier()  # a rank that tore its group down while the other still read the all-reduce aborted it (gloo)
    dist.destroy_process_group()


@pytest.mark.parametrize(("nan_rank", "stops"), [(0, True), (1, False)])
def test_every_rank_takes_the_weight_checks_decision(nan_rank: int, stops: bool, tmp_path: Path) -> None:
    """Rank 0 writes the checkpoints: a non-finite statistic there stops every rank (one rank stopping alone would
    leave the others waiting in the next collective); one only on rank 1, never written, stops none."""
    mp.spawn(check_on_rank, args=(2, free_port(), nan_rank, str(tmp_path)), nprocs=2, join=True)
    outcomes = {(tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    assert outcomes == (
        {"epoch 1 left non-finite weights (or beyond fp16's range); " + STOPPED} if stops else {"trained on"}
    )
