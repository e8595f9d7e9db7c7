"""The one error type the library raises for problems a user can fix."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

# Stable exit codes: scripts and CI branch on these.
EXIT_OK = 0
EXIT_USAGE = 2  # bad input: files, options, recipes, data
EXIT_RUNTIME = 3  # the run itself failed (non-finite losses, disk full, ...)
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: last.pt written, resumable


class DistillError(Exception):
    """A problem the user can fix, told in one line: what is wrong and what to do.

    The CLI prints ``message`` and exits with ``exit_code``; the Python API lets it propagate.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt as Ctrl-C does, so that it is an interruption (130, half-made output removed)
    and not Python's silent exit 143; an ignored SIGTERM stays ignored, and outside the main thread signals are left
    alone."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:  # the caller chose to ignore it (trap '' TERM): so do we
        yield
        return
    try:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread: signals stay as they are
        main_thread = False
    else:
        main_thread = True
    try:
        yield
    finally:
        if main_thread:  # (None: a handler set outside Python, which cannot be put back: the default then)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
