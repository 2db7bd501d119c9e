"""Static checks the project holds itself to: ruff everywhere, mypy --strict on agent/ and shared/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_is_clean() -> None:
    proc = run("ruff", "check", "edgefleet", "shared", "agent", "server", "tests", "bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_agent_and_shared_are_strictly_typed() -> None:
    proc = run("mypy", "agent", "shared")
    assert proc.returncode == 0, proc.stdout + proc.stderr
