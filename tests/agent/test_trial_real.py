"""shared.trial.run_trial against the real interpreter in a real child process: no mocks.

A tiny Keras classifier (4 features, 3 classes) is built and converted to
.tflite once per module; the eval set is written as the server writes it
(npz with float32 ``x`` and integer ``y``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.trial import TrialRequest, TrialResult, run_trial

FEATURES, CLASSES, SAMPLES = 4, 3, 60
MiB = 1024 * 1024
TIMEOUT = 120.0  # generous: the child imports numpy and the interpreter, on a busy 2-core CI box
MEMORY_MB = 2048


@pytest.fixture(scope="module")
def tflite_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(FEATURES,)),
            tf.keras.layers.Dense(8, activation="relu"),
            tf.keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    path = tmp_path_factory.mktemp("trial") / "model.tflite"
    path.write_bytes(flatbuffer)
    return path


@pytest.fixture
def eval_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "eval.npz"
    np.savez(
        path,
        x=rng.random((SAMPLES, FEATURES), dtype=np.float32),
        y=(np.arange(SAMPLES) % CLASSES).astype(np.int64),
    )
    return path


def request(model: Path, eval_path: Path, **overrides: Any) -> TrialRequest:
    fields: dict[str, Any] = {
        "model_path": str(model),
        "eval_path": str(eval_path),
        "threads": 1,
        "runtime": "",
        "warmup_runs": 1,
        "warmup_seconds": 0.0,
        "min_runs": 50,
        "min_seconds": 0.2,
        "memory_limit_mb": MEMORY_MB,
    }
    fields.update(overrides)
    return TrialRequest(**fields)


def trial(req: TrialRequest, timeout: float = TIMEOUT) -> TrialResult:
    return run_trial(req, timeout=timeout)


def test_a_real_model_passes_with_full_benchmark_numbers(tflite_model: Path, eval_npz: Path) -> None:
    result = trial(request(tflite_model, eval_npz))

    assert result.ok, result.error
    assert result.error == "" and result.load_error is False
    bench = result.benchmark
    assert bench is not None
    assert bench.runs >= 50
    assert bench.warmup_runs >= 1
    assert bench.threads == 1
    assert bench.runtime.startswith("ai-edge-litert")
    assert 0 < bench.min_ms <= bench.p50_ms <= bench.p90_ms <= bench.p95_ms <= bench.p99_ms <= bench.max_ms
    assert bench.min_ms <= bench.mean_ms <= bench.max_ms
    assert bench.std_ms >= 0 and bench.init_ms > 0 and bench.first_ms > 0
    assert bench.peak_rss_bytes > 1_000_000
    assert result.accuracy is not None and 0.0 <= result.accuracy <= 1.0
    assert result.samples == SAMPLES


def test_a_garbage_model_is_a_load_error_not_an_exception(tmp_path: Path, eval_npz: Path) -> None:
    garbage = tmp_path / "model.tflite"
    garbage.write_bytes(b"this is not a flatbuffer" * 10)

    result = trial(request(garbage, eval_npz))

    assert result.ok is False
    assert result.load_error is True
    assert "cannot load model.tflite" in result.error
    assert result.benchmark is None and result.accuracy is None


def test_a_missing_model_file_is_a_load_error(tmp_path: Path, eval_npz: Path) -> None:
    result = trial(request(tmp_path / "nope.tflite", eval_npz))
    assert result.ok is False and result.load_error is True
    assert "nope.tflite" in result.error


def test_a_trial_over_its_time_limit_is_cut_off(tflite_model: Path, eval_npz: Path) -> None:
    result = trial(request(tflite_model, eval_npz), timeout=0.01)
    assert result.ok is False
    assert "timed out" in result.error
    assert result.load_error is False


def test_an_eval_set_without_labels_fails_the_trial(tflite_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    np.savez(path, x=np.zeros((5, FEATURES), dtype=np.float32))
    result = trial(request(tflite_model, path))
    assert result.ok is False
    assert result.load_error is False
    assert "eval set unreadable" in result.error and "y" in result.error


def test_an_eval_set_that_is_not_npz_fails_the_trial(tflite_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    path.write_bytes(b"just some text, not an array file")
    result = trial(request(tflite_model, path))
    assert result.ok is False and result.load_error is False
    assert result.error.startswith("eval set unreadable")


@pytest.mark.parametrize("content", [b"PK\x03\x04 truncated zip", b""], ids=["corrupt-zip", "empty"])
def test_a_corrupt_eval_set_is_reported_as_unreadable(content: bytes, tflite_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    path.write_bytes(content)
    result = trial(request(tflite_model, path))
    assert result.ok is False
    assert result.error.startswith("eval set unreadable")


def test_an_eval_set_of_the_wrong_shape_fails_without_crashing(tflite_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "eval.npz"
    np.savez(path, x=np.zeros((5, FEATURES + 3), dtype=np.float32), y=np.zeros(5, dtype=np.int64))
    result = trial(request(tflite_model, path))
    assert result.ok is False
    assert "reshape" in result.error
    assert result.load_error is False  # the model loads; the data is wrong


def write_tile_model(path: Path, tensor_mib: int) -> Path:
    """A tiny file whose graph asks for an intermediate tensor of ``tensor_mib`` MiB (a tile of its input),
    and as much again for its reshape."""
    from tests.attacks.hostile_models import tile_flatbuffer

    path.write_bytes(tile_flatbuffer(tensor_mib))
    return path


@pytest.fixture(scope="module")
def huge_tensor_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny file whose graph asks for a 4 GiB intermediate tensor."""
    return write_tile_model(tmp_path_factory.mktemp("huge") / "huge.tflite", 4096)


