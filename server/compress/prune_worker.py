"""Magnitude pruning with tensorflow-model-optimization, run as a child process.

``python -m server.compress.prune_worker`` reads one JSON request on stdin::

    {"model_path": ".../model.keras", "train_path": ".../train.npz",
     "validation_path": ".../val.npz" | null, "output_path": ".../weights.npz",
     "sparsity": 0.5, "structured_2_4": false, "epochs": 2, "batch_size": 32,
     "seed": 0, "learning_rate": 0.001}

and prints one JSON line: ``{"ok": true, "zero_fraction": ..., "layers_pruned": ...,
"val_accuracy": ... | null}`` or ``{"ok": false, "kind": "model" | "user_input",
"error": "<one line>"}``. The pruned weights are written to ``output_path`` as an
``.npz`` of the arrays of the *Keras 3* model's ``get_weights()``, in that order.

tfmot prunes tf-keras (Keras 2) models only, so this is the one module that
imports ``tensorflow_model_optimization`` and ``tf_keras``, and it must never be
imported by the server process: ``TF_USE_LEGACY_KERAS=1`` has to be set before
TensorFlow is imported, which only a fresh process can guarantee.

The Keras 3 model is loaded with Keras 3 (safe mode) and rebuilt layer by layer
in tf-keras: the graph comes from the model's config (``inbound_nodes``), each
layer from its class name and a translated config, the weights from the Keras 3
layer objects. Neither ``tf_keras.models.model_from_json`` nor a legacy ``.h5``
can read a Keras 3 config (``InputLayer(batch_shape=...)``, dtype policies,
node format), and the ``.keras`` weight file names layers by class counters, not
by their names. The rebuild must reproduce the Keras 3 outputs on training
samples, and the pruned weights, copied back into the Keras 3 model, must
reproduce the pruned tf-keras outputs; either mismatch is an error.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import traceback
import zipfile
from typing import Any

import numpy as np

from server.compress.evalset import are_probabilities
from server.compress.pruning import PRUNABLE_KERNELS
from shared.errors import one_line
from shared.startup_noise import set_environment

logger = logging.getLogger(__name__)

# Built-in Keras layers the rebuild supports, by class name. Others (Lambda, custom
# layers, RNNs, attention, preprocessing) are refused before anything is loaded.
REBUILDABLE_LAYERS = frozenset(
    name
    for group in (
        ("InputLayer", "Dense", "Conv1D", "Conv2D", "Conv2DTranspose", "DepthwiseConv2D", "SeparableConv2D"),
        ("BatchNormalization", "LayerNormalization", "Dropout", "SpatialDropout2D"),
        ("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D"),
        ("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D"),
        ("Flatten", "Reshape", "Permute", "ZeroPadding2D", "Cropping2D", "UpSampling2D", "Rescaling"),
        ("ReLU", "LeakyReLU", "ELU", "Softmax", "Activation"),
        ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate"),
    )
    for name in group
)
_NESTED_MODELS = frozenset({"Functional", "Sequential", "Model"})
# Layers whose kernel is pruned: PRUNABLE_KERNELS, shared with the main process (which imports no TensorFlow
# at module level either); the others are copied as they are.
_RENAMED_OPTIONS = {"LeakyReLU": {"negative_slope": "alpha"}}
_BASE_LAYER_OPTIONS = frozenset({"name", "trainable", "dtype", "activity_regularizer"})
_REFERENCE_SAMPLES = 16
_RAMP_FRACTION = 0.7  # the target sparsity is reached after this share of the steps; the rest recovers
_MASK_UPDATES = 10
_REQUEST_TYPES: dict[str, tuple[type, ...]] = {
    "model_path": (str,),
    "train_path": (str,),
    "validation_path": (str, type(None)),
    "output_path": (str,),
    "sparsity": (float, int),
    "structured_2_4": (bool,),
    "epochs": (int,),
    "batch_size": (int,),
    "seed": (int,),
    "learning_rate": (float, int),
}


class PruneFailure(Exception):
    """An expected failure, reported as ``{"ok": false}``; ``kind`` is "model" or "user_input"."""

    def __init__(self, message: str, kind: str = "model") -> None:
        super().__init__(message)
        self.kind = kind


# -- entry point ---------------------------------------------------------------------------


def main() -> int:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    set_environment()  # quiet TensorFlow's C++ logs, as in the parent (whose environment wins)
    result_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from TensorFlow or Keras go to stderr; stdout carries the result only
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(relativeCreated)6.0f ms %(message)s")
    try:
        result = {"ok": True, **prune(parse_request(sys.stdin.read()))}
    except PruneFailure as exc:
        result = {"ok": False, "kind": exc.kind, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a bug or a broken environment: one line out, the traceback to stderr
        traceback.print_exc()
        result = {"ok": False, "kind": "model", "error": f"pruning failed: {type(exc).__name__}: {one_line(exc)}"}
    os.write(result_fd, (json.dumps(result) + "\n").encode())
    os.close(result_fd)
    return 0 if result["ok"] else 1


def parse_request(text: str) -> dict[str, Any]:
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise PruneFailure(f"the pruning request is not JSON: {exc}", "user_input") from exc
    if not isinstance(request, dict):
        raise PruneFailure("the pruning request must be a JSON object", "user_input")
    unknown = sorted(set(request) - set(_REQUEST_TYPES))
    missing = sorted(set(_REQUEST_TYPES) - set(request))
    if unknown or missing:
        raise PruneFailure(f"bad pruning request: unknown keys {unknown}, missing keys {missing}", "user_input")
    for key, types in _REQUEST_TYPES.items():
        value = request[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise PruneFailure(f"bad pruning request: {key} = {value!r}", "user_input")
    if not 0 < request["sparsity"] < 1:
        raise PruneFailure(f"sparsity must be between 0 and 1 (exclusive), got {request['sparsity']}", "user_input")
    if request["epochs"] < 1 or request["batch_size"] < 1 or request["learning_rate"] <= 0:
        raise PruneFailure("epochs, batch_size and learning_rate must be positive", "user_input")
    return request


# -- the pruning run -----------------------------------------------------------------------


def prune(request: dict[str, Any]) -> dict[str, Any]:
    """Rebuild, prune and fine-tune the model; write the pruned Keras 3 weights; return the report fields."""
    check_rebuildable(read_model_config(request["model_path"]))
    x, y = _load_npz(request["train_path"])
    validation = _load_npz(request["validation_path"]) if request["validation_path"] else None

    import keras

    try:
        source = keras.saving.load_model(request["model_path"], compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for models it cannot load
        raise PruneFailure(f"cannot load the model for pruning: {one_line(exc)}") from exc
    reference_x = x[:_REFERENCE_SAMPLES]
    expected = _outputs(source, reference_x)
    pairs: list[tuple[Any, Any]] = []
    model = rebuild(source, pairs)
    for source_layer, layer in pairs:
        try:
            layer.set_weights(source_layer.get_weights())
        except ValueError as exc:
            raise PruneFailure(f"the weights of layer {layer.name!r} do not fit its tf-keras rebuild") from exc
    _check_same_outputs(expected, _outputs(model, reference_x), "the tf-keras rebuild")
    logger.info("rebuilt %s in tf-keras: %d layers with weights", source.name, len(pairs))

    pruned_layers = [layer for _, layer in pairs if type(layer).__name__ in PRUNABLE_KERNELS]
    if not pruned_layers:
        raise PruneFailure("the model has no Dense or convolution layer to prune")
    if request["structured_2_4"]:
        for layer in pruned_layers:
            if len(_kernel(layer).shape) not in (2, 4):
                raise PruneFailure(
                    f"2:4 structured pruning needs 2-D or 4-D kernels; layer {layer.name!r} "
                    f"({type(layer).__name__}) has a {len(_kernel(layer).shape)}-D kernel"
                )
    stripped = fine_tune(model, x, y, request, from_logits=not are_probabilities(expected))

    # tfmot wraps and strips the layer objects it was given, so they hold the pruned weights.
    for source_layer, layer in pairs:
        source_layer.set_weights(layer.get_weights())
    _check_same_outputs(
        _outputs(stripped, reference_x), _outputs(source, reference_x), "the Keras 3 model with the pruned weights"
    )
    kernels = [np.asarray(_kernel(layer)) for layer in pruned_layers]
    zeros = sum(int(np.count_nonzero(kernel == 0)) for kernel in kernels)
    total = sum(kernel.size for kernel in kernels)
    val_accuracy = None
    if validation is not None:
        scores = np.asarray(stripped.predict(validation[0], batch_size=256, verbose=0))
        val_accuracy = float(np.mean(np.argmax(scores, axis=-1) == validation[1]))
    np.savez(request["output_path"], *source.get_weights())
    logger.info("wrote the pruned weights: %d of %d kernel weights are zero", zeros, total)
    return {"zero_fraction": zeros / total, "layers_pruned": len(pruned_layers), "val_accuracy": val_accuracy}


def fine_tune(model: Any, x: np.ndarray, y: np.ndarray, request: dict[str, Any], *, from_logits: bool) -> Any:
    """Prune the tf-keras ``model`` while training it on ``(x, y)``; the model with the wrappers stripped."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    sparsity_api = tfmot.sparsity.keras
    steps = request["epochs"] * math.ceil(len(x) / request["batch_size"])
    if request["structured_2_4"]:
        # m_by_n ignores the schedule's sparsity: tfmot computes the 2:4 mask once, at step 1, and keeps it.
        params: dict[str, Any] = {
            "pruning_schedule": sparsity_api.ConstantSparsity(0.5, begin_step=0, frequency=1),
            "sparsity_m_by_n": (2, 4),
        }
    else:
        # Masks are updated every `frequency` steps; the last update, at end_step, reaches the target.
        frequency = max(1, round(steps * _RAMP_FRACTION / _MASK_UPDATES))
        end_step = frequency * max(1, int(steps * _RAMP_FRACTION) // frequency)
        params = {
            "pruning_schedule": sparsity_api.PolynomialDecay(
                initial_sparsity=0.0,
                final_sparsity=float(request["sparsity"]),
                begin_step=0,
                end_step=end_step,
                frequency=frequency,
            )
        }

    class KernelLayersOnly(sparsity_api.PruningPolicy):  # type: ignore[misc, name-defined]
        """Wrap the layers with a prunable kernel; leave the rest (BatchNorm, pooling, ...) as they are."""

        def allow_pruning(self, layer: Any) -> bool:
            return type(layer).__name__ in PRUNABLE_KERNELS

        def ensure_model_supports_pruning(self, model: Any) -> None:
            return None

    tf_keras.utils.set_random_seed(request["seed"])
    wrapped = sparsity_api.prune_low_magnitude(model, pruning_policy=KernelLayersOnly(), **params)
    wrapped.compile(
        optimizer=tf_keras.optimizers.Adam(learning_rate=float(request["learning_rate"])),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
    )
    wrapped.fit(
        x,
        y,
        epochs=request["epochs"],
        batch_size=request["batch_size"],
        shuffle=True,
        verbose=0,
        callbacks=[sparsity_api.UpdatePruningStep()],
    )
    logger.info("fine-tuned %d steps (from_logits=%s)", steps, from_logits)
    return sparsity_api.strip_pruning(wrapped)


# -- reading and checking the model ----------------------------------------------------------


def read_model_config(path: str) -> dict[str, Any]:
    """The ``config.json`` of a ``.keras`` archive, read without running any of its code."""
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise PruneFailure(f"{os.path.basename(path)} is not a readable .keras model: {one_line(exc)}") from exc
    if not isinstance(config, dict):
        raise PruneFailure(f"{os.path.basename(path)} has no model config")
    return config


def check_rebuildable(config: dict[str, Any]) -> None:
    """Raise ``PruneFailure`` naming every layer the tf-keras rebuild does not support."""
    refused: list[str] = []
    _collect_refused(config, refused)
    if refused:
        shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
        raise PruneFailure(
            f"cannot prune this model: pruning does not support {shown}; "
            f"supported layers: {', '.join(sorted(REBUILDABLE_LAYERS - {'InputLayer'}))}"
        )


def _collect_refused(config: dict[str, Any], refused: list[str]) -> None:
    layers = (config.get("config") or {}).get("layers") or []
    for layer in layers:
        class_name = str(layer.get("class_name"))
        name = (layer.get("config") or {}).get("name") or layer.get("name") or "?"
        builtin = str(layer.get("module") or "").startswith("keras") and not layer.get("registered_name")
        if class_name in _NESTED_MODELS and builtin:
            _collect_refused(layer, refused)
        elif not builtin:
            refused.append(f"layer {name!r} (custom class {class_name})")
        elif class_name not in REBUILDABLE_LAYERS:
            refused.append(f"layer {name!r} ({class_name})")


# -- the tf-keras rebuild --------------------------------------------------------------------


def rebuild(source: Any, pairs: list[tuple[Any, Any]]) -> Any:
    """The tf-keras twin of the Keras 3 ``source``; appends (Keras 3 layer, tf-keras layer) pairs to ``pairs``."""
    import keras
    import tensorflow as tf
    import tf_keras

    if isinstance(source, keras.Sequential):
        inputs = tf_keras.Input(batch_shape=tuple(source.inputs[0].shape), dtype=source.inputs[0].dtype)
        outputs = inputs
        for source_layer in source.layers:
            outputs = _twin(source_layer, pairs)(outputs)
        return tf_keras.Model(inputs, outputs, name=source.name)

    config = source.get_config()
    produced: dict[str, list[list[Any]]] = {}  # layer name -> outputs of each node, flattened
    pending: list[tuple[str, Any, list[Any]]] = []  # (layer name, tf-keras callable, its node configs)
    for entry in config["layers"]:
        name = entry["name"]
        if entry["class_name"] == "InputLayer":
            options = entry["config"]
            if options.get("sparse") or options.get("ragged"):
                raise PruneFailure(f"input {name!r} is sparse or ragged, which pruning does not support")
            tensor = tf_keras.Input(batch_shape=tuple(options["batch_shape"]), dtype=options["dtype"], name=name)
            produced[name] = [[tensor]]
        else:
            pending.append((name, _twin(source.get_layer(name), pairs), list(entry["inbound_nodes"])))
    while pending:
        progress = False
        for item in list(pending):
            name, layer, nodes = item
            node = nodes[0]
            if not _ready(node, produced):
                continue
            args = _resolve(node.get("args", []), produced)
            kwargs = _resolve(node.get("kwargs", {}), produced)
            produced.setdefault(name, []).append(tf.nest.flatten(layer(*args, **kwargs)))
            nodes.pop(0)
            if not nodes:
                pending.remove(item)
            progress = True
        if not progress:
            raise PruneFailure(f"cannot rebuild the layer graph of model {source.name!r} in tf-keras")

    def tensors(spec: Any) -> list[Any]:
        specs = [spec] if spec and isinstance(spec[0], str) else spec
        return [produced[name][node][index] for name, node, index in specs]

    inputs, outputs = tensors(config["input_layers"]), tensors(config["output_layers"])
    return tf_keras.Model(
        inputs[0] if len(inputs) == 1 else inputs, outputs[0] if len(outputs) == 1 else outputs, name=source.name
    )


def _ready(spec: Any, produced: dict[str, list[list[Any]]]) -> bool:
    if isinstance(spec, dict) and spec.get("class_name") == "__keras_tensor__":
        name, node, _ = spec["config"]["keras_history"]
        return len(produced.get(name, [])) > int(node)
    if isinstance(spec, dict):
        return all(_ready(value, produced) for value in spec.values())
    if isinstance(spec, (list, tuple)):
        return all(_ready(value, produced) for value in spec)
    return True


def _resolve(spec: Any, produced: dict[str, list[list[Any]]]) -> Any:
    if isinstance(spec, dict) and spec.get("class_name") == "__keras_tensor__":
        name, node, index = spec["config"]["keras_history"]
        return produced[name][node][index]
    if isinstance(spec, dict):
        return {key: _resolve(value, produced) for key, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [_resolve(value, produced) for value in spec]
    return spec


def _twin(source_layer: Any, pairs: list[tuple[Any, Any]]) -> Any:
    """A new tf-keras layer (or model) configured like the Keras 3 ``source_layer``."""
    import keras
    import tf_keras

    if isinstance(source_layer, keras.Model):
        return rebuild(source_layer, pairs)
    class_name = type(source_layer).__name__
    if class_name not in REBUILDABLE_LAYERS or not hasattr(tf_keras.layers, class_name):
        raise PruneFailure(
            f"cannot prune this model: pruning does not support layer {source_layer.name!r} ({class_name})"
        )
    layer_class = getattr(tf_keras.layers, class_name)
    layer = layer_class(**_translate(source_layer.name, class_name, source_layer.get_config(), layer_class))
    pairs.append((source_layer, layer))
    return layer


def _translate(name: str, class_name: str, config: dict[str, Any], layer_class: type) -> dict[str, Any]:
    """Keras 3 layer options as tf-keras constructor arguments; an option tf-keras lacks must be unset."""
    import tf_keras

    accepted = _constructor_options(layer_class)
    renamed = _RENAMED_OPTIONS.get(class_name, {})
    options: dict[str, Any] = {}
    for key, value in config.items():
        key = renamed.get(key, key)
        if key.endswith("_initializer"):
            continue  # the weights are copied over
        if key == "dtype" and isinstance(value, dict):
            value = value["config"]["name"]  # a DTypePolicy
        elif key == "activation":
            if not isinstance(value, str):
                raise PruneFailure(f"layer {name!r} has a custom activation, which pruning does not support")
            try:
                tf_keras.activations.get(value)
            except ValueError as exc:
                raise PruneFailure(f"layer {name!r}: tf-keras has no activation {value!r}") from exc
        elif key.endswith(("_regularizer", "_constraint")) and value is not None:
            module = tf_keras.regularizers if key.endswith("_regularizer") else tf_keras.constraints
            try:
                value = module.get({"class_name": value["class_name"], "config": value["config"]})
            except (KeyError, TypeError, ValueError) as exc:
                raise PruneFailure(f"layer {name!r}: tf-keras cannot rebuild its {key}") from exc
        if key not in accepted:
            if value is None or value is False:
                continue  # a Keras 3 option (lora_rank, quantization_config, ...) left at its default
            raise PruneFailure(f"layer {name!r} ({class_name}) sets {key}={value!r}, which tf-keras does not support")
        options[key] = value
    return options


def _constructor_options(layer_class: type) -> frozenset[str]:
    names = set(_BASE_LAYER_OPTIONS)
    for cls in layer_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(
                p.name for p in inspect.signature(init).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD
            )
    names.discard("self")
    return frozenset(names)


# -- helpers ---------------------------------------------------------------------------------


def _outputs(model: Any, x: np.ndarray) -> np.ndarray:
    """Inference outputs of a few samples, eagerly (``predict`` would trace a graph for them)."""
    return np.asarray(model(x, training=False))


def _kernel(layer: Any) -> Any:
    return getattr(layer, PRUNABLE_KERNELS[type(layer).__name__])


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["x"].astype(np.float32), archive["y"].astype(np.int64)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise PruneFailure(f"cannot read {os.path.basename(path)}: {one_line(exc)}", "user_input") from exc


def _check_same_outputs(expected: np.ndarray, actual: np.ndarray, what: str) -> None:
    if expected.shape != actual.shape or not np.allclose(expected, actual, rtol=1e-3, atol=1e-4):
        difference = float(np.max(np.abs(expected - actual))) if expected.shape == actual.shape else math.inf
        raise PruneFailure(f"{what} does not reproduce the model's outputs (largest difference {difference:.3g})")


if __name__ == "__main__":
    sys.exit(main())
