"""The one module that imports a TFLite interpreter: inference back-ends behind a small Protocol.

A back-end loads one ``.tflite`` file (``load``), runs one prepared input tensor
(``infer``), says what it is (``describe``) and lets go of it (``close``).
``BACKENDS`` is the explicit registry, in the order the agent tries them:
LiteRT (``ai_edge_litert``, the maintained successor), then ``tflite_runtime``
(needs numpy<2), then ``tensorflow.lite`` (development only). All three expose
the same ``Interpreter`` API, so one adapter class serves them; a runtime with
another API (a vendor NPU delegate, ONNX) would register a class of its own.

Interpreter errors are translated here, at the adapter's boundary:
``ModelLoadError`` (this runtime cannot load the model), ``OutOfMemoryError``
(it would not fit the memory budget), ``ModelError`` (a run failed),
``RuntimeMissingError`` (the runtime is not installed). A back-end is not
thread-safe: callers serialise calls to one loaded model.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from shared.errors import ModelError, ModelLoadError, OutOfMemoryError, RuntimeMissingError

MiB = 1024 * 1024


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    version: str


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor as the graph declares it."""

    index: int
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    scale: float = 0.0  # quantization parameters; scale 0: not quantized
    zero_point: int = 0


@dataclass(frozen=True)
class BackendDescription:
    runtime: RuntimeInfo
    threads: int
    model_path: str
    input: TensorSpec
    output: TensorSpec


class InferenceBackend(Protocol):
    """A loaded model in one runtime. Not thread-safe."""

    def load(self, path: str, *, threads: int, memory_budget_bytes: int | None = None) -> None: ...

    def infer(self, tensor: Any) -> Any:
        """One run on an input already in the model's dtype and shape; returns the raw output tensor (a copy).
        Sets ``last_invoke_ms``: the interpreter's own run, without copying tensors in and out."""
        ...

    @property
    def last_invoke_ms(self) -> float: ...

    def describe(self) -> BackendDescription: ...

    def close(self) -> None: ...


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


def _spec(detail: dict[str, Any]) -> TensorSpec:
    import numpy as np

    scale, zero = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        index=int(detail["index"]), shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name, scale=float(scale), zero_point=int(zero),
    )


