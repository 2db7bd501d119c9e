"""PyTorch models in, for real: a CNN trained in the torch venv, exported with torch.export, converted by
litert-torch and quantized by ai-edge-quantizer in the worker, run by the agents' interpreter."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.cli import cli
from server.compress.evalset import EvalSet, load_eval_file
from server.compress.quantization import Quantization
from server.compress.sources import open_source
from server.compress.torch_source import PYTHON_VARIABLE, QUANTIZATIONS, TorchSource
from server.compression import recipes_for
from server.db.models import Profile
from server.setup import init_data_dir
from shared.errors import RuntimeMissingError, UserInputError
from shared.interpreter import TFLiteModel, predict_classes
from tests.torch_env import TorchDigits, torch_python, train_torch_digits


@pytest.fixture(scope="module")
def torch_env() -> Iterator[str]:
    python = torch_python()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PYTHON_VARIABLE, python)
        yield python


@pytest.fixture(scope="module")
def digits(torch_env: str, tmp_path_factory: pytest.TempPathFactory) -> TorchDigits:
    return train_torch_digits(tmp_path_factory.mktemp("torch"))


@pytest.fixture(scope="module")
def source(digits: TorchDigits) -> TorchSource:
    opened = open_source(digits.program)
    assert isinstance(opened, TorchSource)
    return opened


@pytest.fixture(scope="module")
def evalset(digits: TorchDigits) -> EvalSet:
    return load_eval_file(digits.eval)


def test_a_pt2_program_opens_with_its_nchw_input_and_classes(source: TorchSource) -> None:
    assert (source.kind, source.input_shape, source.num_classes) == ("torch", (1, 8, 8), 10)
    assert source.keras_model is None  # nothing to retrain: pruning and distillation need Keras


def test_host_predictions_are_the_pytorch_models_own(source: TorchSource, digits: TorchDigits) -> None:
    sliced = load_eval_file(digits.eval.with_name("digits-slice-nchw.npz"))
    accuracy = float(np.mean(source.predict_classes(sliced) == sliced.y))
    assert accuracy == pytest.approx(digits.accuracy, abs=1e-9)  # the worker ran torch, not a conversion
    assert accuracy >= 0.9


@pytest.fixture(scope="module")
def torch_accuracy(source: TorchSource, evalset: EvalSet) -> float:
    return float(np.mean(source.predict_classes(evalset) == evalset.y))


@pytest.mark.parametrize("quantization", QUANTIZATIONS, ids=lambda q: q.value)
def test_every_quantization_runs_in_the_agents_interpreter_close_to_pytorch(
    source: TorchSource, evalset: EvalSet, torch_accuracy: float, quantization: Quantization, tmp_path: Path
) -> None:
    flatbuffer = source.convert(quantization, evalset.x)
    path = tmp_path / f"{quantization.value}.tflite"
    path.write_bytes(flatbuffer)
    model = TFLiteModel(str(path))
    expected_input = {Quantization.INT8: "int8", Quantization.INT16X8: "int16"}.get(quantization, "float32")
    assert str(model.input_dtype) == expected_input
    accuracy = float(np.mean(np.asarray(predict_classes(model, evalset.x)) == evalset.y))
    assert accuracy >= torch_accuracy - 0.01
    if quantization is not Quantization.FLOAT32:
        assert len(flatbuffer) < 0.6 * len(source.convert(Quantization.FLOAT32, evalset.x))


def test_a_quantization_ai_edge_quantizer_cannot_make_names_the_ones_it_can(
    source: TorchSource, evalset: EvalSet
) -> None:
    with pytest.raises(UserInputError, match="int8_float_io is not available for a PyTorch model; use one of: "
                                             "float32, float16, dynamic_range, int8, int16x8"):
        source.convert(Quantization.INT8_FLOAT_IO, evalset.x)


def test_auto_builds_only_what_a_pytorch_model_can_be(source: TorchSource) -> None:
    profile = Profile(name="p", quantization="int8_float_io", quantizations="int8_float_io,int8,float32", threads=1)
    assert [str(r) for r in recipes_for(profile, None, source=source, has_train=True)] == ["int8", "float32"]
    only = Profile(name="q", quantization="int8_float_io", quantizations="int8_float_io", threads=1)
    with pytest.raises(UserInputError, match="profile q allows only int8_float_io, which a torch model cannot"):
        recipes_for(only, None, source=source, has_train=False)


def test_a_file_that_is_not_a_program_is_a_clear_error(torch_env: str, tmp_path: Path) -> None:
    bogus = tmp_path / "model.pt2"
    bogus.write_bytes(b"not a zip at all")
    with pytest.raises(UserInputError, match=r"model.pt2 is not a torch.export program \(save one with"):
        open_source(bogus)


def test_without_torch_the_error_names_the_extra(digits: TorchDigits, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PYTHON_VARIABLE, sys.executable)  # the server venv: no torch in it
    with pytest.raises(RuntimeMissingError, match=r"pip install 'edgefleet\[torch\]'.*EDGEFLEET_TORCH_PYTHON"):
        open_source(digits.program)
    monkeypatch.setenv(PYTHON_VARIABLE, "/nonexistent/python")
    with pytest.raises(RuntimeMissingError, match="EDGEFLEET_TORCH_PYTHON=/nonexistent/python does not exist"):
        open_source(digits.program)


def test_model_add_takes_a_pt2_and_a_missing_torch_is_one_line(
    digits: TorchDigits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    args = ["model", "add", "tdigits", "--file", str(digits.program), "--eval", str(digits.eval),
            "--data-dir", str(data_dir)]
    added = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert added.exit_code == 0, added.output
    assert "tdigits:1  (10 classes" in added.output
    monkeypatch.setenv(PYTHON_VARIABLE, os.fspath(sys.executable))
    failed = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert failed.exit_code != 0
    assert "edgefleet[torch]" in failed.output and "Traceback" not in failed.output
