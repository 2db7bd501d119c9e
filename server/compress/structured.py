"""Neuron and filter pruning: remove the least important units of Dense layers and filters of convolutions.

Weight pruning (``prune:``, ``server.compress.pruning``) zeroes weights and keeps the network's shape;
this removes whole output units, so the layers themselves get narrower: fewer parameters, a smaller file
at any quantization, less work per inference.

Removing output unit ``j`` of a layer also removes what depends on it downstream. From each Dense or
convolution the model's graph is followed through layers that keep channels apart (batch normalisation,
activations, dropout, pooling, padding, depthwise convolution, Flatten) to the layers that consume the
channels (the next Dense or convolution), whose inputs are cut to match. A layer is left as it is, with
the reason in the report, when its channels reach something that ties them to other tensors or to the
outside: a residual ``Add``, a ``Concatenate``, a reshape, a model output (the class count must stay),
or any layer not known to be safe.

Importance of a unit is data-driven: its mean absolute activation on training samples (as the consuming
layer sees it: after the batch norm and activation that follow) times the L2 norm of the weights that
read it downstream. A unit that never fires, or whose output nobody weighs, goes first. Every layer loses
the same fraction (at least one unit stays), then the narrower model is fine-tuned.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.compress.convert import import_keras, model_signature
from server.compress.evalset import EvalSet, check_against_model
from shared.errors import ModelError, UserInputError

logger = logging.getLogger(__name__)

PRODUCERS = frozenset({"Dense", "Conv1D", "Conv2D", "Conv3D"})  # kernel (..., inputs, outputs)
# Layers whose output channel c depends on input channel c alone (and, for those with weights, on per-channel
# weights only): a removed channel simply disappears through them.
CHANNELWISE = frozenset({
    "BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "MaxPooling1D",
    "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D",
    "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D", "DepthwiseConv2D",
    "DepthwiseConv1D",
})
IMPORTANCE_SAMPLES = 512


@dataclass
class UnitGroup:
    """One prunable layer's output units and every layer that must follow when some are removed."""

    producer: str
    units: int
    followers: list[str] = field(default_factory=list)  # channel-wise layers its channels pass through
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (layer, positions per channel: Flatten)
    tap: str = ""  # the layer whose output the consumers read (after batch norm and activation)
    keep: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class UnitPruneResult:
    model: Any
    params_before: int
    params_after: int
    units: dict[str, str]  # layer -> "kept/was"
    untouched: dict[str, str]  # layer -> why its units stay


