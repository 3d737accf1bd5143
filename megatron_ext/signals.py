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


# Where the trainer says that a SIGTERM made it save and stop (megatron_ext.launch sets it for its ranks)
STOPPED_FILE_ENV = "NEUROCPT_STOPPED_FILE"


def record_stop(step: int, run_dir) -> None:
    """Tell the launcher (:mod:`megatron_ext.launch`), from each node's first rank, that the run saved ``step`` and
    stopped on a SIGTERM: torchrun itself reports a signal as a failure whatever its ranks did."""
    import os

    if os.environ.get("LOCAL_RANK", "0") == "0" and (path := os.environ.get(STOPPED_FILE_ENV)):
        with open(path, "w") as f:
            f.write(f"saved step {step} in {run_dir}")
