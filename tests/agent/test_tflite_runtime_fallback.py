"""The tflite-runtime fallback, for real, in its own venv (it needs numpy<2).

The agent's runtime adapter prefers LiteRT; on a device with only
``tflite_runtime`` it must fall back to it, run the models it can, and report
a model it cannot load (tflite-runtime 2.14 lacks FULLY_CONNECTED v12, which
TF 2.21's dynamic-range conversion emits) as a ``load_error``, not a crash.
The venv is built once under ``.venv-tflite-runtime`` (git-ignored) and reused.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server.compress.convert import convert
from server.compress.digits import train_digits_cnn
from server.compress.evalset import EvalSet, eval_slice, write_eval_file
from server.compress.quantization import Quantization
from shared.trial import TrialRequest, TrialResult, run_trial
from tests.tflite_runtime_env import ROOT, tflite_runtime_python


@pytest.fixture(scope="module")
def fallback_python() -> str:
    return tflite_runtime_python()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, EvalSet, Path]:
    model, test = train_digits_cnn(epochs=4)
    return model, test, write_eval_file(eval_slice(test), tmp_path_factory.mktemp("eval") / "eval.npz")


def trial_with(python: str, model_path: Path, eval_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrialResult:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the project's code, not installed in that venv
    return run_trial(
        TrialRequest(model_path=str(model_path), eval_path=str(eval_path), threads=1, runtime="", warmup_runs=1,
                     warmup_seconds=0.0, min_runs=50, min_seconds=0.1),
        timeout=120, python=python,
    )


def test_the_adapter_falls_back_to_tflite_runtime(fallback_python: str) -> None:
    script = "import json; from shared.interpreter import runtime_info as r; i = r(); print(json.dumps([i.name, i.version]))"
    probe = subprocess.run(
        [fallback_python, "-c", script],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert json.loads(probe.stdout) == ["tflite-runtime", "2.14.0"]


@pytest.mark.parametrize("quantization", [Quantization.INT8, Quantization.FLOAT32, Quantization.FLOAT16])
def test_tflite_runtime_runs_int8_float32_and_float16(
    fallback_python: str, digits: tuple[Any, EvalSet, Path], quantization: Quantization, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, test, eval_path = digits
    path = tmp_path / f"{quantization.value}.tflite"
    path.write_bytes(convert(model, quantization, test.x))
    result = trial_with(fallback_python, path, eval_path, monkeypatch)
    assert result.ok, result.error
    assert result.benchmark is not None and result.benchmark.runtime == "tflite-runtime 2.14.0"
    assert result.accuracy is not None and result.accuracy >= 0.9


def test_an_op_version_tflite_runtime_lacks_is_a_load_error(
    fallback_python: str, digits: tuple[Any, EvalSet, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, test, eval_path = digits
    path = tmp_path / "dynamic_range.tflite"
    path.write_bytes(convert(model, Quantization.DYNAMIC_RANGE, test.x))
    result = trial_with(fallback_python, path, eval_path, monkeypatch)
    assert not result.ok
    assert result.load_error is True
    assert "tflite-runtime 2.14.0 cannot load" in result.error
