"""datatrove's local executor, with a worker process that dies ending the stage instead of hanging it.

datatrove's ``LocalPipelineExecutor`` runs a stage's tasks on a ``multiprocess`` pool. When one worker dies on its
own (the OOM killer picks one process, not the job; a ``kill`` of its pid) that pool starts a new worker and waits
for ever for the task the dead one ran (CPython's bpo-22393): the build hung with no message. ``concurrent.futures``'
process pool notices a dead worker (``BrokenProcessPool``), so :class:`LocalExecutor` runs the tasks there, each
through datatrove's own ``_run_for_rank`` on a fresh copy of the pipeline as datatrove's pool does, and stops the
stage naming it and the tasks left (a rerun resumes them). One worker runs datatrove's own loop, in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from copy import deepcopy
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.utils.logging import logger
from datatrove.utils.stats import PipelineStats

from preprocessing.atomic import die_with
from preprocessing.errors import BuildError

# The executor whose stage the forked workers run, and each worker's slot (0 .. workers-1; slot 0 logs to the
# console, as datatrove's local rank 0 does). Inherited by the fork, not pickled: a stage's steps need not pickle.
_RUNNING: LocalExecutor | None = None
_SLOT = 0


def _start_worker(build: int, slots) -> None:
    """In each forked worker: die with the build's process (a worker left running writes into the output folder the
    build let go of, beside a rerun's), and take a slot of its own."""
    global _SLOT
    die_with(build)
    if "torch" in sys.modules:  # the PHI guard's model: the parent's OpenMP threads are gone in a fork, and torch
        # on more than one thread there hangs for good (GNU OpenMP); the workers share the cores besides
        sys.modules["torch"].set_num_threads(1)
    with slots.get_lock():
        _SLOT, slots.value = slots.value, slots.value + 1


def worker_slot() -> int:
    """This process's slot among a stage's forked workers (0 .. workers-1); 0 outside them (one worker, in this
    process; a cluster's task, a process of its own)."""
    return _SLOT


def _run_task(rank: int) -> PipelineStats:
    executor = _RUNNING
    pipeline = executor.pipeline
    executor.pipeline = deepcopy(pipeline)  # a worker runs several tasks: each task's step statistics are its own
    try:
        return executor._run_for_rank(rank, _SLOT)
    finally:
        executor.pipeline = pipeline


class LocalExecutor(LocalPipelineExecutor):
    """``LocalPipelineExecutor`` whose workers' deaths stop the stage (see the module's docstring)."""

    def run(self) -> PipelineStats | None:
        global _RUNNING
        ranks = self.get_incomplete_ranks(range(self.world_size))
        if self.workers == 1 or not ranks:
            return super().run()
        self._launched = True
        self.save_executor_as_json()
        if skipped := self.world_size - len(ranks):
            logger.info(f"Skipping {skipped} already completed tasks")
        fork = multiprocessing.get_context("fork")
        _RUNNING, stats = self, []
        try:
            with ProcessPoolExecutor(min(self.workers, len(ranks)), mp_context=fork, initializer=_start_worker,
                                     initargs=(os.getpid(), fork.Value("i", 0))) as pool:
                running = [pool.submit(_run_task, rank) for rank in ranks]
                try:
                    for done, task in enumerate(as_completed(running), skipped + 1):
                        stats.append(task.result())
                        logger.info(f"{done}/{self.world_size} tasks completed.")
                except BaseException:  # a failed task ends the stage: the tasks not started are not run
                    for task in running:
                        task.cancel()  # those a worker has not taken: the pool then waits for the others
                    if busy := sum(task.running() for task in running):
                        logger.warning(f"a task failed: waiting for the {busy} started to end (a rerun keeps them)")
                    raise
        except BrokenProcessPool:
            left = ", ".join(map(str, self.get_incomplete_ranks(ranks)))
            raise BuildError(f"stage {Path(self.logging_dir.path).name}: a worker process died (killed: out of memory?) "
                             f"with task(s) {left} unfinished; rerun the same command to resume them") from None
        finally:
            _RUNNING = None
        stats = sum(stats, start=PipelineStats())
        with self.logging_dir.open("stats.json", "wt") as f:
            stats.save_to_disk(f)
        logger.success(stats.get_repr(f"All {self.world_size} tasks"))
        return stats
