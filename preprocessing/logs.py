"""Console and log file for the command lines (trainer, build_mix, build_sft, the demo). Here, not in megatron_ext,
whose import applies megatron's CPU patches: a data build that stopped on a user's error spent 9 of its 12 s
importing megatron-core for its log file.

Quiet by default: the console shows this project's INFO lines and the libraries' logged warnings and errors;
megatron's configuration dumps and bucket lists, datatrove's pipeline and stats tables, the libraries' Python
warnings (deprecations inside megatron and torch) and the like go only to the log file, which gets everything.
Known harmless fallbacks (no Transformer Engine, Apex or fla kernels on a CPU machine) are reported once, in
one line, by the commands that run the model (:func:`setup`'s ``fallbacks``). ``verbose``: everything on the
console too.

No library is imported at module level: megatron_ext's import uses :func:`hide_harmless_warnings` before
megatron's modules warn.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import warnings
from pathlib import Path

OURS = ("neurocpt", "megatron_ext", "preprocessing", "evaluation", "tools", "__main__")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HARMLESS = (
    r"(Transformer Engine and Apex are|Apex is) not installed",  # megatron-core, once per module it imports
    r"full scope is deprecated",  # megatron-core 0.16.1 about its own default cuda_graph_scope
    r"is falling back to its reference PyTorch implementation",  # transformers without the fla/conv1d kernels
)
_HARMLESS = re.compile("|".join(HARMLESS))
# a datatrove (loguru) record below WARNING, as datatrove's task logger formats it
_LOGURU_QUIET = re.compile(r"^(\[NODE -?\d+\] )?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| (TRACE|DEBUG|INFO|SUCCESS) ")
# a datatrove (loguru) record from ERROR up: a failed task's, its traceback (with every variable's value) after it
_LOGURU_ERROR = re.compile(r"^(\[NODE -?\d+\] )?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| (ERROR|CRITICAL) ")


def hide_harmless_warnings() -> None:
    """Python warnings of the known harmless fallbacks are not shown (:func:`setup` reports them in one line);
    for the warnings raised on import, before :func:`setup` can send them to the log file."""
    for pattern in HARMLESS:
        warnings.filterwarnings("ignore", message=f".*{pattern}", category=UserWarning)


class _ConsoleFilter(logging.Filter):
    """This project's records from ``level``, the libraries' from WARNING; Python warnings and known harmless
    fallbacks never."""

    def __init__(self, level: int, verbose: bool):
        super().__init__()
        self.level, self.verbose = level, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name == "py.warnings" or _HARMLESS.search(record.getMessage()):
            return False
        ours = record.name.split(".")[0] in OURS
        return record.levelno >= (self.level if ours else max(self.level, logging.WARNING))


class _Stderr:
    """``sys.stderr`` while a command runs: every write goes to the log file, and to the console unless it is
    a datatrove record below WARNING. datatrove resets its loguru sinks in every task, each time to the
    ``sys.stderr`` it finds then, and writes each record in one call: this is where its level can be read."""

    def __init__(self, console, log_file, verbose: bool):
        self.console, self.log_file, self.verbose = console, log_file, verbose

    def write(self, text: str) -> int:
        self.log_file.write(text)
        if self.verbose:
            self.console.write(text)
        elif _LOGURU_ERROR.match(text) and "\n" in text.rstrip("\n"):
            # a failed task's record: its first line here, the traceback in the log file only (the command itself
            # ends with one line for a user's error, and with its own traceback for any other)
            self.console.write(f"{text.splitlines()[0]} (traceback in {self.log_file.name})\n")
        elif not _LOGURU_QUIET.match(text):
            self.console.write(text)
        return len(text)

    def flush(self) -> None:
        self.log_file.flush()
        self.console.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the console's
        return getattr(self.console, name)


def setup(log_file: str | Path, verbose: bool = False, console_level: int = logging.INFO, rank: int = 0,
          fallbacks: bool = True) -> Path:
    """Everything to ``log_file`` (appended: a resumed run keeps its history), the quiet selection to the
    console: ``console_level`` and up for this project's loggers, WARNING and up for libraries, everything
    with ``verbose``; a rank other than 0 shows only warnings. ``fallbacks``: say in one line which of the model's
    fast kernels (Transformer Engine, Apex) are absent (not for a data build, which runs no megatron model).
    Returns the log file's path."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", buffering=1)
    console = sys.__stderr__
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    to_file, to_console = logging.StreamHandler(stream), logging.StreamHandler(console)
    to_console.addFilter(_ConsoleFilter(max(console_level, logging.WARNING) if rank else console_level, verbose))
    for handler in (to_file, to_console):
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    logging.captureWarnings(True)  # Python warnings become records: in the file, on the console only if verbose
    sys.stderr = _Stderr(console, stream, verbose)
    if importlib.util.find_spec("loguru"):  # datatrove's logger, re-aimed at the new sys.stderr
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr)
    if importlib.util.find_spec("transformers"):  # its own handler would bypass the file and the filter
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if fallbacks and missing and not rank:
        logging.getLogger("neurocpt").warning("%s not installed: megatron-core and transformers use their torch "
                                              "fallbacks (fine on CPU; the gpu extra brings the fast kernels)",
                                              " and ".join(missing))
    return path
