"""Stopping a run cleanly on SIGINT/SIGTERM: at a step boundary, on every rank at the same step."""

from __future__ import annotations

import signal
from typing import Any

import torch

from . import dist


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the loop stops after the current step."""


class StopOnSignal:
    """SIGINT/SIGTERM set a flag; the loop stops at the next step boundary, on every rank at the same step."""

    def __init__(self) -> None:
        self.flag = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.flag = True

    def watch(self, loader, device: torch.device):
        """The loader's batches, stopping with Interrupted at the first step after a signal on any rank."""
        stop = self

        class Watched:
            def __len__(self) -> int:
                return len(loader)

            def __iter__(self):
                for batch in loader:
                    if dist.any_rank(stop.flag, device):
                        raise Interrupted
                    yield batch

        return Watched()
