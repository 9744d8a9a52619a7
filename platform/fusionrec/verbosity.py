"""How much of the dependencies' own output a user sees. Ground floor: no project imports.

By default the CLI keeps its own results and progress bars and silences what Ray, Ray Data,
MLflow, Optuna and transformers print that a user cannot act on: Ray's start-up notices, its
notices of tasks it retries (Serve's controller on shutdown), Ray Data's progress logs and bars,
MLflow's database set-up logs, its registry notices, its type-hint and pickle warnings and its
artifact download bars, Optuna's study notice (search/tune.py), Hugging Face's progress bars. (Ray's token-auth
notice is answered, not silenced: ray_runtime sets RAY_AUTH_MODE.) `fusionrec --verbose`
(FUSIONREC_VERBOSE=1) leaves all of it as the dependencies print it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

VERBOSE = "FUSIONREC_VERBOSE"

# Read by the dependencies when they are imported or start processes (which inherit them).
QUIET_ENVIRONMENT = {
    "RAY_LOGGER_LEVEL": "warning",  # "Started a local Ray instance." and other start-up notices
    # Not RAY_BACKEND_LOG_LEVEL: Ray's C++ logger announces on stderr, in every process, that it read
    # it ("Set ray log level from environment variable ..."). At its default the core worker prints
    # nothing on a train, tune or serve run, and on encode one notice (`without_actor_notices`).
    # "Task ServeController.graceful_shutdown failed ... will be retried", from our own core worker on
    # `serve.shutdown()`: Serve's controller answers that call by being killed, on purpose. The setting
    # only drops notices of tasks Ray retries; a task that finally fails still raises in its caller.
    "RAY_enable_output_error_log_if_still_retry": "0",
    # database set-up logs, and the warning that pyfunc models are pickled (the format we chose)
    "MLFLOW_LOGGING_LEVEL": "ERROR",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}
# MLflow asks for type hints on our pyfunc wrapper (its input is a frame of ids: nothing to infer).
QUIET_WARNINGS = (r".*Add type hints to the `predict` method",)
# Ray's core worker (C++, straight to file descriptor 2) on every Ray Data actor it starts: Ray Data
# passes its actors their context and transform by object reference, which Ray reports at error
# level whenever the actor may restart (ray-project/ray#57733). Nothing a user can act on.
ACTOR_NOTICE = re.compile(rb"\[[^\]]*\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in "
                          rb"the object store and max_restarts > 0")


def verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


def configure(verbose_output: bool) -> None:
    """Set this process (and the processes it starts) to verbose or quiet output."""
    if verbose_output:
        os.environ[VERBOSE] = "1"
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)  # a value the user set wins
    # MLflow emits its warnings under a simplefilter("once") of its own, which outranks any filter
    # set here: they are dropped where warnings are shown instead.
    if not getattr(warnings.showwarning, "quiet", False):
        warnings.showwarning = _unless_quiet(warnings.showwarning)
    logging.getLogger("mlflow").setLevel(logging.ERROR)  # in case MLflow was imported before this


def _unless_quiet(show: Callable[..., None]) -> Callable[..., None]:
    def show_unless_quiet(message, *args, **kwargs) -> None:
        if not any(re.match(pattern, str(message)) for pattern in QUIET_WARNINGS):
            show(message, *args, **kwargs)

    show_unless_quiet.quiet = True
    return show_unless_quiet


def quiet_ray_libraries() -> None:
    """Ray Data's progress logs and bars and Ray Serve's start-up logs in this (driver) process;
    called once Ray is up, as they set their loggers up when imported. Our steps show their own bars."""
    if verbose():
        return
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # incl. its notice that the bars are off
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


@contextlib.contextmanager
def without_mlflow_notices() -> Iterator[None]:
    """MLflow prints some notices itself, not through a logger whose level we set: e.g. on
    register_model "Successfully registered model 'fusionrec'." and "Created version '1' ...". They go
    through its logging stream, which this turns off for the block (its errors still raise)."""
    if verbose():
        yield
        return
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    enabled = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = enabled


@contextlib.contextmanager
def without_actor_notices() -> Iterator[None]:
    """Drop `ACTOR_NOTICE` lines from this process's stderr (file descriptor 2, where Ray's C++ logger
    writes) for the block; everything else passes through at once, progress bars' carriage returns
    included. Enter it once Ray is up: processes started inside the block would inherit the pipe."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward() -> None:
        pending = b""
        while chunk := os.read(read, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not ACTOR_NOTICE.search(line))
            if pending and not pending.startswith(b"["):  # not a Ray log line: show it now (a bar's update)
                out, pending = out + pending, b""
            if out:
                os.write(terminal, out)
        if pending:
            os.write(terminal, pending)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last write end closes: the thread reads to the end and stops
        thread.join(timeout=5)
        if not thread.is_alive():  # else a process started in the block holds the pipe: the thread keeps both
            os.close(terminal)
            os.close(read)