def prune_units(model: Any, train: EvalSet, *, fraction: float, epochs: int = 3, seed: int = 0) -> UnitPruneResult:
    """A narrower copy of ``model`` without ``fraction`` of each prunable layer's units, fine-tuned on
    ``train`` for ``epochs``. ``model`` itself is not changed."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UserInputError(f"the fraction of units to remove must be between 0 and 1 (exclusive), got {fraction!r}")
    if len(train) == 0:
        raise UserInputError("neuron/filter pruning needs training samples, but the training set is empty")
    check_against_model(train, *model_signature(model))
    groups, untouched = plan_groups(model)
    if not groups:
        reasons = "; ".join(f"{name}: {why}" for name, why in untouched.items()) or "it has no Dense or convolution"
        raise UserInputError(f"no layer of {model.name} can lose units ({reasons})")
    _rank(model, groups, train, fraction, seed)
    narrow = _narrow_copy(model, groups)
    from server.compress.lowrank import fine_tune

    fine_tune(narrow, train, epochs=epochs, seed=seed)
    result = UnitPruneResult(
        model=narrow, params_before=int(model.count_params()), params_after=int(narrow.count_params()),
        units={g.producer: f"{len(g.keep)}/{g.units}" for g in groups}, untouched=untouched,
    )
    logger.info("removed units from %s: %d -> %d parameters (%s); left as they are: %s", model.name,
                result.params_before, result.params_after, ", ".join(f"{k} {v}" for k, v in result.units.items()),
                ", ".join(untouched) or "none")
    return result


# -- the graph -------------------------------------------------------------------------------------


def layer_graph(model: Any) -> tuple[dict[str, Any], dict[str, list[str]], set[str]]:
    """(layers by name, consumers of each layer's output by name, the layers whose output leaves the model)."""
    keras = import_keras()
    layers = {layer.name: layer for layer in model.layers}
    consumers: dict[str, list[str]] = {name: [] for name in layers}
    if isinstance(model, keras.Sequential):
        names = [layer.name for layer in model.layers]
        for before, after in itertools.pairwise(names):
            consumers[before].append(after)
        return layers, consumers, {names[-1]}
    config = model.get_config()
    for layer_config in config["layers"]:
        for parent in _parents(layer_config.get("inbound_nodes", [])):
            if parent in consumers and layer_config["name"] not in consumers[parent]:
                consumers[parent].append(layer_config["name"])
    outputs = {entry[0] for entry in _history_entries(config.get("output_layers", []))}
    return layers, consumers, outputs


def _parents(nodes: Any) -> Iterator[str]:
    """Layer names in a serialized layer's inbound nodes (their ``keras_history``), at any depth."""
    if isinstance(nodes, dict):
        history = nodes.get("config", {}).get("keras_history") if nodes.get("class_name") == "__keras_tensor__" else None
        if history:
            yield history[0]
            return
        for value in nodes.values():
            yield from _parents(value)
    elif isinstance(nodes, (list, tuple)):
        for value in nodes:
            yield from _parents(value)


def _history_entries(value: Any) -> Iterator[list[Any]]:
    """``output_layers`` is ``[name, node, tensor]`` for one output, or a list of them."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _history_entries(item)


def plan_groups(model: Any) -> tuple[list[UnitGroup], dict[str, str]]:
    """The layers that can lose units, each with what follows it; and the others with why they cannot."""
    keras = import_keras()
    layers, consumers, outputs = layer_graph(model)
    groups: list[UnitGroup] = []
    untouched: dict[str, str] = {}
    for name, layer in layers.items():
        kind = type(layer).__name__
        if isinstance(layer, keras.Model):
            continue
        if kind not in PRODUCERS:
            continue
        if getattr(layer, "groups", 1) != 1:
            untouched[name] = "grouped convolution"
            continue
        group = UnitGroup(producer=name, units=int(layer.get_weights()[0].shape[-1]), tap=name)
        why = _follow(group, name, layers, consumers, outputs)
        if why is None and not group.consumers:
            why = "nothing reads its units"
        if why is None:
            groups.append(group)
        else:
            untouched[name] = why
    return groups, untouched


def _follow(group: UnitGroup, start: str, layers: dict[str, Any], consumers: dict[str, list[str]],
            outputs: set[str]) -> str | None:
    """Walk from ``start`` to the layers that consume its channels; returns why the group cannot be cut."""
    keras = import_keras()
    frontier = [(start, 1)]
    channelwise_chain = True
    while frontier:
        name, positions = frontier.pop()
        if name in outputs:
            return "its units are the model's output" if name == group.producer else f"reaches the output via {name}"
        nexts = consumers.get(name, [])
        if len(nexts) > 1:
            channelwise_chain = False  # the tap must be what every consumer reads
        for after in nexts:
            layer = layers[after]
            kind = type(layer).__name__
            if isinstance(layer, keras.Model):
                return f"feeds the nested model {after}"
            if kind in PRODUCERS:
                if getattr(layer, "groups", 1) != 1:
                    return f"feeds the grouped convolution {after}"
                group.consumers.append((after, positions))
            elif kind in CHANNELWISE:
                if kind.startswith("Depthwise") and getattr(layer, "depth_multiplier", 1) != 1:
                    return f"feeds {after}, a depthwise convolution with a depth multiplier"
                if kind == "BatchNormalization" and (positions > 1 or not _normalizes_channels(layer)):
                    return f"feeds {after}, a batch norm over another axis"
                group.followers.append(after)
                if channelwise_chain:
                    group.tap = after
                frontier.append((after, positions))
            elif kind == "Flatten":
                shape = _input_shape(layer)  # (batch, ..., channels): channels vary fastest once flattened
                if shape is None:
                    return f"feeds {after}, a Flatten used more than once"
                group.followers.append(after)
                frontier.append((after, positions * math.prod(int(d) for d in shape[1:-1])))
            elif kind in ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"):
                return f"feeds the {kind.lower()} {after} (a residual or merge)"
            elif kind == "Concatenate":
                return f"feeds the concatenation {after}"
            else:
                return f"feeds {after} ({kind}), which edgefleet cannot narrow"
    return None


def _input_shape(layer: Any) -> tuple[Any, ...] | None:
    """The layer's input shape; None for a layer called on several inputs (a shared layer)."""
    try:
        return tuple(layer.input.shape)
    except (AttributeError, ValueError):
        return None


def _normalizes_channels(layer: Any) -> bool:
    shape = _input_shape(layer)
    axis = getattr(layer, "axis", -1)
    axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
    return shape is not None and isinstance(axis, int) and axis in (-1, len(shape) - 1)


# -- ranking ---------------------------------------------------------------------------------------


def _rank(model: Any, groups: list[UnitGroup], train: EvalSet, fraction: float, seed: int) -> None:
    """Set each group's ``keep``: the most important units, in their original order."""
    keras = import_keras()
    rng = np.random.default_rng(seed)
    sample = train.x[rng.permutation(len(train))[:IMPORTANCE_SAMPLES]]
    taps = list(dict.fromkeys(g.tap for g in groups))
    probe = keras.Model(model.inputs, [model.get_layer(t).output for t in taps])
    activations = probe.predict(sample, verbose=0, batch_size=128)
    if len(taps) == 1:
        activations = [activations]
    by_tap = dict(zip(taps, activations, strict=True))
    for group in groups:
        mean_abs = np.mean(np.abs(by_tap[group.tap]).reshape(-1, group.units), axis=0)
        outgoing = np.zeros(group.units)
        for consumer, positions in group.consumers:
            kernel = model.get_layer(consumer).get_weights()[0]
            if positions > 1:  # Dense after Flatten: rows are (position, channel), channels fastest
                outgoing += np.sum(kernel.reshape(positions, group.units, kernel.shape[-1]) ** 2, axis=(0, 2))
            else:
                outgoing += np.sum(kernel**2, axis=tuple(i for i in range(kernel.ndim) if i != kernel.ndim - 2))
        importance = mean_abs * np.sqrt(outgoing)
        keep = max(1, round(group.units * (1 - fraction)))
        group.keep = sorted(np.argsort(-importance, kind="stable")[:keep].tolist())


# -- the narrower model ----------------------------------------------------------------------------


def _narrow_copy(model: Any, groups: list[UnitGroup]) -> Any:
    keras = import_keras()
    width = {g.producer: len(g.keep) for g in groups}

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if layer.name in width:
            config["units" if "units" in config else "filters"] = width[layer.name]
        return type(layer).from_config(config)

    narrow = keras.models.clone_model(model, clone_function=clone)
    out_keep = {g.producer: g.keep for g in groups}
    channel_keep = {follower: g.keep for g in groups for follower in g.followers}
    in_keep: dict[str, np.ndarray] = {}
    for group in groups:
        for consumer, positions in group.consumers:
            keep = np.asarray(group.keep)
            in_keep[consumer] = (np.arange(positions)[:, None] * group.units + keep[None, :]).reshape(-1)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        name = layer.name
        if name in out_keep or name in in_keep:
            kernel = weights[0]
            if name in in_keep:
                kernel = np.take(kernel, in_keep[name], axis=kernel.ndim - 2)
            if name in out_keep:
                kernel = np.take(kernel, out_keep[name], axis=kernel.ndim - 1)
                weights = [kernel, *(w[out_keep[name]] if w.ndim == 1 else w for w in weights[1:])]
            else:
                weights = [kernel, *weights[1:]]
        elif name in channel_keep:  # 1-D weights are per channel (batch norm, bias); a depthwise kernel's
            keep = channel_keep[name]  # channels are its second last axis
            weights = [w[keep] if w.ndim == 1 else np.take(w, keep, axis=w.ndim - 2) for w in weights]
        try:
            narrow.get_layer(name).set_weights(weights)
        except ValueError as exc:
            raise ModelError(f"removing units left {name}'s weights inconsistent: {exc}") from exc
    return narrow

