"""The served model and its atomic swap.

``ModelHost.want(source)`` (from the agent's loop) asks for a model; a loader
thread loads it while the current one keeps answering, then replaces the
reference in one assignment: a call that started on the old model finishes
on it, the next one runs on the new one, and a batch never mixes the two.
Each loaded interpreter has its own lock (interpreters are not thread-safe).
The old model is closed once the calls holding its lock are done; a call
that took the old reference but finds it retired simply runs again on the
new one.

A committed model that fails to load leaves the previous one serving (its
``load_error`` says why); with none, calls get ``ModelUnavailableError``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.errors import EdgefleetError, ModelError, ModelUnavailableError
from shared.interpreter import TFLiteModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """A committed model to serve: what it is, where its files are, how to run it."""

    model: str
    version: int
    sha256: str
    quantization: str
    deployment_id: str
    model_path: str
    eval_path: str
    threads: int
    runtime: str = ""  # "": the first installed back-end

    @property
    def label(self) -> str:
        return f"{self.model} v{self.version}"


class Retired(Exception):
    """The model was swapped out and closed before this call took its lock: run on the new one."""


class ServedModel:
    """One loaded model and its lock."""

    def __init__(self, source: ModelSource, model: TFLiteModel, *, loaded_at: float) -> None:
        import numpy as np

        self._np = np
        self.source = source
        self.model = model
        self.loaded_at = loaded_at
        self.lock = threading.Lock()
        self.retired = False
        shape = model.input_shape
        self.batched = bool(shape) and shape[0] == 1  # the graph's first dimension is its batch of one
        self.sample_shape: tuple[int, ...] = tuple(shape[1:]) if self.batched else tuple(shape)
        out = model.output_shape
        self.output_sample_shape: tuple[int, ...] = tuple(out[1:]) if out and out[0] == 1 else tuple(out)

    def run(self, batch: Any) -> tuple[Any, float]:
        """Every sample of ``batch`` (float, shaped ``(n,) + sample_shape``) through the model, one invoke
        each: the outputs stacked ``(n,) + output_sample_shape`` and the summed invoke time in ms."""
        np, model = self._np, self.model
        tensors = [model.prepare(sample) for sample in batch]
        outputs = []
        invoke_ms = 0.0
        with self.lock:
            if self.retired:
                raise Retired
            for tensor in tensors:
                model.run_prepared(tensor)
                invoke_ms += model.last_invoke_ms  # the interpreter's run alone, as a bare invoke() loop times it
                outputs.append(np.asarray(model.output(), dtype=np.float32).reshape(self.output_sample_shape))
        stacked = np.stack(outputs) if outputs else np.zeros((0, *self.output_sample_shape), dtype=np.float32)
        return stacked, invoke_ms

    def retire(self) -> None:
        """Close the interpreter once the call holding it (if any) is done."""
        with self.lock:
            self.retired = True
            self.model.close()

    def describe(self) -> dict[str, Any]:
        s, d = self.source, self.model.description
        return {
            "model": s.model, "version": s.version, "sha256": s.sha256, "quantization": s.quantization,
            "deployment_id": s.deployment_id,
            "input": {"shape": [-1, *self.sample_shape], "dtype": d.input.dtype, "graph_shape": list(d.input.shape)},
            "output": {"shape": [-1, *self.output_sample_shape], "dtype": d.output.dtype},
            "runtime": d.runtime.name, "runtime_version": d.runtime.version, "threads": d.threads,
            "loaded_at": self.loaded_at,
        }


def load_served(source: ModelSource) -> ServedModel:
    """Load ``source`` in the agent's process (the trial already ran it in a child); raises EdgefleetError."""
    model = TFLiteModel(source.model_path, threads=source.threads, runtime=source.runtime or None)
    return ServedModel(source, model, loaded_at=time.time())


Loader = Callable[[ModelSource], ServedModel]


class ModelHost:
    def __init__(self, load: Loader = load_served) -> None:
        self._load = load
        self._changed = threading.Condition()
        self._current: ServedModel | None = None
        self._wanted: ModelSource | None = None
        self._failed: tuple[ModelSource, str] | None = None
        self._loader: threading.Thread | None = None
        self._closed = False

    @property
    def current(self) -> ServedModel | None:
        return self._current

    def _settled(self, source: ModelSource | None) -> bool:
        if source is None:
            return True
        current = self._current
        return (current is not None and current.source == source) or (
            self._failed is not None and self._failed[0] == source)

    def want(self, source: ModelSource | None) -> None:
        """Serve ``source`` (None: nothing is committed); loads on a thread of its own and returns at once."""
        with self._changed:
            if self._closed or source == self._wanted and (self._loader is not None or self._settled(source)):
                return
            self._wanted = source
            if self._loader is not None or self._settled(source):
                return
            assert source is not None
            logger.info("loading %s (deployment %s) to serve it, %d thread%s", source.label, source.deployment_id,
                        source.threads, "" if source.threads == 1 else "s")
            self._loader = threading.Thread(target=self._load_wanted, name="model-loader", daemon=True)
            self._loader.start()

    def _load_wanted(self) -> None:
        while True:
            with self._changed:
                source = self._wanted
                if self._closed or self._settled(source):
                    self._loader = None
                    self._changed.notify_all()
                    return
            assert source is not None
            try:
                served = self._load(source)
            except EdgefleetError as exc:
                logger.error("cannot serve %s: %s%s", source.label, exc,
                             "; the previous model keeps serving" if self._current is not None else "")
                with self._changed:
                    self._failed = (source, str(exc))
                    self._changed.notify_all()
                continue
            except Exception as exc:  # a bug: the loader must still say so and end
                logger.exception("unexpected error loading %s", source.label)
                with self._changed:
                    self._failed = (source, f"unexpected error: {exc!r}")
                    self._changed.notify_all()
                continue
            with self._changed:
                old, self._current = self._current, served
                self._failed = None
                self._changed.notify_all()
            logger.info("serving %s (deployment %s)%s", source.label, source.deployment_id,
                        f", replacing {old.source.label}" if old is not None else "")
            if old is not None:
                old.retire()

    def wait_settled(self, timeout: float) -> bool:
        """Block until the wanted model is served or failed to load (for tests and shutdown)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._loader is None and self._settled(self._wanted), timeout)

    def unavailable_reason(self) -> str:
        failed, wanted = self._failed, self._wanted
        if failed is not None:
            return f"the committed model {failed[0].label} failed to load: {failed[1]}"
        if wanted is not None:
            return f"the committed model {wanted.label} is still loading"
        return "no model is committed on this device yet"

    def load_error(self) -> str | None:
        failed = self._failed
        return None if failed is None else f"{failed[0].label}: {failed[1]}"

    def run(self, batch: Any) -> tuple[ServedModel, Any, float]:
        """Run ``batch`` on the served model: (the model that answered, outputs, invoke ms)."""
        for _ in range(8):
            served = self._current
            if served is None:
                raise ModelUnavailableError(self.unavailable_reason())
            try:
                outputs, invoke_ms = served.run(batch)
            except Retired:
                continue
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"inference failed: {exc}") from exc
            return served, outputs, invoke_ms
        raise ModelUnavailableError("the served model changed repeatedly during this call; try again")

    def close(self) -> None:
        with self._changed:
            self._closed = True
            current, self._current = self._current, None
            loader = self._loader
        if loader is not None:
            loader.join(timeout=30)
        if current is not None:
            current.retire()
