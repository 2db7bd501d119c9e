"""Neuron/filter pruning (``prune-units``): the layers get narrower, what follows them stays consistent, and
layers tied to a residual add or to the output are left as they are, with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.compress.convert import import_keras
from server.compress.digits import digits_split, train_digits_resnet
from server.compress.evalset import EvalSet
from server.compress.structured import _narrow_copy, _rank, plan_groups, prune_units
from shared.errors import UserInputError


@pytest.fixture(scope="module")
def splits() -> tuple[EvalSet, EvalSet]:
    return digits_split()


@pytest.fixture(scope="module")
def digits_cnn(digits_inputs: tuple[Path, Path]) -> Any:
    return import_keras().models.load_model(digits_inputs[0])


def accuracy(model: Any, data: EvalSet) -> float:
    return float(np.mean(np.argmax(model.predict(data.x, verbose=0), axis=1) == data.y))


def widths(model: Any) -> dict[str, int]:
    return {layer.name: int(layer.get_weights()[0].shape[-1]) for layer in model.layers
            if type(layer).__name__ in ("Dense", "Conv2D")}


def test_the_digits_cnn_loses_half_its_units_and_filters_and_keeps_its_accuracy(
    digits_cnn: Any, splits: tuple[EvalSet, EvalSet]
) -> None:
    train, test = splits
    before = widths(digits_cnn)
    result = prune_units(digits_cnn, train, fraction=0.5, epochs=3)
    after = widths(result.model)
    convs = [n for n in before if n.startswith("conv2d")]
    hidden = [n for n in before if n.startswith("dense")]
    assert [after[n] for n in convs + hidden] == [before[n] // 2 for n in convs + hidden]  # 8, 16 filters; 64 units
    assert after["scores"] == before["scores"] == 10
    # The layers that read the removed units were cut to match: the Dense after Flatten reads 3x3 positions of 16.
    assert result.model.get_layer(hidden[0]).get_weights()[0].shape == (3 * 3 * after[convs[1]], after[hidden[0]])
    assert result.params_after < 0.6 * result.params_before
    assert result.untouched == {"scores": "its units are the model's output"}
    assert result.units == {n: f"{after[n]}/{before[n]}" for n in convs + hidden}
    assert accuracy(result.model, test) >= accuracy(digits_cnn, test) - 0.01
    assert widths(digits_cnn) == before  # the input model is untouched


def test_a_residual_net_narrows_inside_its_blocks_and_leaves_the_adds_consistent(
    splits: tuple[EvalSet, EvalSet]
) -> None:
    train, test = splits
    model, _ = train_digits_resnet(epochs=3)
    result = prune_units(model, train, fraction=0.5, epochs=1)
    after = widths(result.model)
    for block in (0, 1):
        assert after[f"block{block}_conv1"] == 24  # read only by the block's second convolution
        assert after[f"block{block}_conv2"] == 48  # added to the block's input: kept whole
        assert "block" in result.untouched[f"block{block}_conv2"] and "add" in result.untouched[f"block{block}_conv2"]
        bn = result.model.get_layer(f"block{block}_bn1")
        assert [w.shape for w in bn.get_weights()] == [(24,)] * 4
    assert after["stem_conv"] == 48 and "add" in result.untouched["stem_conv"]
    assert after["hidden"] == 32 and after["scores"] == 10
    assert result.params_after < 0.6 * result.params_before
    assert accuracy(result.model, test) > 0.9


def test_removing_units_that_never_fire_changes_no_output(splits: tuple[EvalSet, EvalSet]) -> None:
    """Dead units (zero weights in, so zero after the ReLU) rank last; removing exactly them must leave every
    output as it was: the kernels, biases, batch norm and the Dense behind Flatten were cut on the right axes."""
    keras = import_keras()
    keras.utils.set_random_seed(1)
    pixels = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv_a")(pixels)
    x = keras.layers.ReLU(name="relu_a")(keras.layers.BatchNormalization(name="bn_a")(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_b")(x)
    x = keras.layers.Dense(10, activation="relu", name="dense_a")(keras.layers.Flatten(name="flat")(x))
    model = keras.Model(pixels, keras.layers.Dense(10, activation="softmax", name="scores")(x))
    train, _ = splits
    bn = model.get_layer("bn_a")
    gamma, beta, mean, variance = bn.get_weights()
    dead = {"conv_a": [1, 4, 6, 7], "conv_b": [0, 3, 5], "dense_a": [2, 3, 5, 7, 8]}
    for name, units in dead.items():
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        kernel[..., units], bias[units] = 0.0, -1.0  # never above zero after the ReLU
        layer.set_weights([kernel, bias])
    beta[dead["conv_a"]], gamma[dead["conv_a"]] = -5.0, 0.1  # the batch norm keeps them below zero too
    bn.set_weights([gamma, beta, mean, variance])

    groups, untouched = plan_groups(model)
    assert {g.producer for g in groups} == set(dead) and set(untouched) == {"scores"}
    _rank(model, groups, train, fraction=0.5, seed=0)
    assert {g.producer: sorted(set(range(g.units)) - set(g.keep)) for g in groups} == dead
    narrow = _narrow_copy(model, groups)
    np.testing.assert_allclose(narrow.predict(train.x[:64], verbose=0), model.predict(train.x[:64], verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_bad_fractions_and_models_with_nothing_to_narrow_are_clear_errors(
    digits_cnn: Any, splits: tuple[EvalSet, EvalSet]
) -> None:
    train, _ = splits
    for fraction in (0, 1, 1.5, -0.1):
        with pytest.raises(UserInputError, match="between 0 and 1"):
            prune_units(digits_cnn, train, fraction=fraction)
    keras = import_keras()
    linear = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10, name="only")])
    with pytest.raises(UserInputError, match="no layer of .* can lose units .*only: its units are the model's output"):
        prune_units(linear, train, fraction=0.5)
    # A batch norm behind Flatten normalises each (position, channel) feature: the filters stay.
    flat_norm = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
                                  keras.layers.Flatten(), keras.layers.BatchNormalization(name="bn"),
                                  keras.layers.Dense(10, name="out")])
    groups, untouched = plan_groups(flat_norm)
    assert groups == [] and untouched["conv"] == "feeds bn, a batch norm over another axis"
