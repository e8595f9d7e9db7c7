"""PyTorch DDP, launched by ``torchrun``: process-group set-up, rank agreement, and the ``--device 0,1`` launcher.

One process per device. The Distiller (student + adapters) is wrapped in DDP so gradients and adapter updates are
averaged; the teacher runs unwrapped and frozen on every rank. Rank 0 alone validates, writes files and keeps the
EMA (the weights it averages are identical on every rank after each synced step).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import EXIT_INTERRUPTED, DistillError

TIMEOUT = timedelta(minutes=30)  # a rank that stops answering brings the job down instead of hanging it
STOP_GRACE = timedelta(minutes=5)  # how long torchrun lets stopped workers save before it kills them


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    """The torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)


def init(info: DistInfo, device_spec: str) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPU) and return this rank's device."""
    use_cuda = str(device_spec).strip().lower() != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return torch.device(f"cuda:{info.local_rank}") if use_cuda else torch.device("cpu")


def per_rank_batch(batch: int, world_size: int) -> int:
    if batch % world_size or batch < world_size:
        raise DistillError(
            f"--batch {batch} does not split over {world_size} processes; give a multiple of {world_size} (the batch "
            f"is global: each process takes batch / {world_size})"
        )
    return batch // world_size


def all_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (one tiny all-reduce; a no-op without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    return not all_agree(not flag, device)


def average(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each logged value over ranks (keys must match on all ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / dist.get_world_size()).tolist(), strict=True))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block before the other ranks do, as ultralytics builds its datasets: the first build writes
    the labels ``.cache`` that the others then read (ranks that all rewrite it race on deleting the old file)."""
    if info.enabled and not info.is_main:
        barrier()
    try:
        yield
    finally:  # rank 0 failing inside still releases the others, which then fail or run on until torchrun stops them
        if info.enabled and info.is_main:
            barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_ids(devices: str) -> list[str]:
    """The CUDA device ids in ``--device 0,1,...``, each checked to exist on this machine."""
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not torch.cuda.is_available() or any(not d.isdigit() or int(d) >= torch.cuda.device_count() for d in ids):
        raise DistillError(f"--device {devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return ids


def launch(argv: list[str], devices: str) -> int:
    """``yolodistill train --device 0,1,...``: the same command under torchrun, one process per GPU.

    ``argv`` is the command line without ``--device``; each process gets ``--device cuda`` and sees only the listed
    GPUs. Returns torchrun's exit code, or 130 when the launcher was stopped.
    """
    ids = device_ids(devices)
    args = [*argv, "--device", "cuda"]
    # torchrun kills its workers 30 s after passing on a stop; rank 0 may need longer to finish a validation and save
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids)}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(STOP_GRACE.total_seconds())))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={len(ids)}",
        "-m",
        "distill_cli",
        *args,
    ]
    return supervised(cmd, env)


def supervised(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` (torchrun) in a session of its own and return its exit code. SIGINT and SIGTERM here, from the
    terminal or a job scheduler, are passed on once (torchrun stops its workers, which save their state) and the
    launcher then exits 130 like a single-process run, not 143 from Python's default or with torchrun still going."""
    stopped: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        stopped.append(signum)
        if proc is not None:
            proc.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        for signum in list(stopped):  # what arrived while it started
            proc.send_signal(signum)
        code = proc.wait()  # the handler returns, so a second Ctrl-C is passed on and the wait goes on
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_INTERRUPTED if stopped and code != 0 else code
