"""A venv with tflite-runtime 2.14 (it needs numpy<2) and the agent's light dependencies: a device whose runtime
is the old fallback. Built once under ``.venv-tflite-runtime`` (git-ignored) and reused; the project's code is
not installed in it, so processes started with it get ``PYTHONPATH`` pointing here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-tflite-runtime"
PACKAGES = ["numpy<2", "tflite-runtime==2.14.0", "paho-mqtt>=2.1,<3", "cryptography>=42", "click>=8.1"]


def tflite_runtime_python() -> str:
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import tflite_runtime, numpy; assert numpy.__version__ < '2'"]
    if not python.exists() or subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True, timeout=900)
    return str(python)
