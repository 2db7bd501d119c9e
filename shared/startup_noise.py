"""TensorFlow, absl and CUDA start-up noise, kept off the operator's terminal unless ``--verbose``.

Importing TensorFlow on a machine without a GPU prints, from C++ and before
any logging is configured::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ...

plus oneDNN notices, the CPU feature guard and Python warnings from
TensorFlow and Keras. Three things keep it quiet, all decided here:

- the environment, before TensorFlow is first imported and inherited by every
  child process (the pruning worker, the trial): ``TF_CPP_MIN_LOG_LEVEL=3``
  (hides the C++ log lines after import, ``cuInit`` among them) and
  ``TF_ENABLE_ONEDNN_OPTS=0`` (repeatable host numbers, and no oneDNN
  notice); both ``setdefault``, so a value the user set wins;
- ``import_quietly``: the lines printed *during* the import come before
  ``TF_CPP_MIN_LOG_LEVEL`` is read by every library, so file descriptor 2
  goes to a temporary file around the import. What was printed is logged at
  debug; on an ``ImportError`` it is part of the error, so a broken install
  still says why;
- Python warnings from the TensorFlow/Keras/absl modules are ignored and the
  ``tensorflow`` and ``absl`` loggers only pass errors.

``configure(verbose=True)`` (``edgefleet --verbose``, or ``--log-level
debug``) turns all of it off: TensorFlow prints what it prints. Only the CLI
entry point calls ``configure``; library use is quiet by default.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from types import ModuleType

logger = logging.getLogger(__name__)

# Substrings of the lines this module keeps off the terminal (the tests grep for them).
NOISE_MARKERS = (
    "Could not find cuda drivers",
    "cuInit",
    "oneDNN custom operations",
    "All log messages before absl::InitializeLog()",
    "cpu_feature_guard",
    "This TensorFlow binary is optimized",
    "Unable to register cu",  # cuDNN/cuFFT/cuBLAS factory registration
    "TF-TRT Warning",
)

QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3"}
ALWAYS_ENVIRONMENT = {"TF_ENABLE_ONEDNN_OPTS": "0"}  # also for reproducible host measurements
NOISY_MODULES = r"(tensorflow|tf_keras|keras|absl|tensorflow_model_optimization|ml_dtypes|h5py)(\.|$)"
NOISY_LOGGERS = ("tensorflow", "absl")

_state = {"verbose": False}


def configure(*, verbose: bool) -> None:
    """Decide once, before TensorFlow is imported, whether its start-up noise reaches the terminal."""
    _state["verbose"] = verbose
    set_environment()
    if verbose:
        return
    warnings.filterwarnings("ignore", module=NOISY_MODULES)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def is_verbose() -> bool:
    return _state["verbose"]


def set_environment() -> None:
    """The TensorFlow environment for this process and its children (a value already set wins)."""
    for key, value in ALWAYS_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if not is_verbose():
        for key, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(key, value)


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)`` with what native code prints meanwhile kept off fd 2.

    The printed text is logged at debug; an ``ImportError`` is raised again with it.
    """
    set_environment()
    if name in sys.modules or is_verbose():
        return importlib.import_module(name)
    printed: list[str] = []
    try:
        with stderr_captured(printed):
            module = importlib.import_module(name)
    except ImportError as exc:
        text = "".join(printed).strip()
        message = f"{exc}\nwhile importing {name}, it printed:\n{text}" if text else str(exc)
        raise ImportError(message, name=exc.name, path=exc.path) from exc
    except BaseException:
        if "".join(printed).strip():
            logger.warning("importing %s failed; it printed:\n%s", name, "".join(printed).strip())
        raise
    if "".join(printed).strip():
        logger.debug("importing %s printed:\n%s", name, "".join(printed).strip())
    return module


@contextlib.contextmanager
def stderr_captured(printed: list[str]) -> Iterator[None]:
    """Point file descriptor 2 at a temporary file; on leaving, restore it and append what was written."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            printed.append(capture.read().decode(errors="replace"))
