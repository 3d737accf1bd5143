"""Safe outputs, shared by the data pipeline, the trainer and the evaluation tools: atomic result files, and an
output folder held by one job at a time. Imports only the standard library, so any module (trainer, evaluation,
a datatrove stage) can use it without pulling in datatrove or megatron."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


def write_atomic(path: str | Path, text: str) -> None:
    """``path`` holds its old content or all of ``text``, never a part: a job killed (or failing) while writing
    leaves no cut-off result for the next step to read. The text goes to a file beside it, then replaces it."""
    write_all_atomic({path: text})


def write_all_atomic(files: dict[str | Path, str]) -> None:
    """Several files (a report's JSON and its table) as :func:`write_atomic` writes one, and together: every
    text is written beside its file before any is renamed into place, so a failure while writing one of them
    leaves all the old ones, not a new JSON beside an old table."""
    tmps: dict[Path, Path] = {}
    try:
        for path, text in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmps[path].write_text(text)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj, indent: int = 2) -> None:
    """``obj`` as JSON in ``path``, written as :func:`write_atomic` writes."""
    write_atomic(path, json.dumps(obj, indent=indent))


class DirectoryInUse(Exception):
    """Another job holds the output folder."""


@contextmanager
def hold_directory(directory: str | Path, what: str) -> Iterator[None]:
    """``directory`` for this process alone while the block runs: a second job into it (a command started twice, a
    requeued job beside the one still running) stops at once, naming the first, where it would otherwise delete
    the other's half-written files and mix two runs into one checkpoint or mix. A POSIX lock (``lockf``) on
    ``directory/.lock``: the kernel drops it when the process ends, killed included, so nothing stale is left;
    forked workers do not hold it. On a filesystem without locks: a warning, and no guard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _held(directory / LOCK_FILE, directory, what):
        yield


@contextmanager
def hold_output(out: str | Path, what: str) -> Iterator[None]:
    """:func:`hold_directory` for an output folder written whole elsewhere and renamed into place (a converted
    checkpoint): its lock is ``.NAME.lock`` beside it, since one inside would leave with the folder it replaces,
    and the lock file goes when the block ends (a third job could slip between two at that moment: this stops a
    command started twice, not a race of many)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    with _held(lock, out, what):
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


@contextmanager
def _held(lock: Path, subject: Path, what: str) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                log.warning("%s cannot be locked (%s): a second job into it would not be stopped", subject, err)
            else:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
                raise DirectoryInUse(f"{subject} is in use by another {what} ({holder}); two at once would overwrite "
                                     "each other's files: wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def merging(path: str | Path) -> Iterator[None]:
    """One process at a time in the block: for reading, merging and rewriting ``path``, a file several jobs add to.
    A blocking POSIX lock on ``.NAME.lock`` beside it, which the kernel drops if the holder is killed. On a
    filesystem without locks the block runs unguarded (two merges at once can still drop one's addition)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("%s cannot be locked (%s): merged without a lock", path, err)
        yield
    finally:
        os.close(fd)  # releases the lock


def die_with(parent: int) -> None:
    """In a child process (a build's forked worker, an evaluation's per-model process): be killed when ``parent`` ends,
    however it ends (``kill PID`` and ``timeout`` signal it alone; the OOM killer). Left running, the child went on
    writing into the output folder the parent had let go of, beside the rerun's own child writing the same files (and
    holding the GPU the rerun needs). Linux; elsewhere nothing."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the call
        os._exit(1)


def clear_directory(directory: str | Path) -> None:
    """Remove everything in ``directory`` but the lock of :func:`hold_directory` (a ``--clean`` under it)."""
    for path in Path(directory).iterdir():
        if path.name != LOCK_FILE:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
