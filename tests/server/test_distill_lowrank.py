"""Distillation (teacher -> width-scaled student) and low-rank Dense factorisation, on the digits data.

The digits CNN teacher and a Flatten -> Dense(256) -> Dense(10) model are
trained once per module (a few seconds); students and factorised copies are
built from them. Conversions are real, and the converted models run on the
same interpreter the agents use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.compress.convert import convert, import_keras, load_keras_model, predict_accuracy
from server.compress.digits import digits_split, train_digits_cnn
from server.compress.distill import DistillResult, distill, logits_view, width_scaled_student
from server.compress.evalset import EvalSet
from server.compress.lowrank import FACTOR_SUFFIX, factorize_dense, fine_tune
from server.compress.quantization import Quantization
from shared.errors import UserInputError
from shared.interpreter import TFLiteModel, accuracy

DISTILL_EPOCHS = 5


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split() -> tuple[EvalSet, EvalSet]:
    return digits_split(seed=0)


@pytest.fixture(scope="module")
def teacher() -> Any:
    model, _ = train_digits_cnn(seed=0)
    return model


@pytest.fixture(scope="module")
def distilled(teacher: Any, split: tuple[EvalSet, EvalSet]) -> tuple[DistillResult, list[np.ndarray]]:
    """The width-0.5 student distilled for a few epochs, and the teacher's weights from before distillation."""
    train, test = split
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    student = width_scaled_student(teacher, 0.5)
    return distill(teacher, student, train, epochs=DISTILL_EPOCHS, validation=test), teacher_weights