class InterpreterBackend:
    """A runtime with TFLite's ``Interpreter`` API; subclasses name the modules that hold it."""

    name: ClassVar[str] = ""
    interpreter_module: ClassVar[str] = ""
    version_module: ClassVar[str] = ""

    def __init__(self) -> None:
        self._interpreter: Any = None
        self._description: BackendDescription | None = None
        self._last_invoke_ms = 0.0

    @classmethod
    def _module(cls) -> Any:
        try:
            return importlib.import_module(cls.interpreter_module)
        except ImportError as exc:
            raise RuntimeMissingError(f"{cls.name}: {exc}") from exc

    @classmethod
    def probe(cls) -> RuntimeInfo:
        """The runtime's name and version; RuntimeMissingError when it is not installed."""
        cls._module()
        version = str(getattr(importlib.import_module(cls.version_module), "__version__", "unknown"))
        return RuntimeInfo(cls.name, version)

    def load(self, path: str, *, threads: int, memory_budget_bytes: int | None = None) -> None:
        """Load and allocate ``path``. A model whose largest tensor alone exceeds ``memory_budget_bytes`` is
        refused before anything is allocated, and a failed allocation while its tensors could exceed the
        budget is reported as out of memory, not as a model this runtime cannot load."""
        info = self.probe()
        label, file = f"{info.name} {info.version}", os.path.basename(path)
        total = 0
        try:
            interpreter = self._module().Interpreter(model_path=os.fspath(path), num_threads=threads)
            largest, total = tensor_footprint(interpreter)
            if memory_budget_bytes is not None and largest > memory_budget_bytes:
                raise OutOfMemoryError(
                    f"{file} has a tensor of {largest / MiB:,.0f} MiB, more than the "
                    f"{memory_budget_bytes / MiB:,.0f} MiB this trial may use"
                )
            interpreter.allocate_tensors()
        except MemoryError as exc:
            raise OutOfMemoryError(f"{label} ran out of memory loading {file}") from exc
        except (ValueError, RuntimeError) as exc:
            if memory_budget_bytes is not None and (total > memory_budget_bytes or _says_out_of_memory(exc)):
                raise OutOfMemoryError(
                    f"{label} could not allocate {file}'s tensors (up to {total / MiB:,.0f} MiB) "
                    f"within the {memory_budget_bytes / MiB:,.0f} MiB this trial may use: {exc}"
                ) from exc
            raise ModelLoadError(f"{label} cannot load {file}: {exc}") from exc
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelLoadError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self._interpreter = interpreter
        self._description = BackendDescription(info, threads, os.fspath(path), _spec(inputs[0]), _spec(outputs[0]))

    def _loaded(self) -> tuple[Any, BackendDescription]:
        if self._interpreter is None or self._description is None:
            raise ModelError("no model is loaded (closed, or never loaded)")
        return self._interpreter, self._description

    def infer(self, tensor: Any) -> Any:
        interpreter, description = self._loaded()
        try:
            interpreter.set_tensor(description.input.index, tensor)
            started = time.perf_counter()
            interpreter.invoke()
            self._last_invoke_ms = (time.perf_counter() - started) * 1000.0
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"inference failed: {exc}") from exc
        return interpreter.get_tensor(description.output.index)

    @property
    def last_invoke_ms(self) -> float:
        return self._last_invoke_ms

    def describe(self) -> BackendDescription:
        return self._loaded()[1]

    def ops(self) -> list[str]:
        """Operator names in execution order ("DELEGATE" for a delegated partition); [] when unknown."""
        try:
            details = self._loaded()[0]._get_ops_details()
        except (AttributeError, RuntimeError, ValueError, ModelError):
            return []
        return [str(d.get("op_name", "?")) for d in details]

    def close(self) -> None:
        self._interpreter = None


class LiteRTBackend(InterpreterBackend):
    name = "ai-edge-litert"
    interpreter_module = "ai_edge_litert.interpreter"
    version_module = "ai_edge_litert"


class TFLiteRuntimeBackend(InterpreterBackend):
    name = "tflite-runtime"
    interpreter_module = "tflite_runtime.interpreter"
    version_module = "tflite_runtime"


class TensorFlowLiteBackend(InterpreterBackend):
    name = "tensorflow"
    interpreter_module = "tensorflow.lite"
    version_module = "tensorflow"


# The registry, in the order the agent tries them when no runtime is preferred.
BACKENDS: dict[str, type[InterpreterBackend]] = {
    LiteRTBackend.name: LiteRTBackend,
    TFLiteRuntimeBackend.name: TFLiteRuntimeBackend,
    TensorFlowLiteBackend.name: TensorFlowLiteBackend,
}


def find_backend(preferred: str | None = None) -> tuple[type[InterpreterBackend], RuntimeInfo]:
    """The preferred back-end, or the first installed one of the registry."""
    if preferred and preferred not in BACKENDS:
        raise RuntimeMissingError(f"unknown TFLite runtime {preferred!r}; choose one of {', '.join(BACKENDS)}")
    tried = []
    for name, backend in BACKENDS.items():
        if preferred and name != preferred:
            continue
        try:
            return backend, backend.probe()
        except RuntimeMissingError as exc:
            tried.append(str(exc))
    raise RuntimeMissingError(
        "no TFLite interpreter is installed; install it with: pip install 'edgefleet[agent]' "
        f"(tried {'; '.join(tried)})"
    )


def runtime_info(preferred: str | None = None) -> RuntimeInfo:
    return find_backend(preferred)[1]
