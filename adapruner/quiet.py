"""A block's output sent to a log file: Python's streams, the process's file descriptors 1 and 2 (so that what C
libraries and subprocesses print goes too: llama.cpp's quantizer, lm-eval's ``git describe``), and the given
loggers."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def output_to(log: Path | None, loggers: Sequence[str] = ()) -> Iterator[None]:
    """With ``log``: everything the block prints, appended to ``log``; without, nothing changes."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in loggers}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    descriptors = {fd: os.dup(fd) for fd in (1, 2)}
    with open(log, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        for name in loggers:
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = [logging.StreamHandler(f)], False
        for fd in descriptors:
            os.dup2(f.fileno(), fd)
        try:
            yield
        finally:
            f.flush()
            for fd, copy in descriptors.items():
                os.dup2(copy, fd)
                os.close(copy)
            for name, (handlers, propagate) in saved.items():
                logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate
