"""Capture what native code (the TFLite converter, XNNPACK) prints on file descriptor 2.

The int8 calibrator and the interpreter write progress lines straight to the
process's stderr, past Python's logging. Around conversion we swap fd 2 for a
temporary file and hand the lines to the logger: debug level normally,
warning level if the wrapped work failed, so nothing real is lost. With
``edgefleet --verbose`` nothing is captured: the terminal gets it all.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from shared.startup_noise import is_verbose, stderr_captured

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def native_stderr_to_log(what: str) -> Iterator[None]:
    if is_verbose():
        yield
        return
    printed: list[str] = []
    failed = False
    try:
        with stderr_captured(printed):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        text = "".join(printed).strip()
        if text:
            logger.log(logging.WARNING if failed else logging.DEBUG, "%s printed:\n%s", what, text)
