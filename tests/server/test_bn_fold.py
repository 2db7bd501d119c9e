"""Batch norms folded into the layer before them: the same function, no batch norm left where one can go,
and those that cannot be folded left alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server.compress.bn_fold import fold_batch_norms, foldable_pairs
from server.compress.convert import import_keras
from server.compress.digits import digits_split
from server.compress.pipeline import CompressionInputs, transformed_model
from server.compress.recipes import parse_recipe


def randomise_norms(model: Any, seed: int = 0) -> Any:
    """Batch norms with statistics far from the identity, as training leaves them."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.05, 20, gamma.shape), rng.normal(0, 1, beta.shape),
                               rng.normal(0, 1, mean.shape), rng.uniform(0.1, 4, variance.shape)])
    return model


def functional() -> Any:
    keras = import_keras()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="pixels")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    branch = keras.layers.Conv2D(16, 1, activation="relu", name="relu_conv")(x)  # activation first: stays
    after_relu = keras.layers.BatchNormalization(name="after_relu_bn")(branch)
    shared = keras.layers.Conv2D(16, 1, name="shared")(x)  # read by a batch norm and an add: stays
    shared_bn = keras.layers.BatchNormalization(name="shared_bn")(shared)
    x = keras.layers.Add(name="add")([after_relu, shared_bn, shared])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(12, name="dense")(x)
    x = keras.layers.BatchNormalization(name="dense_bn")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="out")(x)
    return randomise_norms(keras.Model(inputs, outputs))


def sequential() -> Any:
    keras = import_keras()
    keras.utils.set_random_seed(1)
    return randomise_norms(keras.Sequential([
        keras.Input((16,)), keras.layers.Dense(32, name="d1"), keras.layers.BatchNormalization(name="bn1"),
        keras.layers.ReLU(), keras.layers.Dense(3, activation="softmax", name="d2"),
    ]))


@pytest.mark.parametrize(("build", "expected"), [
    (functional, ["conv+conv_bn", "dw+dw_bn", "dense+dense_bn"]),
    (sequential, ["d1+bn1"]),
])
def test_folding_keeps_the_function_and_removes_only_the_foldable_norms(build: Any, expected: list[str]) -> None:
    model = build()
    x = np.random.default_rng(2).normal(size=(16, *model.inputs[0].shape[1:])).astype(np.float32)
    folded, names = fold_batch_norms(model)
    assert names == expected
    left = {layer.name for layer in folded.layers if type(layer).__name__ == "BatchNormalization"}
    norms = {layer.name for layer in model.layers if type(layer).__name__ == "BatchNormalization"}
    assert left == norms - {name.split("+")[1] for name in expected}
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    assert folded.count_params() < model.count_params()  # four numbers per folded channel become at most one


def test_a_model_without_foldable_norms_comes_back_as_it_is() -> None:
    keras = import_keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2, activation="softmax")])
    assert foldable_pairs(model) == []
    assert fold_batch_norms(model) == (model, [])


def test_low_rank_factorises_the_folded_weights_and_says_so() -> None:
    keras = import_keras()
    keras.utils.set_random_seed(3)
    train, _ = digits_split()
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(128, name="wide"),
        keras.layers.BatchNormalization(name="wide_bn"), keras.layers.ReLU(),
        keras.layers.Dense(10, activation="softmax", name="out"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(train.x, train.y, epochs=1, verbose=0)
    inputs = CompressionInputs(model, train, train, epochs=1)
    transformed, details = transformed_model(parse_recipe("lowrank:0.5+float32"), inputs)
    assert details["bn_folded"] == ["wide+wide_bn"]
    assert "wide" in details["ranks"]
    assert not any(type(layer).__name__ == "BatchNormalization" for layer in transformed.layers)


def test_weight_pruning_judges_the_weights_the_device_multiplies_by() -> None:
    """A batch norm that scales one unit of a Dense up 100x and another down 100x: judged before folding,
    half of each unit's weights would go; judged as the device sees them, the scaled-down unit loses them."""
    keras = import_keras()
    keras.utils.set_random_seed(4)
    train, _ = digits_split()
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(2, name="pair"),
        keras.layers.BatchNormalization(name="pair_bn"), keras.layers.Dense(10, activation="softmax", name="out"),
    ])
    kernel = np.random.default_rng(5).normal(size=(64, 2)).astype(np.float32)
    model.get_layer("pair").set_weights([kernel, np.zeros(2, np.float32)])
    model.get_layer("pair_bn").set_weights([np.array([100.0, 0.01], np.float32), np.zeros(2, np.float32),
                                            np.zeros(2, np.float32), np.ones(2, np.float32)])
    inputs = CompressionInputs(model, train, train, epochs=1)
    transformed, details = transformed_model(parse_recipe("prune:0.5+float32"), inputs)
    assert details["bn_folded"] == ["pair+pair_bn"]
    pruned = transformed.get_layer("pair").get_weights()[0]
    kept = (pruned != 0).sum(axis=0)
    assert kept[0] == 64 and kept[1] == 0, kept
