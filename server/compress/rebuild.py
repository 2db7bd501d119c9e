"""A Keras model rebuilt with some layers replaced by a sequence of others (none: the layer is dropped).

Low-rank factorisation replaces a Dense by two; batch-norm folding replaces a convolution by one with a
bias and drops the batch norm after it. The caller sets the weights afterwards: every other layer of the
rebuilt model has the original's name, and gets its weights copied by ``copy_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from server.compress.convert import import_keras
from server.compress.distill import rebuildable_kind
from shared.errors import UserInputError


def rebuilt(model: Any, replacements: Mapping[str, Sequence[Any]], action: str) -> Any:
    """``model`` with each layer named in ``replacements`` swapped for its sequence of new layers."""
    keras = import_keras()
    kind = rebuildable_kind(model, action)
    try:
        if kind == "sequential":
            layers: list[Any] = [_input_like(keras, model.inputs[0])]
            for layer in model.layers:
                layers.extend(replacements[layer.name] if layer.name in replacements else [_clone_layer(layer)])
            return keras.Sequential(layers, name=model.name)

        def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
            # ``layer`` is the clone of the original; a replaced layer's clone is never called.
            if layer.name not in replacements:
                return layer(*args, **kwargs)
            sequence = replacements[layer.name]
            if not sequence:
                return args[0]  # dropped: its input goes on
            out = sequence[0](*args, **kwargs)
            for later in sequence[1:]:
                out = later(out)
            return out

        inputs = keras.tree.map_structure(lambda tensor: _input_like(keras, tensor), model.input)
        return keras.models.clone_model(model, input_tensors=inputs, clone_function=_clone_layer,
                                        call_function=call_function)
    except ValueError as exc:  # e.g. a new layer's name is taken
        raise UserInputError(f"cannot {action} {model.name!r}: {exc}") from exc


def copy_weights(source: Any, target: Any, skip: set[str]) -> None:
    """The weights of every layer of ``source`` but those in ``skip`` onto its namesake in ``target``."""
    for layer in source.layers:
        if layer.name not in skip and layer.weights:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def _clone_layer(layer: Any) -> Any:
    return layer.__class__.from_config(layer.get_config())


def _input_like(keras: Any, tensor: Any) -> Any:
    """A new ``keras.Input`` like ``tensor``, named after its input layer (a tensor's own name is generated)."""
    return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=tensor._keras_history.operation.name)
