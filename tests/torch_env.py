"""A venv with the ``edgefleet[torch]`` packages, for the tests that bring a PyTorch model.

litert-torch pins pydantic, typing-extensions and anyio below what the server
venv holds, so the PyTorch side gets a venv of its own (``.venv-torch``,
git-ignored, built once and reused), which the server reaches through
``EDGEFLEET_TORCH_PYTHON``, as a user with that setup would. The packages are
the ``torch`` extra of ``pyproject.toml``, with torch pinned to the CPU build
this machine keeps (a plain ``torch`` requirement would fetch a CUDA build).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomllib

from server.compress.digits import digits_split
from server.compress.evalset import EvalSet, eval_slice, write_eval_file

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-torch"
CPU_TORCH = "torch==2.13.0"


def extra_requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return list(tomllib.load(fh)["project"]["optional-dependencies"]["torch"])


def torch_python() -> str:
    """The venv's Python, built on first use (about a minute) and reused while it imports the extra."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import torch, litert_torch, ai_edge_quantizer, numpy"]
    if not python.exists() or subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", CPU_TORCH], check=True, timeout=1200)
        subprocess.run([str(python), "-m", "pip", "install", "-q", CPU_TORCH, *extra_requirements()], check=True,
                       timeout=1200)
    return str(python)


@dataclass(frozen=True)
class TorchDigits:
    program: Path  # the trained model, a torch.export program (.pt2)
    train: Path  # .npz files in NCHW, as the model takes them
    eval: Path
    accuracy: float  # the PyTorch model's own accuracy on eval_slice(eval): the samples that travel to devices


def train_torch_digits(folder: Path) -> TorchDigits:
    """Train ``tests/torch_digits.py``'s CNN in the torch venv on the digits data; about 10 s."""
    train, test = digits_split()
    paths = {}
    for name, data in (("train", train), ("eval", test), ("slice", eval_slice(test))):
        paths[name] = write_eval_file(EvalSet(np.ascontiguousarray(np.transpose(data.x, (0, 3, 1, 2))), data.y),
                                      folder / f"digits-{name}-nchw.npz")
    program = folder / "digits.pt2"
    proc = subprocess.run(
        [torch_python(), str(ROOT / "tests" / "torch_digits.py"), str(paths["train"]), str(paths["slice"]),
         str(program)], capture_output=True, text=True, timeout=600, check=True,
    )
    accuracy = float(json.loads(proc.stdout.strip().splitlines()[-1])["accuracy"])
    return TorchDigits(program, paths["train"], paths["eval"], accuracy)
