"""The three input formats: Keras, a SavedModel directory, and a prebuilt .tflite passed through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from server.compress.convert import convert, predict_classes
from server.compress.digits import train_digits_cnn
from server.compress.evalset import EvalSet, write_eval_file
from server.compress.quantization import Quantization
from server.compress.sources import PrebuiltSource, SavedModelSource, open_source, pack_source, unpack_source
from server.setup import init_data_dir
from shared.errors import UserInputError


@pytest.fixture(scope="module")
def digits() -> tuple[Any, EvalSet]:
    return train_digits_cnn(epochs=4)


@pytest.fixture(scope="module")
def saved_model(digits: tuple[Any, EvalSet], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = digits
    directory = tmp_path_factory.mktemp("exported") / "digits_savedmodel"
    model.export(str(directory), verbose=False)
    return directory


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_saved_model_predicts_and_converts_like_its_keras_model(
    digits: tuple[Any, EvalSet], saved_model: Path
) -> None:
    model, test = digits
    source = open_source(saved_model)
    assert isinstance(source, SavedModelSource)
    assert (source.input_shape, source.num_classes) == ((8, 8, 1), 10)
    np.testing.assert_array_equal(source.predict_classes(test), predict_classes(model, test))
    assert source.keras_model is None
    flatbuffer = source.convert(Quantization.INT8, test.x)
    assert len(flatbuffer) < 0.35 * len(convert(model, Quantization.FLOAT32, test.x))


def test_saved_model_directories_pack_deterministically_and_unpack(saved_model: Path, tmp_path: Path) -> None:
    packed, name = pack_source(saved_model)
    assert pack_source(saved_model) == (packed, name)
    assert name == "digits_savedmodel.savedmodel.tar"
    restored = unpack_source(packed, name, tmp_path)
    assert (restored / "saved_model.pb").read_bytes() == (saved_model / "saved_model.pb").read_bytes()
    assert isinstance(open_source(restored), SavedModelSource)


def test_a_directory_that_is_not_a_saved_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="not a TensorFlow SavedModel"):
        open_source(tmp_path)


def test_a_prebuilt_tflite_is_read_and_never_reconverted(digits: tuple[Any, EvalSet], tmp_path: Path) -> None:
    model, test = digits
    path = tmp_path / "digits-int8.tflite"
    path.write_bytes(convert(model, Quantization.INT8, test.x))
    source = open_source(path)
    assert isinstance(source, PrebuiltSource)
    assert (source.input_shape, source.num_classes) == ((8, 8, 1), 10)
    assert source.convert(Quantization.PREBUILT, test.x) == path.read_bytes()
    with pytest.raises(UserInputError, match="ships as it is"):
        source.convert(Quantization.INT8, test.x)
    assert np.mean(source.predict_classes(test) == test.y) > 0.9


def test_model_add_and_build_for_every_format(
    digits: tuple[Any, EvalSet], saved_model: Path, tmp_path: Path
) -> None:
    model, test = digits
    data = init_data_dir(tmp_path / "srv").data_dir.root
    eval_file = write_eval_file(test, tmp_path / "eval.npz")
    prebuilt = tmp_path / "digits-f16.tflite"
    prebuilt.write_bytes(convert(model, Quantization.FLOAT16, test.x))

    for name, file in (("from-savedmodel", saved_model), ("from-tflite", prebuilt)):
        added = run("model", "add", name, "--file", file, "--eval", eval_file, "--data-dir", data)
        assert added.exit_code == 0, added.output
        assert added.output.startswith(f"{name}:1")

    built = run("model", "build", "from-tflite:1", "--profile", "rpi4", "--data-dir", data, "--json")
    assert built.exit_code == 0, built.output
    (report,) = json.loads(built.stdout)
    (variant,) = report["variants"]
    assert (variant["recipe"], variant["chosen"], variant["size_bytes"]) == ("prebuilt", True, prebuilt.stat().st_size)

    refused = run("model", "build", "from-tflite:1", "--profile", "rpi4", "--recipe", "int8", "--data-dir", data)
    assert refused.exit_code == 1 and "shipped as it is" in refused.output

    built = run("model", "build", "from-savedmodel:1", "--profile", "jetson-nano", "--data-dir", data, "--json")
    assert built.exit_code == 0, built.output
    recipes = {v["recipe"]: v for v in json.loads(built.stdout)[0]["variants"]}
    assert set(recipes) == {"float16", "float32"}
    assert sum(v["chosen"] for v in recipes.values()) == 1

    retrain = run("model", "build", "from-savedmodel:1", "--profile", "rpi4", "--recipe", "prune:0.5+int8",
                  "--data-dir", data)
    assert retrain.exit_code == 1 and "retrains the model" in retrain.output


def test_an_eval_set_without_labels_measures_agreement_with_the_float_model(
    digits: tuple[Any, EvalSet], tmp_path: Path
) -> None:
    model, test = digits
    data = init_data_dir(tmp_path / "srv").data_dir.root
    keras_file = tmp_path / "digits.keras"
    model.save(keras_file)
    unlabelled = tmp_path / "inputs-only.npz"
    np.savez(unlabelled, x=test.x)
    added = run("model", "add", "digits", "--file", keras_file, "--eval", unlabelled, "--data-dir", data)
    assert added.exit_code == 0, added.output
    assert "reference accuracy 1.0000" in added.stdout  # the float model agrees with itself
    assert "no labels" in added.stderr

    built = run("model", "build", "digits", "--profile", "rpi4", "--recipe", "int8", "--data-dir", data, "--json")
    (report,) = json.loads(built.stdout)
    assert report["eval_labelled"] is False
    (variant,) = report["variants"]
    assert 0.95 <= variant["accuracy"] <= 1.0 and variant["accuracy"] == variant["agreement"]
    table = run("model", "report", "digits", "--data-dir", data)
    assert "top-1 agreement with the float model" in table.output

    nothing = tmp_path / "nothing.npz"
    np.savez(nothing, images=test.x)
    refused = run("model", "add", "digits", "--file", keras_file, "--eval", nothing, "--data-dir", data)
    assert refused.exit_code == 1 and "no array 'x' or 'y'" in refused.output


@pytest.mark.parametrize("quantization", [Quantization.FLOAT32, Quantization.DYNAMIC_RANGE, Quantization.INT8])
def test_a_keras_source_exports_once_and_converts_to_what_from_keras_model_makes(
    digits: tuple[Any, EvalSet], quantization: Quantization, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.compress import convert as convert_module
    from server.compress import sources
    from server.compress.sources import KerasSource

    model, test = digits
    exports: list[Path] = []
    real = convert_module.export_for_conversion
    monkeypatch.setattr(convert_module, "export_for_conversion", lambda m, d: exports.append(d) or real(m, d))
    monkeypatch.setattr(sources, "EXPORT_ONCE_LAYERS", 1)  # the digits CNN is below the real threshold
    source = KerasSource(model)
    first = source.convert(quantization, test.x)
    assert source.convert(Quantization.FLOAT16, test.x)  # another quantization from the same export
    assert len(exports) == 1
    # The same graph and weights; only the conversion metadata's model type differs (saved model, not Keras).
    reference = convert(model, quantization, test.x)
    assert len(first) == len(reference)
    assert sum(a != b for a, b in zip(first, reference)) == 1


def test_a_small_keras_model_converts_straight_from_keras(
    digits: tuple[Any, EvalSet], monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.compress import convert as convert_module
    from server.compress.sources import KerasSource

    model, test = digits
    monkeypatch.setattr(convert_module, "export_for_conversion", lambda *_: pytest.fail("exported"))
    assert KerasSource(model).convert(Quantization.FLOAT32, test.x) == convert(model, Quantization.FLOAT32, test.x)
