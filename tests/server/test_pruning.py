"""Pruning: tfmot in a child process, the pruned weights back in a Keras 3 clone, TFLite conversion of the result.

The digits CNN is trained once per module and pruned once per setting (each
run starts a worker process: a few seconds for TensorFlow and tfmot to load).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.compress import pruning
from server.compress.convert import convert, import_keras, predict_accuracy
from server.compress.digits import digits_split, train_digits_cnn
from server.compress.evalset import EvalSet
from server.compress.pipeline import gzip_size
from server.compress.pruning import PruneResult, prunable_kernels, prune_model, zero_fraction
from server.compress.quantization import Quantization
from shared.errors import ModelError, UserInputError
from shared.interpreter import TFLiteModel, accuracy

TRAIN_EPOCHS = 8  # about 0.98 test accuracy; pruning only needs a trained model, not the best one
DIGITS_PRUNABLE_LAYERS = 4  # two Conv2D, two Dense


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[Any, EvalSet, EvalSet, list[np.ndarray]]:
    """(model, train, test, a copy of the model's weights taken before any pruning)."""
    model, test = train_digits_cnn(epochs=TRAIN_EPOCHS, seed=0)
    train, _ = digits_split(seed=0)
    return model, train, test, [w.copy() for w in model.get_weights()]


@pytest.fixture(scope="module")
def pruned(digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]]) -> dict[float, PruneResult]:
    model, train, test, _ = digits
    return {s: prune_model(model, train, sparsity=s, validation=test) for s in (0.5, 0.8)}


@pytest.fixture(scope="module")
def structured(digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]]) -> PruneResult:
    model, train, _, _ = digits
    return prune_model(model, train, sparsity=0.5, structured_2_4=True, epochs=1)


@pytest.fixture(scope="module")
def float32_sizes(
    digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]], pruned: dict[float, PruneResult]
) -> dict[float, tuple[int, int]]:
    """(flatbuffer size, gzip size) of the float32 variant, unpruned (key 0.0) and pruned."""
    model, _, test, _ = digits
    models = {0.0: model, **{s: result.model for s, result in pruned.items()}}
    sizes = {}
    for s, keras_model in models.items():
        flatbuffer = convert(keras_model, Quantization.FLOAT32, test.x)
        sizes[s] = (len(flatbuffer), gzip_size(flatbuffer))
    return sizes


# -- unstructured pruning -----------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_pruning_reaches_the_target_sparsity(pruned: dict[float, PruneResult], sparsity: float) -> None:
    result = pruned[sparsity]
    assert abs(result.zero_fraction - sparsity) <= 0.05
    assert zero_fraction(result.model) == result.zero_fraction
    assert result.layers_pruned == DIGITS_PRUNABLE_LAYERS
    assert not result.structured_2_4
    for kernel in prunable_kernels(result.model):  # every layer is pruned, not just the big one
        assert abs(np.mean(np.asarray(kernel) == 0) - sparsity) <= 0.05


def test_pruned_model_keeps_its_accuracy(
    digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]], pruned: dict[float, PruneResult]
) -> None:
    _, _, test, _ = digits
    half = predict_accuracy(pruned[0.5].model, test)
    assert half >= 0.85
    assert pruned[0.5].val_accuracy == pytest.approx(half)  # the worker's tf-keras model agrees with the clone
    assert predict_accuracy(pruned[0.8].model, test) >= 0.8


def test_the_input_model_is_not_changed(
    digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]], pruned: dict[float, PruneResult]
) -> None:
    model, _, _, before = digits
    after = model.get_weights()
    assert len(after) == len(before)
    assert all(np.array_equal(a, b) for a, b in zip(after, before))
    assert zero_fraction(model) == 0.0
    assert all(result.model is not model for result in pruned.values())
    assert [layer.name for layer in pruned[0.5].model.layers] == [layer.name for layer in model.layers]


@pytest.mark.parametrize("quantization", [Quantization.FLOAT32, Quantization.INT8])
def test_pruned_model_converts_and_runs_on_litert(
    digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]],
    pruned: dict[float, PruneResult],
    quantization: Quantization,
    tmp_path: Path,
) -> None:
    _, _, test, _ = digits
    path = tmp_path / f"pruned-{quantization.value}.tflite"
    path.write_bytes(convert(pruned[0.5].model, quantization, test.x))
    model = TFLiteModel(str(path), runtime="ai-edge-litert")
    try:
        assert model.describe().name == "ai-edge-litert"
        assert accuracy(model, test.x, test.y) >= 0.85
    finally:
        model.close()


def test_pruning_shrinks_the_gzipped_flatbuffer_only(float32_sizes: dict[float, tuple[int, int]]) -> None:
    (raw, gzipped), (raw_half, gzipped_half), (raw_most, gzipped_most) = (float32_sizes[s] for s in (0.0, 0.5, 0.8))
    assert raw_half == raw and raw_most == raw  # the zeros are still stored
    assert gzipped_half < 0.8 * gzipped
    assert gzipped_most < gzipped_half


# -- 2:4 structured pruning ----------------------------------------------------------------


