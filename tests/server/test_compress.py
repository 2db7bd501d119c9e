"""Compression: evaluation files, Keras loading, real TFLite conversion, host evaluation on ai-edge-litert.

The digits CNN is trained once per module (a few seconds); everything else
is small arrays and files made by the tests.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.compress.convert import (
    convert,
    import_keras,
    load_keras_model,
    model_signature,
    predict_accuracy,
    representative_samples,
)
from server.compress.digits import train_digits_cnn, train_weak_digits_model, write_demo_inputs
from server.compress.evalset import (
    EvalSet,
    check_against_model,
    eval_file_bytes,
    eval_slice,
    load_eval_file,
    write_eval_file,
)
from server.compress.pipeline import CompressionInputs, VariantReport, build_variant, measure
from server.compress.quantization import Quantization
from server.compress.recipes import Recipe
from shared.benchmark import BenchmarkSettings
from shared.errors import EdgefleetError, ModelError, UserInputError
from shared.interpreter import TFLiteModel

QUICK_BENCHMARK = BenchmarkSettings(warmup_runs=1, warmup_seconds=0.01, min_runs=20, min_seconds=0.05)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[Any, EvalSet]:
    return train_digits_cnn(seed=0)


@pytest.fixture(scope="module")
def variants(digits: tuple[Any, EvalSet], tmp_path_factory: pytest.TempPathFactory) -> dict[Quantization, Path]:
    model, test = digits
    out = tmp_path_factory.mktemp("variants")
    paths = {}
    for quantization in Quantization.convertible():
        path = out / f"digits-{quantization.value}.tflite"
        path.write_bytes(convert(model, quantization, test.x))
        paths[quantization] = path
    return paths


@pytest.fixture(scope="module")
def host_evaluations(
    digits: tuple[Any, EvalSet], tmp_path_factory: pytest.TempPathFactory
) -> dict[Quantization, VariantReport]:
    """Every quantization built and measured by the pipeline, in the agents' interpreter."""
    model, test = digits
    inputs = CompressionInputs(model, test, settings=QUICK_BENCHMARK)
    work = tmp_path_factory.mktemp("measured")
    return {q: build_variant(Recipe((), q), inputs, work) for q in Quantization.convertible()}


def _evalset(n: int = 30, classes: int = 3, shape: tuple[int, ...] = (4,)) -> EvalSet:
    rng = np.random.default_rng(1)
    return EvalSet(
        x=rng.random((n, *shape), dtype=np.float32),
        y=(np.arange(n) % classes).astype(np.int64),
    )


def _npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


# -- the digits model and its variants ----------------------------------------------------


def test_digits_cnn_reaches_095_on_held_out_digits(digits: tuple[Any, EvalSet]) -> None:
    model, test = digits
    assert model_signature(model) == ((8, 8, 1), 10)
    assert len(test) == 450
    assert predict_accuracy(model, test) >= 0.95


@pytest.mark.parametrize("quantization", Quantization.convertible(), ids=lambda q: q.value)
def test_every_quantization_loads_in_ai_edge_litert(
    quantization: Quantization, variants: dict[Quantization, Path]
) -> None:
    model = TFLiteModel(str(variants[quantization]), runtime="ai-edge-litert")
    try:
        assert model.info.name == "ai-edge-litert"
        assert model.input_shape == (1, 8, 8, 1)
        assert model.input_dtype == ("int8" if quantization is Quantization.INT8 else "float32")  # int8_float_io too
        assert model.infer(np.zeros((1, 8, 8, 1), np.float32)).shape == (1, 10)
    finally:
        model.close()


def test_int8_is_under_030_of_float32_within_one_point(
    digits: tuple[Any, EvalSet], host_evaluations: dict[Quantization, VariantReport]
) -> None:
    model, test = digits
    float_accuracy = predict_accuracy(model, test)
    f32, int8 = host_evaluations[Quantization.FLOAT32], host_evaluations[Quantization.INT8]
    assert f32.size_bytes and int8.size_bytes and int8.accuracy is not None and f32.accuracy is not None
    assert int8.size_bytes <= 0.30 * f32.size_bytes
    assert int8.accuracy >= float_accuracy - 0.01
    assert abs(f32.accuracy - float_accuracy) <= 0.005
    assert int8.agreement is not None and int8.agreement >= 0.98


def test_float16_and_dynamic_range_are_smaller_than_float32(
    host_evaluations: dict[Quantization, VariantReport],
) -> None:
    f32 = host_evaluations[Quantization.FLOAT32].size_bytes
    assert f32
    assert (host_evaluations[Quantization.FLOAT16].size_bytes or 0) < 0.6 * f32
    assert (host_evaluations[Quantization.DYNAMIC_RANGE].size_bytes or 0) < 0.35 * f32