def train_dense_model(train: EvalSet, *, logits: bool = False) -> Any:
    """Functional Flatten -> Dense(256, L2) -> Dense(10): a 64x256 kernel (factorised), a 256x10 one (too small).
    Its head is a softmax, or with ``logits`` none.

    The weight decay is what real training usually has; without it the
    kernel rows of the always-blank border pixels keep their random
    initial values, which need almost the full rank.
    """
    keras = import_keras()
    keras.utils.set_random_seed(0)
    pixels = keras.Input(shape=(8, 8, 1), name="pixels")
    hidden = keras.layers.Flatten(name="flatten")(pixels)
    hidden = keras.layers.Dense(256, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3), name="hidden")(
        hidden
    )
    scores = keras.layers.Dense(10, activation=None if logits else "softmax", name="scores")(hidden)
    model = keras.Model(pixels, scores, name="dense_digits")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=loss)
    model.fit(train.x, train.y, epochs=10, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def dense_model(split: tuple[EvalSet, EvalSet]) -> Any:
    return train_dense_model(split[0])


def subclassed_model() -> Any:
    keras = import_keras()

    class TwoLayers(keras.Model):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.flatten = keras.layers.Flatten()
            self.scores = keras.layers.Dense(10, activation="softmax")

        def call(self, x: Any) -> Any:
            return self.scores(self.flatten(x))

    model = TwoLayers()
    model(np.zeros((1, 8, 8, 1), dtype=np.float32))
    return model


def top1(model: Any, x: np.ndarray) -> np.ndarray:
    return np.argmax(model.predict(x, batch_size=256, verbose=0), axis=-1)


def tflite_accuracy(model: Any, test: EvalSet, tmp_path: Path) -> float:
    path = tmp_path / "model.tflite"
    path.write_bytes(convert(model, Quantization.FLOAT32, test.x))
    interpreter = TFLiteModel(str(path))
    try:
        return accuracy(interpreter, test.x, test.y)
    finally:
        interpreter.close()


# -- the width-scaled student -----------------------------------------------------------


def test_half_width_student_halves_hidden_layers_and_keeps_the_classifier(teacher: Any) -> None:
    student = width_scaled_student(teacher, 0.5)

    # by position: layer names carry Keras' process-wide counters, which depend on what ran before
    widths = [layer.get_config().get("filters", layer.get_config().get("units")) for layer in student.layers]
    assert widths == [8, 16, None, None, 64, 10]
    assert student.layers[-1].name == "scores"
    assert student.get_layer("scores").get_config()["activation"] == "softmax"
    assert student.count_params() < teacher.count_params() / 3
    assert student.inputs[0].shape == teacher.inputs[0].shape
    assert width_scaled_student(teacher, 1.0).count_params() == teacher.count_params()
    assert width_scaled_student(teacher, 0.01).layers[0].get_config()["filters"] == 1  # at least one


def test_width_scaling_of_a_functional_model_leaves_depthwise_multiplier_and_softmax_head_alone() -> None:
    keras = import_keras()
    pixels = keras.Input(shape=(8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(pixels)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.SeparableConv2D(24, 3, activation="relu", name="separable")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(40, activation="relu", name="hidden")(x)
    logits = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(pixels, keras.layers.Softmax()(logits), name="functional_digits")

    student = width_scaled_student(model, 0.25)

    assert student.get_layer("separable").get_config()["filters"] == 6
    assert student.get_layer("hidden").get_config()["units"] == 10
    assert student.get_layer("logits").get_config()["units"] == 10  # the classifier sits before the Softmax layer
    depthwise = next(layer for layer in student.layers if isinstance(layer, keras.layers.DepthwiseConv2D))
    assert depthwise.get_config()["depth_multiplier"] == 2
    assert tuple(depthwise.output.shape) == (None, 8, 8, 8)  # 4 channels in, times 2
    assert student.count_params() < model.count_params()

    train, _ = digits_split(seed=0)
    few = EvalSet(x=train.x[:128], y=train.y[:128])
    result = distill(model, student, few, epochs=2, batch_size=64)  # an untrained teacher: the mechanics only
    assert result.model is student and len(result.epoch_losses) == 2
    assert all(np.isfinite(result.epoch_losses))


@pytest.mark.parametrize("width", [0, -0.5, 1.5, float("nan")])
def test_width_outside_zero_to_one_is_rejected(teacher: Any, width: float) -> None:
    with pytest.raises(UserInputError, match=r"student width must be a number in \(0, 1\]"):
        width_scaled_student(teacher, width)


def test_subclassed_models_are_rejected_with_the_reason() -> None:
    model = subclassed_model()
    with pytest.raises(UserInputError, match="subclassed Keras model.*keras.Sequential or the functional API"):
        width_scaled_student(model, 0.5)
    with pytest.raises(UserInputError, match="cannot factorise the Dense layers of 'TwoLayers': it is a subclassed"):
        factorize_dense(model)


# -- logits and distillation --------------------------------------------------------------


def test_logits_view_reads_the_pre_softmax_values(teacher: Any, split: tuple[EvalSet, EvalSet]) -> None:
    keras = import_keras()
    _, test = split
    x = test.x[:64]
    logits = logits_view(teacher, "teacher").predict(x)
    probabilities = teacher.predict(x, verbose=0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.softmax(logits)), probabilities, atol=1e-5)
    assert np.ptp(logits, axis=-1).max() > 20  # confident: log(probabilities) would be far less precise here

    with_layer = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Activation("softmax")])
    sample = np.ones((2, 4), dtype=np.float32)
    expected = keras.ops.convert_to_numpy(with_layer.layers[0](sample))
    np.testing.assert_allclose(logits_view(with_layer, "student").predict(sample), expected, atol=1e-6)

    sigmoid = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="sigmoid")])
    with pytest.raises(UserInputError, match="must end in a softmax"):
        logits_view(sigmoid, "teacher")


def test_distilled_half_width_student_is_accurate_and_trained_by_a_decreasing_loss(
    distilled: tuple[DistillResult, list[np.ndarray]], teacher: Any, split: tuple[EvalSet, EvalSet]
) -> None:
    result, _ = distilled
    _, test = split
    assert result.val_accuracy is not None and result.val_accuracy >= 0.9
    assert predict_accuracy(result.model, test) == result.val_accuracy
    assert result.student_params == result.model.count_params() < result.teacher_params == teacher.count_params()
    assert len(result.epoch_losses) == DISTILL_EPOCHS
    assert result.epoch_losses[-1] < result.epoch_losses[0] / 5
    assert all(later < earlier for earlier, later in zip(result.epoch_losses, result.epoch_losses[1:]))


def test_distillation_leaves_the_teacher_untouched(
    distilled: tuple[DistillResult, list[np.ndarray]], teacher: Any
) -> None:
    _, before = distilled
    after = teacher.get_weights()
    assert len(before) == len(after)
    assert all(np.array_equal(b, a) for b, a in zip(before, after))


