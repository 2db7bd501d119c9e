"""Keras model in, TFLite flatbuffer out: the one module that imports TensorFlow.

TensorFlow and Keras are imported lazily, through ``import_tensorflow`` and
``import_keras``, by ``shared.startup_noise.import_quietly``: TensorFlow's C++
logs are off (``TF_CPP_MIN_LOG_LEVEL=3``) and what it prints while importing
(CUDA, absl) goes to the debug log, unless ``edgefleet --verbose``; oneDNN's
custom kernels are off (``TF_ENABLE_ONEDNN_OPTS=0``) so host numbers repeat
from run to run. Both are ``setdefault``: a value already in the environment wins.

With TensorFlow 2.21 and Keras 3, ``TFLiteConverter.from_keras_model`` works
directly: it exports the model's inference call (``training=False``) through
``keras.export.ExportArchive`` to a temporary SavedModel and converts that, on
every call. ``export_for_conversion`` makes that export once, for every
quantization of a model to convert from (``convert_saved_model``); both give
the same bytes for the same model, quantization and representative data.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from server.compress.evalset import EvalSet, check_against_model
from server.compress.quantization import Quantization
from shared.errors import ModelError, RuntimeMissingError, UserInputError, one_line
from shared.startup_noise import import_quietly

logger = logging.getLogger(__name__)

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")  # what keras.models.load_model reads; case matters
REPRESENTATIVE_SAMPLES = 100
_PREDICT_BATCH = 256

_INSTALL_HINT = "install the server extras: pip install 'edgefleet[server]'"


def import_tensorflow() -> ModuleType:
    """``tensorflow``, imported quietly, or ``RuntimeMissingError`` if it is not installed or cannot load."""
    try:
        return import_quietly("tensorflow")
    except ImportError as exc:
        raise RuntimeMissingError(f"TensorFlow cannot be imported ({exc}); {_INSTALL_HINT}") from exc


def import_keras() -> ModuleType:
    """``keras`` (3.x, on the TensorFlow backend), or ``RuntimeMissingError`` if it is not installed."""
    import_tensorflow()
    try:
        return import_quietly("keras")
    except ImportError as exc:
        raise RuntimeMissingError(f"Keras cannot be imported ({exc}); {_INSTALL_HINT}") from exc


# -- loading -------------------------------------------------------------------


def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """Load a ``.keras`` or ``.h5``/``.hdf5`` model for inference (not compiled, safe mode: no Python lambdas)."""
    path = Path(path)
    name = path.name
    if not path.exists():
        raise UserInputError(f"model file not found: {path}")
    suffix = path.suffix
    if suffix not in MODEL_SUFFIXES:
        raise UserInputError(
            f"{name}: unsupported model format {suffix or '(no extension)'!r}, expected .keras or .h5; "
            "save the model with model.save('model.keras')"
        )
    if name.endswith(".weights.h5"):
        raise UserInputError(f"{name} holds only weights; save the whole model with model.save('model.keras')")
    if not path.is_file():
        raise UserInputError(f"model file {path} is not a regular file")
    _check_container(path, suffix)
    keras = import_keras()
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, TypeError, KeyError, OSError, ... for bad models
        if "safe_mode" in str(exc):
            raise ModelError(
                f"cannot load the Keras model in {name}: it has a Lambda layer with Python code, which edgefleet "
                "does not load because it could run arbitrary code; use built-in or registered custom layers"
            ) from exc
        raise ModelError(f"cannot load the Keras model in {name}: {one_line(exc)}") from exc
    if not isinstance(model, keras.Model):
        raise ModelError(f"{name} holds a {type(model).__name__}, not a Keras model")
    return model


def _check_container(path: Path, suffix: str) -> None:
    """Reject files that are not even the right container before Keras sees them.

    Keras reports a ``.keras`` file that is not a zip as "File not found".
    """
    if suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise UserInputError(f"{path.name} is not a Keras model file (a .keras file is a zip archive)")
        try:
            with zipfile.ZipFile(path) as archive:
                members = set(archive.namelist())
        except (OSError, zipfile.BadZipFile) as exc:
            raise UserInputError(f"{path.name} is not a readable .keras archive: {one_line(exc)}") from exc
        if "config.json" not in members:
            raise UserInputError(f"{path.name} is a zip archive but not a Keras model (it has no config.json)")
    else:
        import h5py

        if not h5py.is_hdf5(path):
            raise UserInputError(f"{path.name} is not a Keras model file (a .h5 model is an HDF5 file)")


def model_signature(model: Any) -> tuple[tuple[int, ...], int]:
    """``(input shape without batch, number of classes)`` of a single-input classifier."""
    inputs = list(getattr(model, "inputs", None) or [])
    outputs = list(getattr(model, "outputs", None) or [])
    if not inputs or not outputs:
        raise ModelError("the model has no defined inputs/outputs; build it with keras.Input(...) before saving")
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"expected a model with one input and one output, got {len(inputs)} and {len(outputs)}")
    in_shape, out_shape = tuple(inputs[0].shape), tuple(outputs[0].shape)
    sample_shape = in_shape[1:]
    if not sample_shape or any(d is None for d in sample_shape):
        raise ModelError(f"the model input shape {in_shape} must be fixed apart from the batch dimension")
    if len(out_shape) != 2 or out_shape[1] is None or out_shape[1] < 2:
        raise ModelError(
            f"expected a classifier whose output is (batch, classes) with 2 or more classes, got {out_shape}"
        )
    if not _is_float_dtype(inputs[0].dtype):
        raise ModelError(f"expected a float model input, got {inputs[0].dtype}")
    return tuple(int(d) for d in sample_shape), int(out_shape[1])


def _is_float_dtype(dtype: Any) -> bool:
    name = getattr(dtype, "name", dtype)
    return str(name) in ("float16", "bfloat16", "float32", "float64")


# -- host accuracy of the float model ---------------------------------------------


def predict_classes(model: Any, evalset: EvalSet) -> np.ndarray:
    """Top-1 class the Keras model itself predicts for every sample of ``evalset``."""
    input_shape, num_classes = model_signature(model)
    check_against_model(evalset, input_shape, num_classes)
    try:
        scores = model.predict(evalset.x, batch_size=_PREDICT_BATCH, verbose=0)
    except Exception as exc:  # Keras wraps TensorFlow op errors in many types
        raise ModelError(f"the Keras model failed to run on the evaluation set: {one_line(exc)}") from exc
    predicted: np.ndarray = np.argmax(np.asarray(scores), axis=-1)
    return predicted


def predict_accuracy(model: Any, evalset: EvalSet) -> float:
    """Top-1 accuracy of the Keras model itself on ``evalset``."""
    return float(np.mean(predict_classes(model, evalset) == evalset.y))


# -- conversion ------------------------------------------------------------------


def convert(
    model: Any, quantization: Quantization, representative_x: np.ndarray, *, sparse_encoding: bool = False
) -> bytes:
    """The ``.tflite`` flatbuffer of a Keras ``model`` under ``quantization``.

    ``representative_x`` (float samples shaped like the model input, without
    the batch dimension) calibrates activation ranges for the integer schemes,
    taking up to ``REPRESENTATIVE_SAMPLES`` evenly spread samples.
    """
    tf = import_tensorflow()
    input_shape, _ = model_signature(model)
    return _convert(tf.lite.TFLiteConverter.from_keras_model(model), quantization, representative_x, input_shape,
                    sparse_encoding)


def export_for_conversion(model: Any, directory: Path) -> Path:
    """The model's inference call (``training=False``) as a SavedModel in ``directory``: what
    ``TFLiteConverter.from_keras_model`` exports to a temporary directory on every call, done once, so that
    every quantization of one model converts from the same export (``convert_saved_model``)."""
    tf, keras = import_tensorflow(), import_keras()
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [tf.TensorSpec(x.shape, dtype=x.dtype, name=x.name) for x in model.inputs]
    archive.add_endpoint("serve", functools.partial(model.__call__, training=False), signature)
    try:
        with _quiet_conversion(keras):
            archive.write_out(str(directory))
    except Exception as exc:  # TensorFlow tracing errors of every kind
        raise ModelError(f"cannot export the model for conversion: {one_line(exc)}") from exc
    return directory


def convert_saved_model(
    directory: Path, input_shape: tuple[int, ...], quantization: Quantization, representative_x: np.ndarray,
    *, sparse_encoding: bool = False,
) -> bytes:
    """The ``.tflite`` flatbuffer of a TensorFlow SavedModel directory (its serving signature)."""
    tf = import_tensorflow()
    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(directory))
    except Exception as exc:  # OSError, ValueError, ... for a directory that is not a SavedModel
        raise UserInputError(f"{directory.name} is not a TensorFlow SavedModel: {one_line(exc)}") from exc
    return _convert(converter, quantization, representative_x, input_shape, sparse_encoding)


def _convert(
    converter: Any, quantization: Quantization, representative_x: np.ndarray, input_shape: tuple[int, ...],
    sparse_encoding: bool,
) -> bytes:
    tf = import_tensorflow()
    if quantization is Quantization.PREBUILT:
        raise UserInputError("a prebuilt .tflite model is shipped as it is; it cannot be converted again")
    if quantization is not Quantization.FLOAT32:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if sparse_encoding:  # store pruned weights in a sparse format: smaller files, if the runtime delegates them
        converter.optimizations = [*converter.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    if quantization is Quantization.FLOAT16:
        converter.target_spec.supported_types = [tf.float16]
    elif quantization.needs_representative_data:
        samples = representative_samples(representative_x, input_shape)
        converter.representative_dataset = lambda: ([sample[np.newaxis, ...]] for sample in samples)
        if quantization is Quantization.INT16X8:
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
            ]
        else:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if quantization is Quantization.INT8:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        with _quiet_conversion(import_keras()):
            flatbuffer = converter.convert()
    except Exception as exc:  # ConverterError, ValueError, RuntimeError, ... from the MLIR converter
        raise ModelError(f"TFLite conversion to {quantization.value} failed: {one_line(exc)}") from exc
    logger.debug("converted to %s: %d bytes", quantization.value, len(flatbuffer))
    return bytes(flatbuffer)


def representative_samples(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    """Up to ``REPRESENTATIVE_SAMPLES`` float32 samples spread evenly over ``x``."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        raise UserInputError("int8 quantization needs representative samples, but none were given")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise UserInputError(
            f"representative samples have shape {tuple(x.shape[1:])} but the model expects {tuple(input_shape)}"
        )
    index = np.unique(np.linspace(0, len(x) - 1, num=min(len(x), REPRESENTATIVE_SAMPLES)).round().astype(int))
    picked: np.ndarray = x[index]
    return picked


@contextmanager
def _quiet_conversion(keras: ModuleType) -> Iterator[None]:
    """Send Keras' "Saved artifact at ..." listing to the log instead of stdout, and drop one harmless warning.

    Interactive logging is a thread-local Keras setting, so other threads keep theirs.
    """
    interactive = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        with warnings.catch_warnings():
            # int8 input/output without input statistics: expected, the representative dataset sets the range.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            yield
    finally:
        if interactive:
            keras.config.enable_interactive_logging()


