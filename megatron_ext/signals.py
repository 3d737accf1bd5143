"""SIGTERM handling for the length of one call, not for the process.

The trainer (a scheduler's SIGTERM asks it to save and stop) and the GPU check (SIGTERM stops its running part)
handle SIGTERM while they run. A handler left behind outlives them in a process that called them (a notebook, a
test) and in every process forked from it later, where SIGTERM then no longer simply ends the process: a
datatrove worker pool's shutdown, which terminates its idle workers, failed on one (a test run, 2026-11-28).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator


@contextlib.contextmanager
def on_sigterm(handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` receives SIGTERM inside the block; the previous handler is back after it, however it ends."""
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