def test_a_model_that_needs_more_memory_than_the_limit_is_an_oom_with_numbers(
    huge_tensor_model: Path, eval_npz: Path
) -> None:
    """It used to meet the address-space cap inside the interpreter and come back as a load_error
    (which the server counts against the runtime), or with an empty message."""
    result = trial(request(huge_tensor_model, eval_npz, memory_limit_mb=1024))
    assert result.ok is False
    assert result.oom is True and result.load_error is False
    assert result.error.startswith("huge.tflite has a tensor of 4,096 MiB, more than the ")
    assert result.error.endswith(" MiB this trial may use")
    assert result.reason.startswith("oom: ")


def test_a_limit_below_what_the_runtime_itself_needs_is_an_oom(tflite_model: Path, eval_npz: Path) -> None:
    result = run_trial(request(tflite_model, eval_npz, memory_limit_mb=8), timeout=TIMEOUT)
    assert result.ok is False and result.oom is True
    assert result.error == "the runtime alone uses more than the trial's limit of 8 MiB"


def test_the_limit_caps_what_the_child_can_allocate(tmp_path: Path) -> None:
    """The cap is the child's address space now plus what the limit leaves beyond its resident memory:
    100 MiB more fits in a 300 MiB limit, 400 MiB more does not (a MemoryError, not the OOM killer)."""
    import subprocess
    import sys

    script = (
        "from shared.trial_child import _limit_memory\n"
        "budget = _limit_memory(300 * 1024 * 1024)\n"
        "fits = bytearray(100 * 1024 * 1024)\n"
        "try:\n"
        "    bytearray(400 * 1024 * 1024)\n"
        "    print('allocated', budget)\n"
        "except MemoryError:\n"
        "    print('refused', budget)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    verdict, budget = proc.stdout.split()
    assert verdict == "refused"
    assert 200 * 1024 * 1024 < int(budget) < 300 * 1024 * 1024  # the limit less the interpreter's own memory


# -- the replaced model, measured in the same trial ------------------------------------------------


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose input takes 3 more features: it cannot run on the candidate's eval set."""
    import tensorflow as tf

    model = tf.keras.Sequential([tf.keras.Input(shape=(FEATURES + 3,)), tf.keras.layers.Dense(CLASSES)])
    path = tmp_path_factory.mktemp("wider") / "model.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def test_the_replaced_model_is_measured_on_the_same_samples(tflite_model: Path, eval_npz: Path) -> None:
    result = trial(request(tflite_model, eval_npz, previous_model_path=str(tflite_model)))

    assert result.ok, result.error
    assert result.previous_error == ""
    previous = result.previous_benchmark
    assert previous is not None and result.benchmark is not None
    assert previous.runs >= 50 and previous.threads == result.benchmark.threads
    assert previous.runtime == result.benchmark.runtime
    assert 0 < previous.min_ms <= previous.p50_ms <= previous.p95_ms <= previous.max_ms
    assert previous.peak_rss_bytes > 1_000_000
    # The same model on the same samples: the same predictions, so exactly the same accuracy.
    assert result.previous_accuracy == result.accuracy
    assert result.samples == SAMPLES
    assert result.paired is True  # both fit at once: timed interleaved
    assert result.benchmark.runs >= 50 and result.benchmark.warmup_runs >= 1


def test_the_comparison_keeps_the_candidates_own_load_time_first_run_and_peak_memory(
    tflite_model: Path, eval_npz: Path
) -> None:
    """The child's two lines: the candidate alone, then with the latency of its interleaved runs beside the
    replaced model. Its load time, first run and peak memory (the memory gate's) stay the solo run's."""
    import subprocess
    import sys
    from dataclasses import asdict

    from shared.codec import decode
    from shared.trial import PREVIOUS_NOT_MEASURED

    req = request(tflite_model, eval_npz, previous_model_path=str(tflite_model), min_runs=200, min_seconds=0.0)
    proc = subprocess.run([sys.executable, "-m", "shared.trial_child"], input=json.dumps(asdict(req)), text=True,
                          capture_output=True, timeout=TIMEOUT, check=True, cwd=Path(__file__).resolve().parents[2])
    alone, compared = (decode(TrialResult, json.loads(line)) for line in proc.stdout.splitlines())

    assert alone.previous_error == PREVIOUS_NOT_MEASURED and alone.paired is False
    assert compared.paired is True and compared.previous_error == ""
    assert alone.benchmark is not None and compared.benchmark is not None and compared.previous_benchmark is not None
    solo, paired = alone.benchmark, compared.benchmark
    assert (paired.init_ms, paired.first_ms, paired.peak_rss_bytes) == (solo.init_ms, solo.first_ms,
                                                                          solo.peak_rss_bytes)
    # The latency is the interleaved runs', timed again (equal to the solo numbers to 0.1 us in all eight
    # statistics only by a coincidence no machine produces).
    assert paired.runs >= 200 and compared.previous_benchmark.runs >= 200
    latency = ("mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms")
    assert [getattr(paired, name) for name in latency] != [getattr(solo, name) for name in latency]
    assert (compared.accuracy, compared.samples) == (alone.accuracy, alone.samples)


@pytest.fixture(scope="module")
def big_tensor_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that needs 128 MiB of tensors: one fits in a 240 MiB trial beside the runtime, two do not."""
    return write_tile_model(tmp_path_factory.mktemp("big") / "big.tflite", 64)


@pytest.mark.parametrize(("memory_limit_mb", "paired"), [(1024, True), (240, False)], ids=["both-fit", "one-fits"])
def test_a_replaced_model_that_does_not_fit_beside_the_candidate_is_timed_alone_after_it(
    memory_limit_mb: int, paired: bool, big_tensor_model: Path, eval_npz: Path
) -> None:
    result = trial(request(big_tensor_model, eval_npz, previous_model_path=str(big_tensor_model), min_runs=5,
                           min_seconds=0.0, memory_limit_mb=memory_limit_mb))

    assert result.ok, result.error
    assert result.paired is paired
    assert result.previous_error == ""
    assert result.benchmark is not None and result.previous_benchmark is not None
    assert result.benchmark.runs >= 5 and result.previous_benchmark.runs >= 5
    assert result.previous_accuracy == result.accuracy


def test_without_a_replaced_model_nothing_is_compared(tflite_model: Path, eval_npz: Path) -> None:
    result = trial(request(tflite_model, eval_npz))
    assert result.ok
    assert (result.previous_benchmark, result.previous_accuracy, result.previous_error) == (None, None, "")


def test_a_replaced_model_with_another_input_shape_leaves_the_candidates_result_standing(
    tflite_model: Path, wider_model: Path, eval_npz: Path
) -> None:
    alone = trial(request(tflite_model, eval_npz))
    result = trial(request(tflite_model, eval_npz, previous_model_path=str(wider_model)))

    assert result.ok and result.error == ""
    assert result.benchmark is not None and result.accuracy == alone.accuracy
    assert result.previous_benchmark is None and result.previous_accuracy is None
    assert "cannot reshape" in result.previous_error


@pytest.mark.parametrize("broken", ["garbage", "missing"])
def test_a_replaced_model_that_does_not_load_leaves_the_candidates_result_standing(
    broken: str, tflite_model: Path, eval_npz: Path, tmp_path: Path
) -> None:
    previous = tmp_path / "previous.tflite"
    if broken == "garbage":
        previous.write_bytes(b"not a flatbuffer" * 10)
    result = trial(request(tflite_model, eval_npz, previous_model_path=str(previous)))

    assert result.ok and result.benchmark is not None and result.accuracy is not None
    assert result.previous_benchmark is None and result.previous_accuracy is None
    assert "previous.tflite" in result.previous_error


def test_the_replaced_model_gets_the_same_memory_limit(
    tflite_model: Path, huge_tensor_model: Path, eval_npz: Path
) -> None:
    result = trial(request(tflite_model, eval_npz, memory_limit_mb=1024, previous_model_path=str(huge_tensor_model)))
    assert result.ok and result.benchmark is not None
    assert result.previous_benchmark is None and result.paired is False
    assert result.previous_error.startswith("huge.tflite has a tensor of 4,096 MiB, more than the ")


def test_a_failing_candidate_never_measures_the_replaced_model(tmp_path: Path, tflite_model: Path,
                                                                eval_npz: Path) -> None:
    garbage = tmp_path / "model.tflite"
    garbage.write_bytes(b"junk" * 10)
    result = trial(request(garbage, eval_npz, previous_model_path=str(tflite_model)))
    assert result.ok is False and result.load_error is True
    assert (result.previous_benchmark, result.previous_error) == (None, "")


# -- a child that dies or hangs while the replaced model runs (a stand-in child, no interpreter) -----


def fake_child(tmp_path: Path, then: str) -> str:
    """An executable standing in for ``python -m shared.trial_child``: it prints what the real child prints
    before it measures the replaced model, then does ``then`` (a shell command)."""
    from shared.codec import encode
    from shared.trial import PREVIOUS_NOT_MEASURED
    from tests.agent.material import BENCHMARK

    provisional = TrialResult(ok=True, benchmark=BENCHMARK, accuracy=0.9, samples=SAMPLES,
                              previous_error=PREVIOUS_NOT_MEASURED)
    script = tmp_path / "fake-python"
    line = json.dumps(encode(provisional))
    script.write_text(f"#!/bin/sh\ncat > /dev/null\necho '{line}'\n{then}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    ("then", "timeout", "reason"),
    [
        ("kill -9 $$", TIMEOUT, "the trial process was killed (SIGKILL)"),
        ("echo 'Segmentation fault' >&2; exit 139", TIMEOUT, "trial process died with exit code 139"),
        ("sleep 30", 1.0, "trial timed out after 1 s"),
    ],
    ids=["killed", "crashed", "timed-out"],
)
def test_a_child_lost_while_measuring_the_replaced_model_keeps_the_candidates_result(
    then: str, timeout: float, reason: str, tmp_path: Path
) -> None:
    from shared.trial import PREVIOUS_NOT_MEASURED, start_trial

    python = fake_child(tmp_path, then)
    result = start_trial(request(tmp_path / "m", tmp_path / "e", previous_model_path="p"), timeout=timeout,
                         python=python).wait()

    assert result.ok and result.accuracy == 0.9 and result.benchmark is not None
    assert result.previous_benchmark is None and result.previous_accuracy is None
    assert result.previous_error.startswith(f"{PREVIOUS_NOT_MEASURED}: ")
    assert reason in result.previous_error


def test_a_child_lost_before_the_candidates_result_is_a_failed_trial(tmp_path: Path) -> None:
    from shared.trial import start_trial

    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\ncat > /dev/null\nkill -9 $$\n")
    script.chmod(0o755)
    result = start_trial(request(tmp_path / "m", tmp_path / "e", previous_model_path="p"), timeout=TIMEOUT,
                         python=str(script)).wait()
    assert result.ok is False and result.oom is True
    assert result.previous_error == ""
