"""Low-rank factorisation of large Dense layers, and a short fine-tune afterwards.

A Dense kernel ``W`` (in x out) is split by truncated SVD, ``W ~ U_r S_r V_r^T``,
into two Dense layers: ``Dense(r, use_bias=False)`` with kernel
``U_r S_r^(1/2)`` and ``Dense(out, activation, bias)`` with kernel
``S_r^(1/2) V_r^T``; splitting ``S_r`` evenly keeps both factors on the same
scale for fine-tuning. The rank is the smallest whose singular values hold
``energy`` of ``sum(S^2)`` (the squared Frobenius norm), and a layer is only
replaced when ``r * (in + out) < in * out``, i.e. when it saves parameters.

Only top-level, plain ``keras.layers.Dense`` layers are factorised; nested
models are copied as they are. The input model is never changed: the result
is a rebuilt copy whose other layers carry copies of the original weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.compress.convert import import_keras, model_signature
from server.compress.distill import rebuildable_kind
from server.compress.evalset import EvalSet, are_probabilities, check_against_model
from server.compress.rebuild import copy_weights, rebuilt
from shared.errors import UserInputError

logger = logging.getLogger(__name__)

FACTOR_SUFFIX = "_lowrank"
"""The first (in -> r) layer of a factorised Dense is named ``<name>_lowrank``; the second keeps ``<name>``."""


@dataclass(frozen=True)
class LayerRank:
    name: str
    in_dim: int
    out_dim: int
    rank: int
    params_before: int
    """Kernel and bias of the original layer."""
    params_after: int
    """Both factors' kernels and the bias."""


@dataclass(frozen=True)
class LowRankResult:
    model: Any
    replaced: list[LayerRank]


@dataclass(frozen=True)
class _Factors:
    rank: LayerRank
    first: np.ndarray  # (in, r) = U_r S_r^(1/2)
    second: np.ndarray  # (r, out) = S_r^(1/2) V_r^T


def factorize_dense(model: Any, *, energy: float = 0.9, min_params: int = 4096) -> LowRankResult:
    """A copy of ``model`` with every Dense of at least ``min_params`` kernel entries factorised where it pays."""
    keras = import_keras()
    if not 0.0 < energy <= 1.0:
        raise UserInputError(f"the kept energy must be in (0, 1], got {energy}")
    if min_params < 1:
        raise UserInputError(f"min_params must be at least 1, got {min_params}")
    rebuildable_kind(model, "factorise the Dense layers of")  # before the work: a subclassed model cannot be
    model_signature(model)
    plan: dict[str, _Factors] = {}
    for layer in model.layers:
        if type(layer) is not keras.layers.Dense or getattr(layer, "quantization_mode", None):
            continue
        factors = _factorize(layer, energy, min_params)
        if factors is not None:
            plan[layer.name] = factors
    new_layers = {name: _factor_layers(keras, model.get_layer(name), factors) for name, factors in plan.items()}
    factored = rebuilt(model, new_layers, "factorise the Dense layers of")  # e.g. "<dense>_lowrank" is taken
    copy_weights(model, factored, skip=set(plan))
    for name, factors in plan.items():
        first, second = new_layers[name]
        first.set_weights([factors.first])
        second.set_weights([factors.second, *model.get_layer(name).get_weights()[1:]])
    replaced = [factors.rank for factors in plan.values()]
    for rank in replaced:
        logger.info(
            "factorised %s (%dx%d) at rank %d: %d -> %d params",
            rank.name, rank.in_dim, rank.out_dim, rank.rank, rank.params_before, rank.params_after,
        )  # fmt: skip
    return LowRankResult(model=factored, replaced=replaced)


def _factorize(layer: Any, energy: float, min_params: int) -> _Factors | None:
    """The two factors of ``layer``'s kernel at the rank keeping ``energy``, or ``None`` if it stays as it is."""
    kernel = np.asarray(layer.kernel, dtype=np.float64)
    in_dim, out_dim = kernel.shape
    if in_dim * out_dim < min_params:
        return None
    u, s, vt = np.linalg.svd(kernel, full_matrices=False)
    total = float(np.sum(s**2))
    if total == 0.0:
        return None
    cumulative = np.cumsum(s**2) / total
    cumulative[-1] = 1.0  # rounding must not push energy=1.0 past the last singular value
    rank = int(np.searchsorted(cumulative, energy, side="left")) + 1
    if rank * (in_dim + out_dim) >= in_dim * out_dim:
        logger.debug("%s: rank %d for energy %s saves nothing; kept", layer.name, rank, energy)
        return None
    root = np.sqrt(s[:rank])
    bias = out_dim if layer.use_bias else 0
    return _Factors(
        rank=LayerRank(
            name=layer.name,
            in_dim=int(in_dim),
            out_dim=int(out_dim),
            rank=rank,
            params_before=int(in_dim * out_dim + bias),
            params_after=int(rank * (in_dim + out_dim) + bias),
        ),
        first=(u[:, :rank] * root).astype(np.float32),
        second=(root[:, np.newaxis] * vt[:rank]).astype(np.float32),
    )


def _factor_layers(keras: Any, layer: Any, factors: _Factors) -> tuple[Any, Any]:
    """``(Dense(r, linear, no bias), Dense(out, activation, bias))``, configured like ``layer``."""
    config = layer.get_config()
    config.pop("kernel_regularizer", None)  # it penalised W, not its factors
    config.pop("kernel_constraint", None)
    first = dict(config, name=f"{layer.name}{FACTOR_SUFFIX}", units=factors.rank.rank, activation="linear",
                 use_bias=False, activity_regularizer=None, bias_regularizer=None, bias_constraint=None)  # fmt: skip
    return keras.layers.Dense.from_config(first), keras.layers.Dense.from_config(config)


def fine_tune(
    model: Any,
    train: EvalSet,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    seed: int = 0,
    learning_rate: float = 1e-3,
) -> Any:
    """Train ``model`` (in place) on ``train`` with Adam and sparse categorical cross-entropy; returns it.

    The loss is told whether the model outputs class probabilities (a softmax, as the digits CNN does) or
    logits, from what it outputs for a few training samples.
    """
    keras = import_keras()
    if epochs < 1 or batch_size < 1:
        raise UserInputError(f"fine-tuning needs at least 1 epoch and a batch size of 1, got {epochs} and {batch_size}")
    if not learning_rate > 0:
        raise UserInputError(f"the learning rate must be positive, got {learning_rate}")
    check_against_model(train, *model_signature(model))
    from_logits = not are_probabilities(np.asarray(model(train.x[:64], training=False)))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    keras.utils.set_random_seed(seed)
    history = model.fit(train.x, train.y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    logger.info("fine-tuned %s for %d epochs (from_logits=%s): loss %.4f", model.name, epochs, from_logits,
                history.history["loss"][-1])
    return model