def test_host_evaluation_measures_every_variant(
    variants: dict[Quantization, Path], host_evaluations: dict[Quantization, VariantReport]
) -> None:
    for quantization, report in host_evaluations.items():
        assert report.verdict == "", report.reason  # built and measured; judging comes later
        assert report.size_bytes == variants[quantization].stat().st_size
        assert report.gzip_bytes and report.gzip_bytes < report.size_bytes
        assert report.p50_ms and report.p95_ms and 0 < report.p50_ms <= report.p95_ms
        assert report.accuracy is not None and report.accuracy >= 0.95
        assert "CONV_2D" in report.details["ops"] and "FULLY_CONNECTED" in report.details["ops"]
        assert report.peak_rss_bytes and report.peak_rss_bytes < 500 * 1024 * 1024


def test_int16x8_runs_without_the_xnnpack_delegate(host_evaluations: dict[Quantization, VariantReport]) -> None:
    # Visible in the report: XNNPACK takes no int16 activations, so the graph runs on reference kernels.
    assert host_evaluations[Quantization.INT16X8].details["delegate_partitions"] == 0
    assert host_evaluations[Quantization.INT8].details["delegate_partitions"] >= 1


def test_a_broken_flatbuffer_is_a_clear_load_error(digits: tuple[Any, EvalSet], tmp_path: Path) -> None:
    model, test = digits
    inputs = CompressionInputs(model, test, settings=QUICK_BENCHMARK)
    with pytest.raises(EdgefleetError, match="load_error: ai-edge-litert .* cannot load"):
        measure(b"not a flatbuffer" * 8, inputs, tmp_path, threads=1)


def test_conversion_prints_nothing_on_stdout(digits: tuple[Any, EvalSet], capsys: pytest.CaptureFixture[str]) -> None:
    model, test = digits
    convert(model, Quantization.FLOAT32, test.x)
    assert capsys.readouterr().out == ""


def test_conversion_is_deterministic(digits: tuple[Any, EvalSet], variants: dict[Quantization, Path]) -> None:
    model, test = digits
    assert convert(model, Quantization.INT8, test.x) == variants[Quantization.INT8].read_bytes()


def test_weak_model_fails_an_accuracy_gate(tmp_path: Path) -> None:
    model, test = train_weak_digits_model(seed=0)
    inputs = CompressionInputs(model, eval_slice(test), settings=QUICK_BENCHMARK)
    report = build_variant(Recipe((), Quantization.INT8), inputs, tmp_path)
    assert report.accuracy is not None and report.accuracy < 0.6


def test_int8_needs_representative_samples(digits: tuple[Any, EvalSet]) -> None:
    model, _ = digits
    with pytest.raises(UserInputError, match="representative samples"):
        convert(model, Quantization.INT8, np.zeros((0, 8, 8, 1), np.float32))
    with pytest.raises(UserInputError, match=r"shape \(4, 4\).*\(8, 8, 1\)"):
        representative_samples(np.zeros((5, 4, 4), np.float32), (8, 8, 1))


def test_representative_samples_are_bounded_and_spread() -> None:
    x = np.arange(1000, dtype=np.float32).reshape(1000, 1)
    picked = representative_samples(x, (1,))
    assert len(picked) == 100
    assert picked[0, 0] == 0 and picked[-1, 0] == 999


def test_demo_inputs_round_trip(tmp_path: Path) -> None:
    model_path, eval_path = write_demo_inputs(tmp_path, epochs=1)
    assert (model_path.name, eval_path.name) == ("digits.keras", "digits-eval.npz")
    model = load_keras_model(model_path)
    evalset = load_eval_file(eval_path)
    assert model_signature(model) == ((8, 8, 1), 10)
    check_against_model(evalset, (8, 8, 1), 10)
    assert 0.0 <= predict_accuracy(model, evalset) <= 1.0


# -- load_keras_model and model_signature ---------------------------------------------------


def test_load_keras_model_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="model file not found: .*nope.keras"):
        load_keras_model(tmp_path / "nope.keras")


def test_load_keras_model_garbage_keras_file(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    path.write_bytes(b"\x00garbage, not a zip" * 20)
    with pytest.raises(UserInputError, match=r"model.keras is not a Keras model file \(a .keras file is a zip"):
        load_keras_model(path)


def test_load_keras_model_zip_without_config(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(UserInputError, match="no config.json"):
        load_keras_model(path)


def test_load_keras_model_garbage_h5_file(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(UserInputError, match="not a Keras model file .*HDF5"):
        load_keras_model(path)


@pytest.mark.parametrize("name", ["model.pb", "model.tflite", "model", "model.KERAS"])
def test_load_keras_model_wrong_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"whatever")
    with pytest.raises(
        UserInputError,
        match=r"unsupported model format .*expected .keras or .h5; save the model with model.save\('model.keras'\)",
    ):
        load_keras_model(path)


def test_load_keras_model_weights_only_file(tmp_path: Path) -> None:
    path = tmp_path / "model.weights.h5"
    path.write_bytes(b"whatever")
    with pytest.raises(UserInputError, match="holds only weights"):
        load_keras_model(path)


def test_load_keras_model_refuses_python_lambda_layers(tmp_path: Path) -> None:
    keras = import_keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2), keras.layers.Dense(3)])
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(
        ModelError, match="cannot load the Keras model in lambda.keras: it has a Lambda layer with Python code"
    ):
        load_keras_model(path)


