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


# Where the trainer says whether a SIGTERM would lose steps, and that one made it save and stop (megatron_ext.launch
# sets it for its ranks)
STOPPED_FILE_ENV = "NEUROCPT_STOPPED_FILE"


TRAINING = "training"  # what the launcher reads while a SIGTERM would leave steps unsaved


def record_training() -> None:
    """Tell the launcher that the ranks train: from here a SIGTERM that ends the run without a save loses steps."""
    _tell_launcher(TRAINING)


def record_stop(step: int, run_dir) -> None:
    """Tell the launcher that the run saved ``step`` and stopped on a SIGTERM: torchrun itself reports a signal as
    a failure whatever its ranks did."""
    _tell_launcher(f"saved step {step} in {run_dir}")


def _tell_launcher(state: str) -> None:
    """Write ``state`` where :mod:`megatron_ext.launch` reads it, from each node's first rank."""
    import os

    if os.environ.get("LOCAL_RANK", "0") == "0" and (path := os.environ.get(STOPPED_FILE_ENV)):
        with open(path, "w") as f:
            f.write(state)
