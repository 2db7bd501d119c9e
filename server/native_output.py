"""Capture what native code (the TFLite converter, XNNPACK) prints on file descriptor 2.

The int8 calibrator and the interpreter write progress lines straight to the
process's stderr, past Python's logging. Around conversion we swap fd 2 for a
temporary file and hand the lines to the logger: debug level normally,
warning level if the wrapped work failed, so nothing real is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def native_stderr_to_log(what: str) -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace").strip()
            if text:
                logger.log(logging.WARNING if failed else logging.DEBUG, "%s printed:\n%s", what, text)
