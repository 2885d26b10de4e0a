"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's kill).

While a run trains, `StopRequest` replaces both handlers with one that only records the signal;
the trainer looks at it at each safe point (after a logged step, never inside one), writes a
checkpoint and raises `Interrupted`, which the command line turns into one line naming the
`--resume` command and exit code 128 + the signal (130, 143). A second signal while the first is
being honoured restores the default handlers and re-delivers it: a user who presses Ctrl-C twice
gets the immediate stop they asked for (the last checkpoint stays intact).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after saving `checkpoint` (None: nothing could be saved)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint is not None else "no checkpoint written"
        super().__init__(f"stopped by {name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Records SIGINT/SIGTERM while active (a context manager; main thread only, else inert)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
