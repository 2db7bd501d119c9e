"""A loaded TFLite model that speaks floats, on whichever back-end ``shared/backends.py`` finds.

``TFLiteModel`` feeds float inputs, quantizing them when the graph takes
int8/uint8/int16, and returns float outputs. The trial, the server's host
evaluation and the agent's serving all use it; the runtime itself (LiteRT,
tflite-runtime, tf.lite) sits behind ``shared.backends.InferenceBackend``.
"""

from __future__ import annotations

from typing import Any

from shared.backends import (
    BackendDescription,
    InferenceBackend,
    RuntimeInfo,
    find_backend,
    runtime_info,
    tensor_footprint,
)
from shared.errors import ModelError

__all__ = [
    "InferenceBackend", "RuntimeInfo", "TFLiteModel", "accuracy", "predict_classes", "runtime_info",
    "tensor_footprint", "top1_accuracy",
]

_QUANTIZED = ("int8", "uint8", "int16")


class TFLiteModel:
    """A loaded single-input, single-output TFLite model.

    ``threads``: the interpreter's thread count. ``memory_budget_bytes``: what loading and
    running it may take (see ``InterpreterBackend.load``).
    """

    def __init__(
        self, path: str, *, threads: int = 1, runtime: str | None = None, memory_budget_bytes: int | None = None
    ) -> None:
        import numpy as np

        self._np = np
        backend_cls, self.info = find_backend(runtime)
        self.backend: InferenceBackend = backend_cls()
        self.backend.load(path, threads=threads, memory_budget_bytes=memory_budget_bytes)
        self.description: BackendDescription = self.backend.describe()
        self.threads = threads
        self.input_shape = self.description.input.shape
        self.input_dtype = self.description.input.dtype
        self.output_shape = self.description.output.shape
        self._last: Any = None

    def _quantize(self, sample: Any) -> Any:
        np = self._np
        spec = self.description.input
        x = np.asarray(sample, dtype=np.float32).reshape(self.input_shape)
        if spec.dtype in _QUANTIZED:
            if not spec.scale:
                raise ModelError("the model's quantized input has no scale")
            info = np.iinfo(spec.dtype)
            x = np.clip(np.round(x / spec.scale + spec.zero_point), info.min, info.max)
        return x.astype(spec.dtype)

    def prepare(self, sample: Any) -> Any:
        """Convert one float sample into the input tensor's dtype and shape."""
        return self._quantize(sample)

    def run_prepared(self, tensor: Any) -> None:
        self._last = self.backend.infer(tensor)

    @property
    def last_invoke_ms(self) -> float:
        """How long the last run's ``invoke`` took, without the copies of its input and output."""
        return self.backend.last_invoke_ms

    def output(self) -> Any:
        """The last run's output, as floats when the graph's output is quantized."""
        np = self._np
        spec, y = self.description.output, self._last
        if y is None:
            raise ModelError("the model has not run yet")
        if spec.dtype in _QUANTIZED:
            y = (y.astype(np.float32) - spec.zero_point) * spec.scale
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
        ops = getattr(self.backend, "ops", None)
        names: list[str] = ops() if callable(ops) else []
        partitions = names.count("DELEGATE")
        return tuple(n for n in names if n != "DELEGATE"), partitions

    def close(self) -> None:
        self.backend.close()


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
