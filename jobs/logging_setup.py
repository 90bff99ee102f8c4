"""One logging setup for every job's `main`: human-readable lines on stderr."""

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_DATE_FORMAT = "%H:%M:%S"

# Libraries that log at INFO about their own plumbing; a job's reader wants the job's lines.
_CHATTY_LOGGERS = ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "asyncio")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (pytest and Ray swap it after set-up)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns it; the property always follows sys.stderr
        pass


def setup_logging(verbose: bool = False) -> None:
    """Send log records to stderr at INFO (DEBUG with `verbose`).

    Safe to call more than once (a job's `main` called from the CLI, then from tests): the
    handler is installed once and only the level changes. Handlers that others attached to
    the root logger (pytest's log capture, Ray's) are left in place.
    """
    root = logging.getLogger()
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