def test_distilled_student_saves_loads_and_converts(
    distilled: tuple[DistillResult, list[np.ndarray]], split: tuple[EvalSet, EvalSet], tmp_path: Path
) -> None:
    result, _ = distilled
    _, test = split
    path = tmp_path / "student.keras"
    result.model.save(path)
    reloaded = load_keras_model(path)
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in result.model.layers]
    np.testing.assert_allclose(reloaded.predict(test.x, verbose=0), result.model.predict(test.x, verbose=0), atol=1e-6)
    assert tflite_accuracy(reloaded, test, tmp_path) == pytest.approx(result.val_accuracy, abs=0.01)


@pytest.mark.parametrize(
    ("alpha", "temperature", "message"),
    [
        (-0.1, 4.0, r"alpha, the weight of the hard-label loss, must be in \[0, 1\], got -0.1"),
        (1.5, 4.0, r"must be in \[0, 1\], got 1.5"),
        (0.1, 0.0, "temperature must be a positive number, got 0.0"),
        (0.1, -2.0, "temperature must be a positive number, got -2.0"),
    ],
)
def test_bad_alpha_or_temperature_is_rejected(
    teacher: Any, split: tuple[EvalSet, EvalSet], alpha: float, temperature: float, message: str
) -> None:
    train, _ = split
    with pytest.raises(UserInputError, match=message):
        distill(teacher, width_scaled_student(teacher, 0.5), train, alpha=alpha, temperature=temperature)


def test_a_student_with_another_output_shape_is_rejected(teacher: Any, split: tuple[EvalSet, EvalSet]) -> None:
    keras = import_keras()
    train, _ = split
    student = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")]
    )
    with pytest.raises(UserInputError, match=r"the student .*5 classes.* does not match the teacher .*10 classes"):
        distill(teacher, student, train, epochs=1)


# -- low-rank factorisation -----------------------------------------------------------------


def test_rank_is_the_smallest_that_keeps_the_energy_and_the_factors_multiply_back() -> None:
    keras = import_keras()
    rng = np.random.default_rng(0)
    # rank 3, singular values 10, 5, 1: cumulative energies 100/126 = 0.794, 125/126 = 0.992, 1
    u, _ = np.linalg.qr(rng.normal(size=(96, 3)))
    v, _ = np.linalg.qr(rng.normal(size=(80, 3)))
    kernel = (u * np.array([10.0, 5.0, 1.0])) @ v.T
    model = keras.Sequential([keras.Input((96,)), keras.layers.Dense(80, activation="softmax", name="wide")])
    model.get_layer("wide").set_weights([kernel.astype(np.float32), np.full(80, 0.5, dtype=np.float32)])

    ranks = {e: factorize_dense(model, energy=e).replaced[0].rank for e in (0.5, 0.79, 0.8, 0.99, 0.999)}

    assert ranks == {0.5: 1, 0.79: 1, 0.8: 2, 0.99: 2, 0.999: 3}
    result = factorize_dense(model, energy=0.999)
    assert result.replaced[0].params_before == 96 * 80 + 80
    assert result.replaced[0].params_after == 3 * (96 + 80) + 80 == result.model.count_params()
    first, second = result.model.get_layer(f"wide{FACTOR_SUFFIX}"), result.model.get_layer("wide")
    assert first.get_config()["activation"] == "linear" and not first.use_bias
    assert second.get_config()["activation"] == "softmax"
    np.testing.assert_allclose(first.kernel.numpy() @ second.kernel.numpy(), kernel, atol=1e-5)
    np.testing.assert_array_equal(second.bias.numpy(), np.full(80, 0.5, dtype=np.float32))


