"""Converting the next plain candidate while the current one is measured: same variants, one conversion at
a time, and only where there are cores to spare."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from server.compress import ahead
from server.compress.digits import train_digits_cnn
from server.compress.pipeline import CompressionInputs, ProfileGoal, compress_for_profile
from server.compress.quantization import Quantization
from server.compress.recipes import parse_recipe
from server.compress.sources import KerasSource
from shared.benchmark import BenchmarkSettings

RECIPES = [parse_recipe(r) for r in ("float32", "int8", "float16", "dynamic_range")]
QUICK = BenchmarkSettings(warmup_runs=1, warmup_seconds=0.0, min_runs=5, min_seconds=0.01)
GOAL = ProfileGoal(name="p", preferred=Quantization.INT8, objective="latency", accuracy_budget=0.05, threads=1)


@pytest.fixture(scope="module")
def digits() -> tuple[Any, Any]:
    return train_digits_cnn(epochs=2)


def build(digits: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, *, cores: int) -> tuple[list[Any], list[str]]:
    """The variants, and the thread each conversion ran on, with ``cores`` CPUs on the host; conversions
    are also checked never to overlap each other."""
    model, test = digits
    threads: list[str] = []
    running = threading.Lock()
    real = KerasSource.convert

    def convert(self: KerasSource, *args: Any, **kwargs: Any) -> bytes:
        assert running.acquire(blocking=False), "two conversions at once"
        try:
            threads.append(threading.current_thread().name)
            return real(self, *args, **kwargs)
        finally:
            running.release()

    monkeypatch.setattr(KerasSource, "convert", convert)
    monkeypatch.setattr(ahead.os, "cpu_count", lambda: cores)
    _, variants = compress_for_profile(RECIPES, CompressionInputs(model, test, settings=QUICK), GOAL)
    return variants, threads


def test_with_cores_to_spare_the_next_conversion_runs_during_the_measurement(
    digits: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    overlapped, threads = build(digits, monkeypatch, cores=8)
    assert threads[0] == threading.current_thread().name
    assert all(name.startswith("convert-ahead") for name in threads[1:]) and len(threads) == len(RECIPES)
    sequential, alone = build(digits, monkeypatch, cores=2)  # 1 measuring thread + 2 spare > 2 cores
    assert set(alone) == {threading.current_thread().name}
    assert [(v.recipe, v.size_bytes, v.accuracy) for v in overlapped] == \
        [(v.recipe, v.size_bytes, v.accuracy) for v in sequential]


def test_a_conversion_that_fails_ahead_fails_its_own_row(
    digits: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.errors import ModelError

    real = KerasSource.convert

    def convert(self: KerasSource, quantization: Quantization, *args: Any, **kwargs: Any) -> bytes:
        if quantization is Quantization.FLOAT16:
            raise ModelError("TFLite conversion to float16 failed: no")
        return real(self, quantization, *args, **kwargs)

    monkeypatch.setattr(KerasSource, "convert", convert)
    monkeypatch.setattr(ahead.os, "cpu_count", lambda: 8)
    model, test = digits
    _, variants = compress_for_profile(RECIPES, CompressionInputs(model, test, settings=QUICK), GOAL)
    verdicts = {v.recipe: (v.verdict, v.reason) for v in variants}
    assert verdicts["float16"] == ("failed", "TFLite conversion to float16 failed: no")
    assert all(verdict != "failed" for recipe, (verdict, _) in verdicts.items() if recipe != "float16")
