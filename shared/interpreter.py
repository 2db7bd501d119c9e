"""The one module that imports a TFLite interpreter.

Order: LiteRT (``ai_edge_litert``, the maintained successor), then
``tflite_runtime`` (needs numpy<2), then ``tensorflow.lite`` (development
only). ``load_model`` returns a small ``TFLiteModel`` that feeds float inputs,
quantizing them when the graph takes int8/uint8, and returns float outputs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import ModelError, ModelLoadError, OutOfMemoryError, RuntimeMissingError

MiB = 1024 * 1024


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    version: str


class InferenceBackend(Protocol):
    def infer(self, sample: Any) -> Any: ...

    def describe(self) -> RuntimeInfo: ...

    def close(self) -> None: ...


_RUNTIMES: tuple[tuple[str, str, str], ...] = (
    # (runtime name, module holding Interpreter, module holding __version__)
    ("ai-edge-litert", "ai_edge_litert.interpreter", "ai_edge_litert"),
    ("tflite-runtime", "tflite_runtime.interpreter", "tflite_runtime"),
    ("tensorflow", "tensorflow.lite", "tensorflow"),
)


def _find_runtime(preferred: str | None = None) -> tuple[RuntimeInfo, Callable[..., Any]]:
    known = [name for name, _, _ in _RUNTIMES]
    if preferred and preferred not in known:
        raise RuntimeMissingError(f"unknown TFLite runtime {preferred!r}; choose one of {', '.join(known)}")
    tried = []
    for name, module_name, version_module in _RUNTIMES:
        if preferred and name != preferred:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            tried.append(f"{name}: {exc}")
            continue
        version = str(getattr(importlib.import_module(version_module), "__version__", "unknown"))
        return RuntimeInfo(name, version), module.Interpreter
    raise RuntimeMissingError(
        "no TFLite interpreter is installed; install it with: pip install 'edgefleet[agent]' "
        f"(tried {'; '.join(tried)})"
    )


def runtime_info(preferred: str | None = None) -> RuntimeInfo:
    return _find_runtime(preferred)[0]


# Phrases, not words: "The model allocation is null/empty" is LiteRT's message for a missing file.
_OUT_OF_MEMORY_PHRASES = ("failed to allocate", "allocation failed", "cannot allocate", "out of memory", "bad_alloc")


def _says_out_of_memory(exc: Exception) -> bool:
    """An interpreter error that names a failed allocation (under a memory limit, that is the limit)."""
    text = str(exc).lower()
    return any(phrase in text for phrase in _OUT_OF_MEMORY_PHRASES)


def tensor_footprint(interpreter: Any) -> tuple[int, int]:
    """The largest tensor and all tensors together, in bytes, from the shapes the graph declares.

    Read before ``allocate_tensors``; an unknown dimension counts as 1, so both are lower
    bounds for dynamic shapes. The arena reuses memory, so the total is an upper bound otherwise.
    """
    import numpy as np

    largest = total = 0
    for detail in interpreter.get_tensor_details():
        try:
            count = 1
            for dim in detail["shape"]:
                count *= max(int(dim), 1)
            size = count * np.dtype(detail["dtype"]).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        largest, total = max(largest, size), total + size
    return largest, total


class TFLiteModel:
    """A loaded single-input, single-output TFLite model.

    ``memory_budget_bytes``: what loading and running it may take. A model whose largest
    tensor alone exceeds it is refused before anything is allocated, and an allocation that
    fails while its tensors could exceed it is reported as out of memory, not as a model
    this runtime cannot load.
    """

    def __init__(
        self, path: str, *, threads: int = 1, runtime: str | None = None, memory_budget_bytes: int | None = None
    ) -> None:
        import numpy as np

        self._np = np
        self.info, interpreter_cls = _find_runtime(runtime)
        name = f"{self.info.name} {self.info.version}"
        total = 0
        try:
            self._interpreter = interpreter_cls(model_path=os.fspath(path), num_threads=threads)
            largest, total = tensor_footprint(self._interpreter)
            if memory_budget_bytes is not None and largest > memory_budget_bytes:
                raise OutOfMemoryError(
                    f"{os.path.basename(path)} has a tensor of {largest / MiB:,.0f} MiB, more than the "
                    f"{memory_budget_bytes / MiB:,.0f} MiB this trial may use"
                )
            self._interpreter.allocate_tensors()
        except MemoryError as exc:
            raise OutOfMemoryError(f"{name} ran out of memory loading {os.path.basename(path)}") from exc
        except (ValueError, RuntimeError) as exc:
            if memory_budget_bytes is not None and (total > memory_budget_bytes or _says_out_of_memory(exc)):
                raise OutOfMemoryError(
                    f"{name} could not allocate {os.path.basename(path)}'s tensors (up to {total / MiB:,.0f} MiB) "
                    f"within the {memory_budget_bytes / MiB:,.0f} MiB this trial may use: {exc}"
                ) from exc
            raise ModelLoadError(f"{name} cannot load {os.path.basename(path)}: {exc}") from exc
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelLoadError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self._input, self._output = inputs[0], outputs[0]
        self.input_shape = tuple(int(d) for d in self._input["shape"])
        self.input_dtype = np.dtype(self._input["dtype"]).name

    def _quantize(self, sample: Any) -> Any:
        np = self._np
        dtype = np.dtype(self._input["dtype"])
        x = np.asarray(sample, dtype=np.float32).reshape(self.input_shape)
        if dtype in (np.int8, np.uint8, np.int16):
            scale, zero = self._input["quantization"]
            if not scale:
                raise ModelError("the model's quantized input has no scale")
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        return x.astype(dtype)

    def prepare(self, sample: Any) -> Any:
        """Convert one float sample into the input tensor's dtype and shape."""
        return self._quantize(sample)

    def run_prepared(self, tensor: Any) -> None:
        self._interpreter.set_tensor(self._input["index"], tensor)
        self._interpreter.invoke()

    def output(self) -> Any:
        np = self._np
        y = self._interpreter.get_tensor(self._output["index"])
        if np.dtype(self._output["dtype"]) in (np.int8, np.uint8, np.int16):
            scale, zero = self._output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    def infer(self, sample: Any) -> Any:
        try:
            self.run_prepared(self.prepare(sample))
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"inference failed: {exc}") from exc
        return self.output()

    def describe(self) -> RuntimeInfo:
        return self.info

    def graph_ops(self) -> tuple[tuple[str, ...], int]:
        """The model's operators in execution order, and how many delegate partitions replaced them.

        A model whose compute ops the XNNPACK delegate did not take shows zero
        partitions: it runs on the slower reference kernels.
        """
        try:
            details = self._interpreter._get_ops_details()
        except (AttributeError, RuntimeError, ValueError):
            return (), 0
        names = [str(d.get("op_name", "?")) for d in details]
        partitions = names.count("DELEGATE")
        return tuple(n for n in names if n != "DELEGATE"), partitions

    def close(self) -> None:
        self._interpreter = None


def predict_classes(model: TFLiteModel, x: Any) -> list[int]:
    """Top-1 class of every sample of ``x``."""
    import numpy as np

    return [int(np.argmax(model.infer(sample[np.newaxis, ...]))) for sample in x]


def top1_accuracy(predicted: list[int], labels: Any) -> float:
    if len(predicted) == 0:
        raise ModelError("empty evaluation set")
    return sum(int(p == int(label)) for p, label in zip(predicted, labels)) / len(predicted)


def accuracy(model: TFLiteModel, x: Any, y: Any) -> float:
    """Top-1 accuracy of ``model`` on float inputs ``x`` and integer labels ``y``."""
    return top1_accuracy(predict_classes(model, x), y)