def test_a_functional_model_keeps_its_unnamed_input_and_its_graph() -> None:
    keras = import_keras()
    keras.utils.set_random_seed(0)
    features = keras.Input(shape=(96,))
    hidden = keras.layers.Dense(80, activation="relu", name="wide")(features)
    merged = keras.layers.Concatenate(name="merged")([hidden, features])
    model = keras.Model(features, keras.layers.Dense(4, activation="softmax", name="head")(merged))
    kernel = np.outer(np.linspace(-1, 1, 96), np.linspace(1, 2, 80)).astype(np.float32)  # rank 1
    model.get_layer("wide").set_weights([kernel, np.zeros(80, dtype=np.float32)])

    result = factorize_dense(model, energy=0.99, min_params=1000)

    assert [(rank.name, rank.rank) for rank in result.replaced] == [("wide", 1)]  # head: 176 x 4 < 1,000
    assert result.model.layers[0].name == model.layers[0].name
    assert tuple(result.model.get_layer("merged").output.shape) == (None, 176)
    x = np.random.default_rng(0).normal(size=(32, 96)).astype(np.float32)
    np.testing.assert_allclose(result.model.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_factorised_model_at_high_energy_predicts_like_the_original(
    dense_model: Any, split: tuple[EvalSet, EvalSet]
) -> None:
    _, test = split
    result = factorize_dense(dense_model, energy=0.99)
    assert [rank.name for rank in result.replaced] == ["hidden"]
    assert np.mean(top1(result.model, test.x) == top1(dense_model, test.x)) >= 0.95


def test_factorisation_saves_params_and_leaves_small_layers_and_the_input_model_alone(
    dense_model: Any, split: tuple[EvalSet, EvalSet], tmp_path: Path
) -> None:
    _, test = split
    original_weights = [w.copy() for w in dense_model.get_weights()]
    result = factorize_dense(dense_model, energy=0.9)

    (hidden,) = result.replaced
    assert (hidden.name, hidden.in_dim, hidden.out_dim) == ("hidden", 64, 256)
    assert hidden.rank * (64 + 256) < 64 * 256
    assert result.model.count_params() == dense_model.count_params() - hidden.params_before + hidden.params_after
    assert result.model.count_params() < dense_model.count_params()
    assert [layer.name for layer in result.model.layers] == ["pixels", "flatten", "hidden_lowrank", "hidden", "scores"]
    small = result.model.get_layer("scores")  # 256 x 10 = 2,560 < min_params
    assert small.kernel.shape == (256, 10)
    for new, old in zip(small.get_weights(), dense_model.get_layer("scores").get_weights()):
        np.testing.assert_array_equal(new, old)
    assert factorize_dense(dense_model, energy=0.9, min_params=64 * 256 + 1).replaced == []

    assert tflite_accuracy(result.model, test, tmp_path) == pytest.approx(
        predict_accuracy(result.model, test), abs=0.01
    )
    fine_tune(result.model, split[0], epochs=1)
    assert all(np.array_equal(b, a) for b, a in zip(original_weights, dense_model.get_weights()))


def test_fine_tuning_recovers_an_aggressive_factorisation(dense_model: Any, split: tuple[EvalSet, EvalSet]) -> None:
    train, test = split
    result = factorize_dense(dense_model, energy=0.5)
    before = predict_accuracy(result.model, test)

    tuned = fine_tune(result.model, train, epochs=3)

    after = predict_accuracy(tuned, test)
    assert tuned is result.model
    assert after >= 0.9
    assert after > before


def test_fine_tuning_a_model_that_outputs_logits_trains_it_as_logits(split: tuple[EvalSet, EvalSet]) -> None:
    train, test = split
    model = train_dense_model(train, logits=True)
    result = factorize_dense(model, energy=0.5)
    before = predict_accuracy(result.model, test)

    tuned = fine_tune(result.model, train, epochs=3)

    after = predict_accuracy(tuned, test)
    assert after >= 0.92 and after - before >= 0.03  # told they were probabilities, it learned nothing (+0.002)
    assert np.any(np.asarray(tuned(test.x[:8], training=False)) < 0)  # still logits: no softmax was assumed


def test_sequential_models_are_factorised_too(teacher: Any, split: tuple[EvalSet, EvalSet]) -> None:
    keras = import_keras()
    _, test = split
    result = factorize_dense(teacher, energy=0.9)

    assert type(result.model) is keras.Sequential
    # the hidden Dense (288 x 128) is replaced; "scores" (128 x 10) is too small. Names by position:
    # Keras numbers unnamed layers process-wide, so they depend on what ran before.
    hidden = next(layer for layer in teacher.layers if type(layer).__name__ == "Dense").name
    assert [rank.name for rank in result.replaced] == [hidden]
    conv_names = [layer.name for layer in teacher.layers if type(layer).__name__ == "Conv2D"]
    for name in (*conv_names, "scores"):
        for new, old in zip(result.model.get_layer(name).get_weights(), teacher.get_layer(name).get_weights()):
            np.testing.assert_array_equal(new, old)
    assert result.model.count_params() < teacher.count_params()
    assert np.mean(top1(result.model, test.x) == top1(teacher, test.x)) >= 0.9


@pytest.mark.parametrize("energy", [0.0, -1.0, 1.01])
def test_energy_outside_zero_to_one_is_rejected(dense_model: Any, energy: float) -> None:
    with pytest.raises(UserInputError, match=r"kept energy must be in \(0, 1\]"):
        factorize_dense(dense_model, energy=energy)
