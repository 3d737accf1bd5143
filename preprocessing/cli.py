"""What every neurocpt command line shares (data builds, trainer, converters, evaluation): argparse types, and one
line naming a file for an error. Standard library only: a command imports it without datatrove, torch or megatron."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """An argparse type for counts, sizes and divisors, where 0 or less would fail later, deep in the work (a
    ZeroDivisionError; an executor's traceback after ``--clean`` had emptied the output folder)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def about(path: str | Path, err: Exception | str) -> str:
    """``path: err`` in one line, the file named once where ``err`` names it already."""
    said = str(err)
    return said if said.startswith(f"{path}: ") else f"{path}: {said}"
