"""Batch norms folded into the layer before them, ahead of weight pruning and low-rank factorisation.

At inference a batch norm after a convolution or Dense is a per-channel affine map,
``y = gamma * (x - mean) / sqrt(var + eps) + beta``, which the TFLite converter folds into that layer's
kernel and bias anyway. Folding it *first* matters for the transforms that judge weights by their size:
magnitude pruning drops the smallest ``|w|`` of a layer and a truncated SVD keeps its largest directions,
but the weight the device multiplies by is ``w * gamma / sqrt(var + eps)``, which can differ per output
channel by orders of magnitude. Judged before folding, a channel the batch norm scales up loses weights
that matter, and one it scales down keeps weights that do not.

A batch norm is folded when it normalises the last axis of the output of a Dense, Conv1D, Conv2D or
DepthwiseConv2D with no activation of its own, whose output nothing else reads; any other stays as it is.
The folded model computes the same function (up to float rounding) and has no batch norm to update
while the transform fine-tunes it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from server.compress.rebuild import copy_weights, rebuilt
from server.compress.structured import layer_graph

logger = logging.getLogger(__name__)

FOLDABLE = frozenset({"Dense", "Conv1D", "Conv2D", "DepthwiseConv2D"})


def fold_batch_norms(model: Any) -> tuple[Any, list[str]]:
    """A copy of ``model`` with every foldable batch norm folded, and ``"<layer>+<batch norm>"`` for each; the
    model itself when there is none."""
    pairs = foldable_pairs(model)
    if not pairs:
        return model, []
    replacements: dict[str, list[Any]] = {}
    for producer_name, norm_name in pairs:
        producer = model.get_layer(producer_name)
        replacements[producer_name] = [producer.__class__.from_config({**producer.get_config(), "use_bias": True})]
        replacements[norm_name] = []
    folded = rebuilt(model, replacements, "fold the batch norms of")
    copy_weights(model, folded, skip=set(replacements))
    for producer_name, norm_name in pairs:
        kernel, bias = _folded_weights(model.get_layer(producer_name), model.get_layer(norm_name))
        folded.get_layer(producer_name).set_weights([kernel, bias])
    names = [f"{producer}+{norm}" for producer, norm in pairs]
    logger.info("folded %d batch norms into the layers before them: %s", len(names), ", ".join(names))
    return folded, names


def foldable_pairs(model: Any) -> list[tuple[str, str]]:
    """(layer, batch norm) pairs that ``fold_batch_norms`` folds, in model order."""
    layers, consumers, outputs = layer_graph(model)
    parents: dict[str, list[str]] = {name: [] for name in layers}
    for name, readers in consumers.items():
        for reader in readers:
            parents[reader].append(name)
    pairs = []
    for name, layer in layers.items():
        if type(layer).__name__ != "BatchNormalization" or len(parents[name]) != 1:
            continue
        producer = layers[parents[name][0]]
        if (type(producer).__name__ in FOLDABLE and consumers[producer.name] == [name]
                and producer.name not in outputs and _linear(producer) and _last_axis(layer)):
            pairs.append((producer.name, name))
    return pairs


def _linear(layer: Any) -> bool:
    activation = layer.get_config().get("activation")
    return activation in (None, "linear")


def _last_axis(norm: Any) -> bool:
    axis = norm.axis if isinstance(norm.axis, int) else (norm.axis[0] if len(norm.axis) == 1 else None)
    rank = len(norm.input.shape) if getattr(norm, "input", None) is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _folded_weights(producer: Any, norm: Any) -> tuple[np.ndarray, np.ndarray]:
    values = dict(zip([w.path.split("/")[-1] for w in norm.weights], norm.get_weights(), strict=True))
    mean, variance = np.asarray(values["moving_mean"], np.float64), np.asarray(values["moving_variance"], np.float64)
    weights = producer.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = np.asarray(weights[1], np.float64) if len(weights) > 1 else np.zeros_like(mean)
    gamma = np.asarray(values.get("gamma", np.ones_like(mean)), np.float64)
    beta = np.asarray(values.get("beta", np.zeros_like(mean)), np.float64)
    scale = gamma / np.sqrt(variance + norm.epsilon)
    if type(producer).__name__ == "DepthwiseConv2D":  # output channel i * multiplier + m
        kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    else:
        kernel = kernel * scale
    return kernel.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)
