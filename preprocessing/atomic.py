"""Atomic result files, shared by the data pipeline and the evaluation tools. Imports only the standard library,
so any module (trainer, evaluation, a datatrove stage) can use it without pulling in datatrove or megatron."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
