"""One logging setup for every job's `main`: human-readable lines on stderr, the libraries quiet.

Quiet by default: no progress bars from transformers (the GGUF conversion's, in every worker) or Ray Data
(its operator lines every second), library loggers at WARNING; the jobs' own lines say how a stage goes
(one progress line every few steps, with its ETA). `--verbose` (HOVLE_VERBOSE=1, which Ray workers
started by the job inherit) brings everything back.
"""

import logging
import os
import sys

# Libraries that log at INFO about their own plumbing; a job's reader wants the job's lines.
_CHATTY_LOGGERS = ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "asyncio")
# Libraries whose INFO lines are progress reports of their own: WARNING unless verbose.
_PROGRESS_LOGGERS = (
    "transformers",
    "ray.data",
    "ray.train",
    "DeepSpeed",
    "deepspeed",
    "mlflow.system_metrics",
)
VERBOSE_ENV = "HOVLE_VERBOSE"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_libraries(verbose: bool | None = None) -> None:
    """Progress bars off and library progress loggers at WARNING (unless verbose). Called by
    `setup_logging` in a job's process and by each Ray Train worker at its start."""
    verbose = is_verbose() if verbose is None else verbose
    level = logging.INFO if verbose else logging.WARNING
    for name in _PROGRESS_LOGGERS:
        logging.getLogger(name).setLevel(level)
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # not every process imports the model
        pass
    else:
        (transformers_logging.enable_progress_bar if verbose else transformers_logging.disable_progress_bar)()
    # Ray Train names one logger by its file's path, outside "ray.train": a line per reported checkpoint
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(level)
    if "ray.data" in sys.modules:  # Ray Data resets its loggers on import: call this after it
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = verbose
        logging.getLogger("ray.data._internal.progress").setLevel(level if verbose else logging.ERROR)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time (pytest and Ray swap it after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns it; the property always follows sys.stderr
        pass


def setup_logging(verbose: bool = False) -> None:
    """Send log records to stderr at INFO (DEBUG with `verbose`). Safe to call again (the CLI, then tests):
    the handler is installed once; others' handlers on the root logger (pytest's, Ray's) stay."""
    root = logging.getLogger()
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # Ray workers this job starts inherit it
        os.environ.pop("TQDM_DISABLE", None)
    elif not is_verbose():
        # tqdm reads TQDM_* when it is imported: this silences bars made directly with tqdm (transformers'
        # GGUF conversion) in the Ray workers the job starts from here on
        os.environ.setdefault("TQDM_DISABLE", "1")
    quiet_libraries(verbose or is_verbose())
