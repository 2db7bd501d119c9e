"""Run a worker module in a child Python and read the one JSON line it prints.

The workers (``prune_worker``, ``torch_worker``) hold libraries that must not
enter the server process. Each reads a JSON request on stdin and prints one JSON
report on its last stdout line; everything else it prints goes to stderr, which
lands in the debug log.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from shared.errors import ModelError, UserInputError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds the server package, for the child's import path


def run_worker(
    python: str, module: str, request: dict[str, Any], *, timeout: float, what: str,
    environment: dict[str, str] | None = None, defaults: dict[str, str] | None = None, timeout_hint: str = "",
) -> dict[str, Any]:
    """The child's report: ``{"ok": true, ...}`` or ``{"ok": false, "kind": ..., "error": ...}``.

    ``environment`` overrides the inherited one, ``defaults`` only fills gaps. A child that
    crashes, hangs (``timeout_hint`` says what to try) or prints no report is a ``ModelError``
    naming ``what`` ran.
    """
    env = {**os.environ, **(environment or {})}
    for key, value in (defaults or {}).items():
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.fspath(PROJECT_ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [python, "-m", module], input=json.dumps(request), capture_output=True, text=True, env=env,
            timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"{what} did not finish within {timeout:g} s{timeout_hint}") from exc
    except OSError as exc:
        raise ModelError(f"cannot start {what} ({python}): {exc.strerror or exc}") from exc
    logger.debug("%s stderr:\n%s", what, proc.stderr)
    report = last_json_line(proc.stdout)
    if report is None:
        how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
        last = [line.strip() for line in proc.stderr.splitlines() if line.strip()][-1:]
        raise ModelError(f"{what} {how} without a result{': ' + last[0] if last else ''}")
    return report


def raise_failure(report: dict[str, Any], what: str) -> None:
    """Raise the error a failed report carries: ``UserInputError`` for ``kind: user_input``, else ``ModelError``."""
    if report.get("ok") is True:
        return
    message = str(report.get("error") or f"{what} failed without a message")
    raise UserInputError(message) if report.get("kind") == "user_input" else ModelError(message)


def last_json_line(stdout: str) -> dict[str, Any] | None:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        report = json.loads(lines[-1])
    except ValueError:
        return None
    return report if isinstance(report, dict) else None