def test_structured_2_4_keeps_two_of_every_four_input_channels(structured: PruneResult) -> None:
    """tfmot's m_by_n: at most 2 non-zeros in every aligned group of 4 input channels.

    Groups are taken along the input-channel axis (Conv2D kernels are
    ``(h, w, in, out)``, Dense ``(in, out)``), the TFLite layout's last axis. A
    trailing partial group also keeps at most 2, so a layer with fewer than 3
    input channels (the first convolution: 1) is not pruned at all.
    """
    assert structured.structured_2_4
    assert structured.layers_pruned == DIGITS_PRUNABLE_LAYERS
    full_groups = 0
    for kernel in prunable_kernels(structured.model):
        weights = np.asarray(kernel)
        in_channels = weights.shape[-2]
        by_input = np.moveaxis(weights, -2, -1).reshape(-1, in_channels)  # (positions x out, in)
        padded = np.pad(by_input, [(0, 0), (0, -in_channels % 4)])
        nonzero_per_group = np.count_nonzero(padded.reshape(len(padded), -1, 4), axis=-1)
        assert nonzero_per_group.max() <= 2
        if in_channels >= 4:
            full_groups += in_channels // 4
            assert np.mean(weights == 0) >= 0.5
        else:
            assert np.count_nonzero(weights == 0) == 0  # 1 input channel: nothing to prune
    assert full_groups > 0
    assert 0.45 <= structured.zero_fraction <= 0.5


# -- bad input and failures ----------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0, 1, 1.5, -0.2, float("nan")])
def test_sparsity_must_be_a_fraction(digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]], sparsity: float) -> None:
    model, train, _, _ = digits
    with pytest.raises(UserInputError, match="sparsity must be a fraction between 0 and 1"):
        prune_model(model, train, sparsity=sparsity)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparsity": 0.8, "structured_2_4": True}, "use sparsity 0.5"),
        ({"sparsity": 0.5, "epochs": 0}, "epochs must be a positive whole number"),
        ({"sparsity": 0.5, "batch_size": 2.5}, "batch_size must be a positive whole number"),
        ({"sparsity": 0.5, "timeout": 0}, "timeout must be a positive number"),
    ],
)
def test_bad_options_are_user_errors(
    digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]], options: dict[str, Any], message: str
) -> None:
    model, train, _, _ = digits
    with pytest.raises(UserInputError, match=message):
        prune_model(model, train, **options)


def test_training_data_must_fit_the_model(digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]]) -> None:
    model, _, _, _ = digits
    wrong_shape = EvalSet(x=np.zeros((4, 6, 6, 1), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(UserInputError, match="shape"):
        prune_model(model, wrong_shape, sparsity=0.5)


def test_unsupported_layers_are_named_in_one_line() -> None:
    keras = import_keras()

    class Doubler(keras.layers.Layer):  # type: ignore[misc, name-defined]
        """A custom layer the worker has never heard of."""

        def call(self, inputs: Any) -> Any:
            return inputs * 2.0

    inputs = keras.Input((4,))
    hidden = keras.layers.Lambda(lambda t: t + 1.0, name="shift")(Doubler(name="double")(inputs))
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    train = EvalSet(x=rng.random((8, 4), dtype=np.float32), y=np.arange(8, dtype=np.int64) % 3)
    with pytest.raises(ModelError) as caught:
        prune_model(model, train, sparsity=0.5)
    message = str(caught.value)
    assert "pruning does not support layer 'double' (custom class Doubler), layer 'shift' (Lambda)" in message
    assert "Traceback" not in message and "\n" not in message


def test_a_worker_that_dies_is_a_model_error(
    digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, train, _, _ = digits
    monkeypatch.setattr(pruning, "WORKER_MODULE", "server.compress.no_such_worker")
    with pytest.raises(ModelError, match=r"the pruning worker exited with 1 without a result: .*no_such_worker"):
        prune_model(model, train, sparsity=0.5)


def test_a_worker_that_takes_too_long_is_stopped(digits: tuple[Any, EvalSet, EvalSet, list[np.ndarray]]) -> None:
    model, train, _, _ = digits
    with pytest.raises(ModelError, match=r"the pruning worker did not finish within 0\.2 s; try fewer epochs"):
        prune_model(model, train, sparsity=0.5, timeout=0.2)


def test_tfmot_never_enters_this_process(pruned: dict[float, PruneResult]) -> None:
    assert pruned  # after real pruning runs
    assert "tensorflow_model_optimization" not in sys.modules
    assert "tf_keras" not in sys.modules
    assert os.environ.get("TF_USE_LEGACY_KERAS") != "1"


def test_gzip_size_is_deterministic() -> None:
    data = bytes(10_000) + os.urandom(100)
    assert gzip_size(data) == gzip_size(data) < 1_000


# -- a real architecture --------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_mobilenet_v2_prunes_end_to_end() -> None:
    keras = import_keras()
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10)
    rng = np.random.default_rng(0)
    train = EvalSet(x=rng.random((64, 96, 96, 3), dtype=np.float32), y=np.arange(64, dtype=np.int64) % 10)
    result = prune_model(model, train, sparsity=0.5, epochs=1, timeout=60)
    assert result.layers_pruned == len(prunable_kernels(model)) == 36  # 35 Conv2D and the classifier
    assert abs(result.zero_fraction - 0.5) <= 0.05
    assert zero_fraction(model) == 0.0
