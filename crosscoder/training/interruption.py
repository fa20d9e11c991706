"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption): the loop finishes the step in
progress, writes a checkpoint and raises ``RunInterrupted``; the command line prints its message (how to continue
with ``--resume``) and exits with the shell's status for the signal, 128 + its number (130 for SIGINT, 143 for
SIGTERM)."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

from crosscoder.errors import CrosscoderError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(CrosscoderError):
    """A run stopped on SIGINT or SIGTERM after writing a checkpoint at a step boundary; ``exit_status`` is
    128 + the signal's number."""

    def __init__(self, message: str, received: signal.Signals) -> None:
        super().__init__(message)
        self.received = received
        self.exit_status = 128 + int(received)


class StopRequests:
    """SIGINT / SIGTERM handlers for a ``with`` block (installed from the main thread only; a signal ignored when the
    block starts, as under ``nohup`` or ``&``, stays ignored). The first signal is kept in ``received`` for the loop to
    act on at its next step boundary; with ``abort_on_repeat`` a second Ctrl-C raises ``KeyboardInterrupt`` at once.
    Under torchrun leave it off: torchrun forwards the terminal's Ctrl-C to workers that already received it, and
    stops them itself if they take too long."""

    def __init__(self, abort_on_repeat: bool, announce: bool) -> None:
        self.abort_on_repeat, self.announce = abort_on_repeat, announce
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                if signal.getsignal(number) is not signal.SIG_IGN:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, signal.SIG_DFL if previous is None else previous)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number)
            if self.announce:  # os.write: a print here could re-enter a write to stderr in progress
                again = " (Ctrl-C again to stop at once, without one)" if self.abort_on_repeat else ""
                os.write(2, f"\n{self.received.name}: stopping after this step with a checkpoint{again}\n".encode())
        elif number == signal.SIGINT and self.abort_on_repeat:
            raise KeyboardInterrupt