def test_load_keras_model_reads_h5(tmp_path: Path) -> None:
    keras = import_keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    path = tmp_path / "small.h5"
    model.save(path)
    assert model_signature(load_keras_model(path)) == ((4,), 3)


def test_model_signature_rejects_two_outputs_and_non_classifiers() -> None:
    keras = import_keras()
    inputs = keras.Input((4,))
    two = keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(2)(inputs)])
    with pytest.raises(ModelError, match="one input and one output, got 1 and 2"):
        model_signature(two)
    image = keras.Input((8, 8, 1))
    segmenter = keras.Model(image, keras.layers.Conv2D(3, 1)(image))
    with pytest.raises(ModelError, match=r"output is \(batch, classes\)"):
        model_signature(segmenter)
    regressor = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    with pytest.raises(ModelError, match="2 or more classes"):
        model_signature(regressor)


# -- evaluation files ---------------------------------------------------------------------


def test_eval_file_round_trip_and_stable_bytes(tmp_path: Path) -> None:
    evalset = _evalset()
    path = write_eval_file(evalset, tmp_path / "sub" / "eval.npz")
    loaded = load_eval_file(path)
    np.testing.assert_array_equal(loaded.x, evalset.x)
    np.testing.assert_array_equal(loaded.y, evalset.y)
    assert path.read_bytes() == eval_file_bytes(evalset) == eval_file_bytes(loaded)


def test_eval_file_accepts_other_numeric_dtypes(tmp_path: Path) -> None:
    path = _npz(tmp_path / "e.npz", x=np.ones((3, 2), np.uint8), y=np.array([0.0, 1.0, 2.0]))
    loaded = load_eval_file(path)
    assert loaded.x.dtype == np.float32 and loaded.y.dtype == np.int64
    assert loaded.y.tolist() == [0, 1, 2]


def test_eval_file_missing(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="evaluation file not found: .*absent.npz"):
        load_eval_file(tmp_path / "absent.npz")


def test_eval_file_missing_x_names_the_keys(tmp_path: Path) -> None:
    path = _npz(tmp_path / "e.npz", images=np.zeros((2, 3)), y=np.zeros(2, np.int64))
    with pytest.raises(UserInputError, match=r"e.npz has no array 'x' \(it has: 'images', 'y'\).*numpy.savez"):
        load_eval_file(path)


@pytest.mark.parametrize(
    "content",
    [b"definitely not numpy", b"PK\x03\x04 truncated zip", np.lib.format.MAGIC_PREFIX + b"\x01\x00"],
    ids=["garbage", "truncated-zip", "npy-header"],
)
def test_eval_file_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "e.npz"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=r"e.npz is not an .npz archive; save .* numpy.savez"):
        load_eval_file(path)


def test_eval_file_damaged_member(tmp_path: Path) -> None:
    path = _npz(tmp_path / "e.npz", x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    data = bytearray(path.read_bytes())
    header_end = data.index(b"\n", data.index(b"NUMPY")) + 1
    data[header_end : header_end + 4] = b"\xff\xff\xff\xff"  # flip payload bytes: the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="e.npz is not a readable .npz archive"):
        load_eval_file(path)


def test_eval_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path / "e.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2, np.int64))
    with pytest.raises(UserInputError, match="e.npz is not a readable .npz archive"):
        load_eval_file(path)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((3, 2)), np.zeros(2, np.int64), "'x' has 3 samples but 'y' has 2 labels"),
        (np.zeros((0, 2)), np.zeros(0, np.int64), "the evaluation set is empty"),
        (np.zeros((2, 2)), np.array([0.0, 1.5]), "whole class numbers, found 1.5"),
        (np.zeros((2, 2)), np.array(["a", "b"]), "must be integers, got dtype <U1"),
        (np.zeros((2, 2)), np.array([0, -1]), "must be 0 or more, found -1"),
        (np.array([[0.0, np.nan], [np.inf, 1.0]]), np.array([0, 1]), "2 values that are NaN, infinite"),
        (np.array([[0.0, 1e300], [0.0, 1.0]]), np.array([0, 1]), "1 values that are NaN, infinite or too large"),
        (np.zeros((2, 2)), np.eye(2, dtype=np.int64), r"1-D array of class labels, got shape \(2, 2\) \(one-hot"),
        (np.zeros(4), np.zeros(4, np.int64), r"'x' must hold one sample per row, got shape \(4\)"),
        (np.full((2, 2), "s"), np.array([0, 1]), "'x' must be numeric, got dtype <U1"),
    ],
    ids=["length", "empty", "fractional", "strings", "negative", "nan", "overflow", "one-hot", "flat-x", "str-x"],
)
def test_eval_file_bad_contents(tmp_path: Path, x: np.ndarray, y: np.ndarray, message: str) -> None:
    path = _npz(tmp_path / "e.npz", x=x, y=y)
    with pytest.raises(UserInputError, match=message):
        load_eval_file(path)


