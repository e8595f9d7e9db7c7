"""The lock that lets one process at a time train a run folder: ``.running``, a POSIX record lock on it."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]

from .errors import DistillError

RUNNING = ".running"  # in a run folder while a process trains it, locked by that process


@dataclass(frozen=True)
class RunLock:
    """An open ``.running`` whose lock this process holds (see :func:`claim`)."""

    path: Path
    fd: int


def claim(run_dir: Path) -> RunLock | None:
    """Lock ``run_dir`` for this process until :func:`release`, so that a second one (two resumes of one run, a resume
    of a run still going on) is refused instead of writing the same files. The lock is a POSIX record lock on
    ``.running``: the kernel frees it when the process dies (out of memory, SIGKILL), forked loader workers do not
    inherit it, and a later resume takes it. None, with a warning, where the filesystem takes no locks (or no fcntl)."""
    if fcntl is None:
        return None
    mark = run_dir / RUNNING
    for _ in range(3):
        try:
            fd = os.open(mark, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DistillError(f"cannot open '{mark}' ({e.strerror})") from e
        try:
            if not lock_or_refuse(mark, fd):
                return None
            if same_file(mark, fd):  # not removed by a process that released it meanwhile
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
                return RunLock(mark, fd)
        except BaseException:
            with contextlib.suppress(OSError):  # lock_or_refuse may have closed it
                os.close(fd)
            raise
        os.close(fd)
    raise DistillError(f"'{run_dir}': other processes claimed it at the same moment; try again")


def try_lock(mark: Path, fd: int) -> OSError | None:
    """Take the lock on ``fd`` without waiting: None once taken, the error where the filesystem takes no locks;
    refused where another process holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            return e
        holder = holder_of(fd) or "another process"
        raise DistillError(
            f"'{mark.parent}' is being trained by {holder}; wait for it or stop it (if nothing trains it, remove "
            f"'{mark}')"
        ) from None


def holder_of(fd: int) -> str:
    """The process a mark names ("process PID on HOST"), or "" for a mark just made."""
    return os.pread(fd, 200, 0).decode(errors="replace").strip()


def lock_or_refuse(mark: Path, fd: int) -> bool:
    """Whether this process now holds the lock on ``fd`` (False: the filesystem takes none); refused where another
    process holds it."""
    error = try_lock(mark, fd)
    if error is None:
        return True
    made_here = not holder_of(fd)
    os.close(fd)
    if made_here:
        mark.unlink(missing_ok=True)
    warnings.warn(f"'{mark.parent}' is not locked: its filesystem takes no locks ({error.strerror})", stacklevel=3)
    return False


def same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def check_unclaimed(run_dir: Path) -> None:
    """Refuse ``run_dir`` where another process holds its lock, as :func:`claim` would, without taking the lock or
    writing, truncating or removing its mark (a killed run's mark stays)."""
    mark = run_dir / RUNNING
    if fcntl is None:
        return
    try:
        fd = os.open(mark, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # no mark (or none we may open): nothing holds the run; claim names any problem later
        return
    try:
        try_lock(mark, fd)  # a filesystem without locks: claim warns later
    finally:
        os.close(fd)  # closing frees a lock taken here


def release(lock: RunLock | None) -> None:
    """Remove the run's mark (not a file put there by hand after ours was removed), then free the lock."""
    if lock is None:
        return
    try:
        if same_file(lock.path, lock.fd):
            lock.path.unlink()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            os.close(lock.fd)
