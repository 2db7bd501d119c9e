"""The model formats ``model add`` takes, behind one small interface.

- Keras ``.keras`` / ``.h5``: everything, including the retraining transforms;
- a TensorFlow SavedModel directory: every quantization, no retraining
  (pruning, distillation and low-rank need a Keras model);
- a prebuilt ``.tflite``: evaluated and signed, shipped as it is;
- a PyTorch ``torch.export`` program (``.pt2``): converted with litert-torch
  and quantized with ai-edge-quantizer, in a child process
  (``server.compress.torch_source``); no retraining.

In the blob store a SavedModel directory is one deterministic tar.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.compress.evalset import EvalSet, check_against_model
from server.compress.quantization import Quantization
from server.compress.torch_source import TORCH_SUFFIX, TorchSource
from shared.errors import ModelError, UserInputError

SAVED_MODEL_SUFFIX = ".savedmodel.tar"


class ModelSource(Protocol):
    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    quantizations: tuple[Quantization, ...]  # what ``convert`` can make

    @property
    def keras_model(self) -> Any | None: ...

    def convert(self, quantization: Quantization, representative_x: np.ndarray) -> bytes: ...

    def predict_classes(self, evalset: EvalSet) -> np.ndarray: ...


# From this many layers on, a Keras model is exported to a SavedModel once and every quantization converts
# from that export. Measured here: MobileNetV2 (150+ layers) took 5.4 s per conversion from Keras, against one
# 3.1 s export and 2.8 s per conversion from it; the digits CNN (8 layers) 0.26 s from Keras against 0.36 s
# from an export, whose loading costs about 0.1 s each time.
EXPORT_ONCE_LAYERS = 32


@dataclass
class KerasSource:
    """A Keras model. A large one is exported to a SavedModel once, at its first conversion, and converted from
    that export for every quantization; a small one converts faster straight from Keras (``EXPORT_ONCE_LAYERS``)."""

    model: Any
    kind: str = "keras"
    quantizations: tuple[Quantization, ...] = Quantization.convertible()
    _export: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from server.compress.convert import model_signature

        self.input_shape, self.num_classes = model_signature(self.model)

    @property
    def keras_model(self) -> Any:
        return self.model

    def convert(self, quantization: Quantization, representative_x: np.ndarray, *, sparse_encoding: bool = False
                ) -> bytes:
        from server.compress.convert import convert, convert_saved_model, export_for_conversion

        if len(self.model.layers) < EXPORT_ONCE_LAYERS:
            return convert(self.model, quantization, representative_x, sparse_encoding=sparse_encoding)
        if self._export is None:
            folder = Path(tempfile.mkdtemp(prefix="edgefleet-export-"))
            weakref.finalize(self, shutil.rmtree, folder, True)
            self._export = export_for_conversion(self.model, folder / "model")
        return convert_saved_model(self._export, self.input_shape, quantization, representative_x,
                                   sparse_encoding=sparse_encoding)

    def predict_classes(self, evalset: EvalSet) -> np.ndarray:
        from server.compress.convert import predict_classes

        return predict_classes(self.model, evalset)


class SavedModelSource:
    kind = "saved_model"
    quantizations = Quantization.convertible()

    def __init__(self, directory: Path) -> None:
        from server.compress.convert import import_tensorflow

        tf = import_tensorflow()
        self.directory = directory
        try:
            loaded = tf.saved_model.load(str(directory))
            self._serve = loaded.signatures["serving_default"]
        except KeyError as exc:
            raise UserInputError(f"{directory.name}: the SavedModel has no 'serving_default' signature") from exc
        except Exception as exc:  # OSError, ValueError, ... from the loader
            raise UserInputError(f"{directory.name} is not a loadable TensorFlow SavedModel: {exc}") from exc
        inputs = [t for t in self._serve.structured_input_signature[1].values()]
        outputs = list(self._serve.structured_outputs.values())
        if len(inputs) != 1 or len(outputs) != 1 or len(outputs[0].shape) != 2:
            raise UserInputError(
                f"{directory.name}: expected one input and one (batch, classes) output in 'serving_default'"
            )
        self._input_name = next(iter(self._serve.structured_input_signature[1]))
        self.input_shape = tuple(int(d) for d in inputs[0].shape[1:])
        self.num_classes = int(outputs[0].shape[-1])

    @property
    def keras_model(self) -> None:
        return None

    def convert(self, quantization: Quantization, representative_x: np.ndarray) -> bytes:
        from server.compress.convert import convert_saved_model

        return convert_saved_model(self.directory, self.input_shape, quantization, representative_x)

    def predict_classes(self, evalset: EvalSet) -> np.ndarray:
        check_against_model(evalset, self.input_shape, self.num_classes)
        try:
            scores = [
                next(iter(self._serve(**{self._input_name: evalset.x[i : i + 256]}).values())).numpy()
                for i in range(0, len(evalset), 256)
            ]
        except Exception as exc:  # TensorFlow op errors
            raise ModelError(f"the SavedModel failed on the evaluation set: {exc}") from exc
        predicted: np.ndarray = np.argmax(np.concatenate(scores), axis=-1)
        return predicted


class PrebuiltSource:
    kind = "tflite"
    quantizations = (Quantization.PREBUILT,)

    def __init__(self, data: bytes, name: str) -> None:
        from shared.interpreter import TFLiteModel

        self.data, self.name = data, name
        fd, path = tempfile.mkstemp(prefix="edgefleet-prebuilt-", suffix=".tflite")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self._model = TFLiteModel(path)  # ModelLoadError for a broken file; it keeps its own mapping
        finally:
            os.unlink(path)
        shape = self._model.input_shape
        self.input_shape = tuple(shape[1:])
        out = self._model.infer(np.zeros(shape, np.float32))
        if out.ndim != 2:
            raise UserInputError(f"{name}: expected a (batch, classes) output, got shape {tuple(out.shape)}")
        self.num_classes = int(out.shape[-1])

    @property
    def keras_model(self) -> None:
        return None

    def convert(self, quantization: Quantization, representative_x: np.ndarray) -> bytes:
        if quantization is not Quantization.PREBUILT:
            raise UserInputError(f"{self.name} is a prebuilt .tflite: it ships as it is (recipe 'prebuilt')")
        return self.data

    def predict_classes(self, evalset: EvalSet) -> np.ndarray:
        from shared.interpreter import predict_classes

        check_against_model(evalset, self.input_shape, self.num_classes)
        return np.asarray(predict_classes(self._model, evalset.x))


def detect_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "saved_model"
        raise UserInputError(f"{path} is a directory but not a TensorFlow SavedModel (no saved_model.pb)")
    if path.name.endswith(SAVED_MODEL_SUFFIX):
        return "saved_model"
    if path.suffix == ".tflite":
        return "tflite"
    if path.suffix == TORCH_SUFFIX:
        return "torch"
    return "keras"  # load_keras_model explains anything else


def pack_source(path: Path) -> tuple[bytes, str]:
    """The bytes to keep in the blob store and the name they are stored under."""
    if not path.exists():
        raise UserInputError(f"model file not found: {path}")
    if detect_kind(path) == "saved_model" and path.is_dir():
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:  # deterministic: sorted, no times or owners
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                info = tarfile.TarInfo(str(file.relative_to(path)))
                info.size, info.mtime, info.mode = file.stat().st_size, 0, 0o644
                with open(file, "rb") as fh:
                    tar.addfile(info, fh)
        return buffer.getvalue(), path.name.rstrip("/") + SAVED_MODEL_SUFFIX
    return path.read_bytes(), path.name


def unpack_source(data: bytes, name: str, workdir: Path) -> Path:
    """Write a stored source back to disk; returns the path ``open_source`` takes."""
    if name.endswith(SAVED_MODEL_SUFFIX):
        target = workdir / name.removesuffix(SAVED_MODEL_SUFFIX)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(target, filter="data")
        return target
    target = workdir / name
    target.write_bytes(data)
    return target


def open_source(path: Path) -> ModelSource:
    kind = detect_kind(path)
    if kind == "saved_model":
        return SavedModelSource(path)
    if kind == "torch":
        return TorchSource(path)
    if kind == "tflite":
        try:
            return PrebuiltSource(path.read_bytes(), path.name)
        except OSError as exc:
            raise UserInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    from server.compress.convert import load_keras_model

    return KerasSource(load_keras_model(path))


__all__ = ["ModelSource", "detect_kind", "open_source", "pack_source", "unpack_source"]