def test_check_against_model_shape_mismatch() -> None:
    with pytest.raises(UserInputError, match=r"shape \(4\) but the model expects inputs of shape \(8, 8, 1\)"):
        check_against_model(_evalset(), (8, 8, 1), 10)


def test_check_against_model_labels_out_of_range() -> None:
    with pytest.raises(UserInputError, match=r"labels go up to 2 but the model has 2 classes \(labels 0..1\)"):
        check_against_model(_evalset(classes=3), (4,), 2)
    check_against_model(_evalset(classes=3), (4,), 3)


def test_predict_accuracy_checks_the_evaluation_set(digits: tuple[Any, EvalSet]) -> None:
    model, _ = digits
    with pytest.raises(UserInputError, match="model expects inputs of shape"):
        predict_accuracy(model, _evalset())


def test_evalset_is_read_only() -> None:
    evalset = _evalset()
    with pytest.raises(ValueError):
        evalset.x[0, 0] = 1.0


# -- eval_slice ---------------------------------------------------------------------------


def _imbalanced(n_per_class: tuple[int, ...]) -> EvalSet:
    y = np.concatenate([np.full(n, label, np.int64) for label, n in enumerate(n_per_class)])
    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1)
    return EvalSet(x=x, y=y)


def test_eval_slice_is_bounded_stratified_and_ordered() -> None:
    evalset = _imbalanced((500, 300, 150, 45, 5))
    sliced = eval_slice(evalset, max_samples=100, seed=3)
    assert len(sliced) == 100
    counts = sliced.class_counts()
    assert set(counts) == {0, 1, 2, 3, 4}  # the rare class survives
    assert counts[0] > counts[1] > counts[2] > counts[3] >= counts[4] >= 1
    assert abs(counts[0] - 50) <= 2 and abs(counts[1] - 30) <= 2
    assert np.all(np.diff(sliced.x[:, 0]) > 0)  # original order, no duplicates
    np.testing.assert_array_equal(evalset.y[sliced.x[:, 0].astype(int)], sliced.y)


def test_eval_slice_is_deterministic_per_seed() -> None:
    evalset = _imbalanced((60, 60, 60))
    first, again, other = (eval_slice(evalset, 30, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(first.x, again.x)
    assert not np.array_equal(first.x, other.x)
    assert first.class_counts() == {0: 10, 1: 10, 2: 10}


def test_eval_slice_small_sets_and_tiny_budgets() -> None:
    evalset = _evalset(n=30)
    assert eval_slice(evalset, max_samples=200) is evalset
    assert len(eval_slice(_imbalanced((10, 10, 10, 10)), max_samples=2)) == 2
    with pytest.raises(UserInputError, match="at least 1 sample"):
        eval_slice(evalset, max_samples=0)


def test_quantization_parse() -> None:
    assert Quantization.parse(" INT8 ") is Quantization.INT8
    with pytest.raises(UserInputError, match="choose one of: float32, dynamic_range, float16, int8"):
        Quantization.parse("int4")


def test_the_host_benchmark_length_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.compression import BENCHMARK_SECONDS_VARIABLE, host_benchmark_settings
    from shared.benchmark import BenchmarkSettings

    monkeypatch.delenv(BENCHMARK_SECONDS_VARIABLE, raising=False)
    assert host_benchmark_settings() == BenchmarkSettings()
    monkeypatch.setenv(BENCHMARK_SECONDS_VARIABLE, "0.2")
    assert (host_benchmark_settings().min_seconds, host_benchmark_settings().warmup_seconds) == (0.2, 0.1)
    for bad in ("0", "-1", "soon", "nan", "1e9"):
        monkeypatch.setenv(BENCHMARK_SECONDS_VARIABLE, bad)
        with pytest.raises(UserInputError, match="EDGEFLEET_BENCHMARK_SECONDS=.*expected seconds between 0 and 600"):
            host_benchmark_settings()
