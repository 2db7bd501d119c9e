"""PyTorch models in: a ``torch.export`` program (``.pt2``) as a model source.

Everything that needs torch runs in ``server.compress.torch_worker``, a child
Python: by default this one, or the one ``EDGEFLEET_TORCH_PYTHON`` names (a
venv with ``edgefleet[torch]``'s packages when they do not fit beside the
server's). The float32 flatbuffer is converted once per source; every other
quantization starts from it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from server.compress.child import raise_failure, run_worker
from server.compress.convert import representative_samples
from server.compress.evalset import EvalSet, check_against_model
from server.compress.quantization import Quantization
from shared.errors import ModelError, RuntimeMissingError, UserInputError

TORCH_SUFFIX = ".pt2"
PYTHON_VARIABLE = "EDGEFLEET_TORCH_PYTHON"
WORKER_MODULE = "server.compress.torch_worker"
QUANTIZATIONS = (Quantization.FLOAT32, Quantization.FLOAT16, Quantization.DYNAMIC_RANGE, Quantization.INT8,
                 Quantization.INT16X8)
"""What ai-edge-quantizer makes of a converted PyTorch model (int8 keeps int8 input and output)."""
_TIMEOUT = 1800.0


def torch_python() -> str:
    python = os.environ.get(PYTHON_VARIABLE) or sys.executable
    if not Path(python).exists():
        raise RuntimeMissingError(f"{PYTHON_VARIABLE}={python} does not exist; point it at a Python with "
                                  "edgefleet[torch]'s packages, or unset it")
    return python


def call_worker(request: dict[str, Any]) -> dict[str, Any]:
    report = run_worker(torch_python(), WORKER_MODULE, request, timeout=_TIMEOUT, what="the PyTorch worker")
    if report.get("ok") is not True and report.get("kind") == "missing":
        raise RuntimeMissingError(f"{report.get('error')}; or set {PYTHON_VARIABLE} to a Python that has it")
    raise_failure(report, "the PyTorch worker")
    return report


class TorchSource:
    kind = "torch"
    quantizations = QUANTIZATIONS

    def __init__(self, path: Path) -> None:
        self.path = path
        info = call_worker({"op": "inspect", "program": os.fspath(path)})
        try:
            self.input_shape = tuple(int(d) for d in info["input_shape"])
            self.num_classes = int(info["num_classes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"the PyTorch worker returned a malformed report: {info}") from exc
        self._float: bytes | None = None

    @property
    def keras_model(self) -> None:
        return None

    def convert(self, quantization: Quantization, representative_x: np.ndarray) -> bytes:
        if quantization not in QUANTIZATIONS:
            raise UserInputError(f"{quantization.value} is not available for a PyTorch model; use one of: "
                                 f"{', '.join(q.value for q in QUANTIZATIONS)}")
        with tempfile.TemporaryDirectory(prefix="edgefleet-torch-") as tmp:
            folder = Path(tmp)
            if self._float is None:
                call_worker({"op": "convert", "program": os.fspath(self.path), "out": os.fspath(folder / "f.tflite")})
                self._float = (folder / "f.tflite").read_bytes()
            if quantization is Quantization.FLOAT32:
                return self._float
            (folder / "float.tflite").write_bytes(self._float)
            request = {"op": "quantize", "float": os.fspath(folder / "float.tflite"),
                       "quantization": quantization.value, "out": os.fspath(folder / "q.tflite")}
            if quantization.needs_representative_data:
                np.save(folder / "samples.npy", representative_samples(representative_x, self.input_shape))
                request["samples"] = os.fspath(folder / "samples.npy")
            call_worker(request)
            return (folder / "q.tflite").read_bytes()

    def predict_classes(self, evalset: EvalSet) -> np.ndarray:
        check_against_model(evalset, self.input_shape, self.num_classes)
        with tempfile.TemporaryDirectory(prefix="edgefleet-torch-") as tmp:
            x_path, out_path = Path(tmp) / "x.npy", Path(tmp) / "classes.npy"
            np.save(x_path, np.asarray(evalset.x, np.float32))
            call_worker({"op": "predict", "program": os.fspath(self.path), "x": os.fspath(x_path),
                         "out": os.fspath(out_path)})
            predicted: np.ndarray = np.load(out_path, allow_pickle=False)
        if predicted.shape != (len(evalset),):
            raise ModelError(f"the PyTorch worker predicted {predicted.shape[0]} classes for {len(evalset)} samples")
        return predicted
