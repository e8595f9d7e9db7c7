"""PyTorch DDP, launched by ``torchrun``: process-group set-up, rank agreement, and the ``--device 0,1`` launcher.

One process per device. The Distiller (student + adapters) is wrapped in DDP so gradients and adapter updates are
averaged; the teacher runs unwrapped and frozen on every rank. Rank 0 alone validates, writes files and keeps the
EMA (the weights it averages are identical on every rank after each synced step).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
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
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
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
    if not joined():
        # DDP imports torch._dynamo, and an import of it after the group exists holds references to the group, so
        # destroy_process_group could not free it: its gloo threads then lived into the interpreter's teardown, where
        # now and then they aborted a rank after a complete run (exit -6). Imported first, it holds none.
        importlib.import_module("torch._dynamo")
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
    if not joined():
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    return not all_agree(not flag, device)


def average(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each logged value over ranks (keys must match on all ranks)."""
    if not joined() or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / dist.get_world_size()).tolist(), strict=True))


def barrier() -> None:
    if joined():
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


def joined() -> bool:
    """Whether this process is in a process group already."""
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    if joined():
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
    """Run ``cmd`` (torchrun) in a session of its own, so that a stop reaches it once, through here; return its exit
    code, or 130 when the launcher was stopped (not Python's 143, and not while torchrun still runs).

    The first SIGINT or SIGTERM is passed on (a hang-up or SIGQUIT as SIGTERM): torchrun stops its workers, which
    save their state. Later ones only say that the workers are saving, as torchrun would cut their saving short. If
    the launcher dies, torchrun gets SIGTERM from the kernel (Linux), so no training is left running without it.
    """
    stops = [signal.SIGINT, signal.SIGTERM, signal.SIGQUIT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup a hang-up stays ignored
        stops.append(signal.SIGHUP)
    stopped: list[int] = []
    proc: subprocess.Popen | None = None

    def stop(signum: int, frame: object) -> None:
        if stopped:
            print("stopping: the workers are saving their state", file=sys.stderr, flush=True)
        elif proc is not None:
            proc.send_signal(signum if signum in (signal.SIGINT, signal.SIGTERM) else signal.SIGTERM)
        stopped.append(signum)

    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # a stop before torchrun is running waits until it can be passed on
    previous = {signum: signal.signal(signum, stop) for signum in stops}
    try:
        try:
            setup = functools.partial(child_setup, stops)
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=setup)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        code = proc.wait()  # the handler returns, so the wait goes on after a stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped and code != 0:
        return EXIT_INTERRUPTED
    return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N


def child_setup(stops: list[int]) -> None:
    """In torchrun's process, before it runs: take the stops the launcher held back, and SIGTERM when the launcher
    dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
