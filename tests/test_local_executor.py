"""The local executor's pool (preprocessing/local_executor.py) run directly on a small datatrove pipeline: a stage's
steps need not pickle, a failed task ends the stage, and a rerun runs only the tasks left."""

from __future__ import annotations

import time

import pytest

from preprocessing.local_executor import LocalExecutor


def test_a_failed_task_ends_the_stage_and_the_rerun_runs_only_the_tasks_left(tmp_path):
    started, fail = tmp_path / "started", tmp_path / "fail"
    started.mkdir()
    fail.touch()

    def step(data, rank, world_size):  # a closure: forked workers run it, it is never pickled
        (started / str(rank)).touch()
        if rank == 0 and fail.exists():
            raise ValueError("task 0: a bad record")
        time.sleep(0.5)
        yield from ()

    def executor():
        return LocalExecutor([step], tasks=16, workers=2, logging_dir=str(tmp_path / "logs"), start_method="fork")

    with pytest.raises(ValueError, match="task 0: a bad record"):
        executor().run()
    first = {int(p.name) for p in started.iterdir()}
    done = {int(p.name) for p in (tmp_path / "logs" / "completions").iterdir()}
    assert 0 in first and done == first - {0}  # the stage ends when the tasks started have ended
    assert len(first) <= 8, f"the failure did not stop the stage: {len(first)} of 16 tasks started"
    time.sleep(1)
    assert {int(p.name) for p in started.iterdir()} == first, "tasks went on after the stage ended"

    fail.unlink()
    for p in started.iterdir():
        p.unlink()
    stats = executor().run()
    assert {int(p.name) for p in started.iterdir()} == set(range(16)) - done
    assert len(list((tmp_path / "logs" / "completions").iterdir())) == 16 and stats is not None
