"""Magnitude pruning of a Keras 3 model, done by a child process.

tensorflow-model-optimization prunes tf-keras (Keras 2) models only, and it
switches TensorFlow to tf-keras (``TF_USE_LEGACY_KERAS=1``) when imported. So
it never enters this process: ``prune_model`` saves the model and the training
samples to a temporary directory, runs ``python -m server.compress.prune_worker``
on them, and sets the pruned weights it writes back on a clone of the model.
The caller's model is not touched.

Pruning zeroes weights but keeps them in the flatbuffer: a pruned float32
``.tflite`` is as large as the unpruned one and only *compresses* better, which
``server.compress.pipeline.gzip_size`` measures.

No TensorFlow here beyond Keras 3 (through ``convert.import_keras``) for saving
and cloning the model.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.compress.child import raise_failure, run_worker
from server.compress.convert import import_keras, model_signature
from server.compress.evalset import EvalSet, check_against_model, write_eval_file
from shared.errors import ModelError, StorageError, UserInputError, one_line
from shared.startup_noise import ALWAYS_ENVIRONMENT, QUIET_ENVIRONMENT

logger = logging.getLogger(__name__)

WORKER_MODULE = "server.compress.prune_worker"
STRUCTURED_2_4_SPARSITY = 0.5
DEFAULT_LEARNING_RATE = 1e-3  # Adam's default, as in tfmot's pruning guide
# The kernels the worker prunes, by layer class (tfmot's registry; DepthwiseConv2D has none).
PRUNABLE_KERNELS = {
    "Dense": "kernel",
    "Conv1D": "kernel",
    "Conv2D": "kernel",
    "Conv2DTranspose": "kernel",
    "SeparableConv2D": "pointwise_kernel",
}
_WORKER_ENVIRONMENT = {"TF_USE_LEGACY_KERAS": "1"}
_WORKER_DEFAULTS = {**ALWAYS_ENVIRONMENT, **QUIET_ENVIRONMENT}  # its stderr goes to the debug log anyway


@dataclass(frozen=True)
class PruneResult:
    model: Any
    """A Keras 3 clone of the input model carrying the pruned weights."""
    zero_fraction: float
    """Share of zeros over the prunable kernels (Dense, convolutions; see ``PRUNABLE_KERNELS``)."""
    layers_pruned: int
    structured_2_4: bool
    val_accuracy: float | None = None
    """Top-1 accuracy of the pruned model on the validation set, when one was given."""


def prune_model(
    model: Any,
    train: EvalSet,
    *,
    sparsity: float,
    structured_2_4: bool = False,
    epochs: int = 2,
    batch_size: int = 32,
    seed: int = 0,
    validation: EvalSet | None = None,
    timeout: float = 900,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> PruneResult:
    """Prune ``model`` to ``sparsity`` while fine-tuning it on ``train`` for ``epochs``.

    Fine-tuning uses Adam at ``learning_rate`` and sparse categorical
    cross-entropy, on probabilities or logits, whichever the model outputs.
    Unstructured pruning raises the sparsity of every Dense and convolution
    kernel from 0 to ``sparsity`` over the first 70% of the steps (tfmot's
    ``PolynomialDecay``), then fine-tunes at that sparsity. ``structured_2_4``
    (tfmot's ``sparsity_m_by_n=(2, 4)``) instead keeps the 2 largest of every
    4 consecutive input-channel weights, chosen once at the first step, which
    is 50% (``sparsity`` must be 0.5); a trailing partial group keeps at most
    2 too, so a layer with 1 or 2 input channels is not pruned at all.
    DepthwiseConv2D kernels are never pruned (tfmot has no kernel for them).
    """
    _check_options(sparsity, structured_2_4, epochs, batch_size, timeout, learning_rate)
    input_shape, num_classes = model_signature(model)
    if len(train) == 0:
        raise UserInputError("pruning needs training samples, but the training set is empty")
    check_against_model(train, input_shape, num_classes)
    if validation is not None:
        check_against_model(validation, input_shape, num_classes)
    keras = import_keras()
    with tempfile.TemporaryDirectory(prefix="edgefleet-prune-") as tmp:
        folder = Path(tmp)
        model_path = folder / "model.keras"
        try:
            model.save(model_path)
        except OSError as exc:
            raise StorageError(f"cannot write the model for pruning to {model_path}: {exc.strerror or exc}") from exc
        except Exception as exc:  # Keras raises ValueError, TypeError, ... for models it cannot serialize
            raise ModelError(f"cannot save the model for pruning: {one_line(exc)}") from exc
        request = {
            "model_path": os.fspath(model_path),
            "train_path": os.fspath(write_eval_file(train, folder / "train.npz")),
            "validation_path": None,
            "output_path": os.fspath(folder / "pruned.npz"),
            "sparsity": float(sparsity),
            "structured_2_4": structured_2_4,
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "learning_rate": float(learning_rate),
        }
        if validation is not None:
            request["validation_path"] = os.fspath(write_eval_file(validation, folder / "validation.npz"))
        report = _run_worker(request, timeout)
        weights = _read_weights(folder / "pruned.npz")
    pruned = keras.models.clone_model(model)
    try:
        pruned.set_weights(weights)
    except ValueError as exc:
        raise ModelError(f"the pruned weights do not fit the model: {one_line(exc)}") from exc
    zeros = zero_fraction(pruned)
    if not math.isclose(zeros, report["zero_fraction"], abs_tol=1e-6):
        raise ModelError(
            f"the pruning worker reported {report['zero_fraction']:.4f} zeros but the model has {zeros:.4f}"
        )
    logger.info(
        "pruned %s: %.1f%% of the kernel weights in %d layers are zero%s",
        model.name,
        100 * zeros,
        report["layers_pruned"],
        " (2:4 structured)" if structured_2_4 else "",
    )
    return PruneResult(
        model=pruned,
        zero_fraction=zeros,
        layers_pruned=int(report["layers_pruned"]),
        structured_2_4=structured_2_4,
        val_accuracy=report["val_accuracy"],
    )


def zero_fraction(model: Any) -> float:
    """Share of exact zeros over the prunable kernels of a Keras 3 model (0.0 if it has none)."""
    kernels = [np.asarray(kernel) for kernel in prunable_kernels(model)]
    total = sum(kernel.size for kernel in kernels)
    if total == 0:
        return 0.0
    return sum(int(np.count_nonzero(kernel == 0)) for kernel in kernels) / total


def prunable_kernels(model: Any) -> list[Any]:
    """The kernels pruning works on, in layer order, nested models included."""
    keras = import_keras()
    kernels = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            kernels.extend(prunable_kernels(layer))
        elif type(layer).__name__ in PRUNABLE_KERNELS:
            kernels.append(getattr(layer, PRUNABLE_KERNELS[type(layer).__name__]))
    return kernels


# -- helpers ---------------------------------------------------------------------------------


def _check_options(
    sparsity: float, structured_2_4: bool, epochs: int, batch_size: int, timeout: float, learning_rate: float
) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise UserInputError(f"sparsity must be a fraction between 0 and 1 (exclusive), got {sparsity!r}")
    if structured_2_4 and sparsity != STRUCTURED_2_4_SPARSITY:
        raise UserInputError(f"2:4 structured pruning always zeroes half the weights; use sparsity 0.5, not {sparsity}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be a positive whole number, got {value!r}")
    for name, number in (("timeout", timeout), ("learning_rate", learning_rate)):
        if not (isinstance(number, (int, float)) and math.isfinite(number) and number > 0):
            raise UserInputError(f"{name} must be a positive number, got {number!r}")


def _run_worker(request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the worker on ``request``; its ``{"ok": true, ...}`` report, or the error it reported."""
    report = run_worker(sys.executable, WORKER_MODULE, request, timeout=timeout, what="the pruning worker",
                        environment=_WORKER_ENVIRONMENT, defaults=_WORKER_DEFAULTS,
                        timeout_hint="; try fewer epochs or samples")
    raise_failure(report, "the pruning worker")
    fraction, layers, accuracy = report.get("zero_fraction"), report.get("layers_pruned"), report.get("val_accuracy")
    if not (
        isinstance(fraction, float)
        and isinstance(layers, int)
        and (accuracy is None or isinstance(accuracy, (int, float)))
    ):
        raise ModelError(f"the pruning worker returned a malformed report: {report}")
    return report


def _read_weights(path: Path) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return [archive[f"arr_{i}"] for i in range(len(archive.files))]
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"cannot read the pruned weights: {one_line(exc)}") from exc


