"""Compression benchmark: every recipe on three models, measured the way the product measures.

    python bench/compression.py [--quick] [--skip-imagenet] [--skip-torch]

(a) a digits CNN trained here (scikit-learn's bundled digits), with training
    data, so the retraining steps (pruning, distillation, low-rank) run too,
    and a small residual net on the same data (neuron/filter pruning next to
    a residual add);
(b) a PyTorch CNN trained on the same data in the torch venv
    (``tests/torch_env.py``, ``EDGEFLEET_TORCH_PYTHON``), exported with
    torch.export, converted by litert-torch and quantized by ai-edge-quantizer;
(c) keras.applications MobileNetV2 (alpha 0.35, 96x96) and EfficientNetB0
    (224x224), weights=None (nothing is downloaded): size and latency only;
    their "accuracy" is top-1 agreement with their own float32 model on
    random inputs.

Each variant is built by ``server.compress.pipeline.build_variant`` and
measured in a child process with LiteRT and the benchmark_model-style timing
the agents use (one thread). Ratios are against float32 measured in the same
run. Prints one table, then the build times of the plain quantizations with the model exported to a
SavedModel once (``KerasSource``) against once per candidate (``from_keras_model``, as before), and with
the next conversion overlapping the current measurement (forced on, whatever the cores), in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.tables import markdown_table
from server.compress import ahead
from server.compress.evalset import EvalSet
from server.compress.pipeline import (
    CompressionInputs,
    ProfileGoal,
    VariantReport,
    build_variant,
    compress_for_profile,
    float_reference,
)
from server.compress.quantization import Quantization
from server.compress.recipes import parse_recipe
from server.compress.sources import KerasSource
from server.native_output import native_stderr_to_log
from shared.benchmark import BenchmarkSettings

QUANTIZATIONS = ["float32", "dynamic_range", "float16", "int8", "int8_float_io", "int16x8"]
DIGITS_RECIPES = QUANTIZATIONS + [
    "prune:0.5+float32", "prune:0.8+float32", "prune:0.5+int8", "prune:0.8+int8", "prune24+int8",
    "prune-units:0.5+float32", "prune-units:0.5+int8",
    "distill:0.5+float32", "distill:0.5+int8", "lowrank:0.5+float32", "lowrank:0.5+int8",
]
IMAGENET_RECIPES = ["float32", "dynamic_range", "float16", "int8", "int16x8"]


def digits_case(epochs: int) -> tuple[str, CompressionInputs, list[str]]:
    from server.compress.digits import digits_split, train_digits_cnn

    model, test = train_digits_cnn(epochs=epochs)
    train, _ = digits_split()
    return "digits CNN", CompressionInputs(model, test, train, epochs=3), DIGITS_RECIPES


RESNET_RECIPES = ["float32", "int8", "prune-units:0.5+float32", "prune-units:0.5+int8"]


def resnet_case(epochs: int) -> tuple[str, CompressionInputs, list[str]]:
    from server.compress.digits import digits_split, train_digits_resnet

    model, test = train_digits_resnet(epochs=epochs)
    train, _ = digits_split()
    return "digits ResNet", CompressionInputs(model, test, train, epochs=3), RESNET_RECIPES


TORCH_RECIPES = ["float32", "dynamic_range", "float16", "int8", "int16x8"]


def torch_case(work: Path) -> tuple[str, CompressionInputs, list[str]]:
    from server.compress.evalset import load_eval_file
    from server.compress.torch_source import PYTHON_VARIABLE, TorchSource
    from tests.torch_env import torch_python, train_torch_digits

    os.environ.setdefault(PYTHON_VARIABLE, torch_python())
    digits = train_torch_digits(work)
    inputs = CompressionInputs(TorchSource(digits.program), load_eval_file(digits.eval), load_eval_file(digits.train))
    return "digits CNN (PyTorch)", inputs, TORCH_RECIPES


def imagenet_case(name: str, samples: int) -> tuple[str, CompressionInputs, list[str]]:
    import keras

    keras.utils.set_random_seed(0)
    if name == "MobileNetV2":
        model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=1000)
        shape = (96, 96, 3)
    else:
        model = keras.applications.EfficientNetB0(input_shape=(224, 224, 3), weights=None, classes=1000)
        shape = (224, 224, 3)
    x = np.random.default_rng(0).random((samples, *shape), dtype=np.float32)
    # No labels: use the float model's own top-1, so "accuracy" reads as agreement with float32.
    y = np.argmax(model.predict(x, verbose=0), axis=-1).astype(np.int64)
    label = f"{name} (random inputs)"
    return label, CompressionInputs(model, EvalSet(x=x, y=y)), IMAGENET_RECIPES


class ExportEveryTime(KerasSource):
    """The baseline for build times: ``TFLiteConverter.from_keras_model`` for every candidate, which exports the
    model to a SavedModel again each time (what a build did before ``KerasSource`` exported once)."""

    def convert(self, quantization: Quantization, representative_x: np.ndarray, *, sparse_encoding: bool = False
                ) -> bytes:
        from server.compress.convert import convert

        return convert(self.model, quantization, representative_x, sparse_encoding=sparse_encoding)


def build_seconds(source: KerasSource, evalset: EvalSet, recipes: list[str], settings: BenchmarkSettings, *,
                  overlap: bool) -> tuple[float, float]:
    """(seconds converting, seconds for the whole build) of every recipe from a fresh source, built as
    ``model build`` builds a profile's candidates, with the next conversion overlapping the current
    measurement or not (whatever the host's cores)."""
    inputs = CompressionInputs(source, evalset, settings=settings)
    float_reference(inputs)
    converting = 0.0
    real = source.convert

    def timed(*args: object, **kwargs: object) -> bytes:
        nonlocal converting
        started = time.monotonic()
        try:
            return real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            converting += time.monotonic() - started

    source.convert = timed  # type: ignore[method-assign]
    spare = ahead.SPARE_CORES
    ahead.SPARE_CORES = -1000 if overlap else 1000
    goal = ProfileGoal(name="bench", preferred=Quantization.INT8, accuracy_budget=1.0)
    started = time.monotonic()
    try:
        with native_stderr_to_log("build times"):
            compress_for_profile([parse_recipe(r) for r in recipes], inputs, goal)
    finally:
        ahead.SPARE_CORES = spare
    return converting, time.monotonic() - started


def print_build_times(cases: list[tuple[str, CompressionInputs, list[str]]], settings: BenchmarkSettings) -> None:
    rows = []
    for label, inputs, recipes in cases:
        plain = [r for r in recipes if not parse_recipe(r).transforms]
        model, evalset = inputs.source.keras_model, inputs.evalset
        before = build_seconds(ExportEveryTime(model), evalset, plain, settings, overlap=False)
        once = build_seconds(KerasSource(model), evalset, plain, settings, overlap=False)
        both = build_seconds(KerasSource(model), evalset, plain, settings, overlap=True)
        rows.append([label, str(len(plain)), f"{before[0]:.1f}", f"{once[0]:.1f}", f"{once[0] / before[0]:.2f}x",
                     f"{before[1]:.1f}", f"{once[1]:.1f}", f"{once[1] / before[1]:.2f}x", f"{both[1]:.1f}",
                     f"{both[1] / before[1]:.2f}x"])
    print("\nbuild times of the plain quantizations (convert and measure each), one run each way:\n")
    print(markdown_table(["model", "candidates", "convert s, export each time", "convert s, export once", "ratio",
                          "build s, export each time", "build s, export once", "ratio",
                          "build s, once + overlapped", "ratio"], rows))


def run_case(label: str, inputs: CompressionInputs, recipes: list[str], work: Path) -> list[tuple[str, VariantReport]]:
    float_reference(inputs)
    rows = []
    for text in recipes:
        started = time.monotonic()
        with native_stderr_to_log(f"{label} {text}"):
            report = build_variant(parse_recipe(text), inputs, work)
        print(f"  {label:28} {text:22} {time.monotonic() - started:6.1f} s  {report.reason}", file=sys.stderr)
        rows.append((label, report))
    return rows


def print_table(rows: list[tuple[str, VariantReport]], references: dict[str, float]) -> None:
    base: dict[str, VariantReport] = {label: r for label, r in rows if r.recipe == "float32"}
    header = ["model", "variant", "bytes", "vs f32", "gzip bytes", "p50 ms", "vs f32", "p95 ms", "accuracy",
              "delta", "XNNPACK", "notes"]
    lines = []
    for label, r in rows:
        b = base.get(label)
        if r.size_bytes is None:
            lines.append([label, r.recipe, "failed", "", "", "", "", "", "", "", "", r.reason[:90]])
            continue
        notes = []
        if "zero_fraction" in r.details:
            notes.append(f"zeros {r.details['zero_fraction']:.2f}")
        encoding = str(r.details.get("encoding", ""))
        if "did not delegate" in encoding or "XNNPACK could not run" in encoding:
            notes.append("dense (XNNPACK could not run the sparse encoding: fell back)")
        elif "saved nothing" in encoding:
            notes.append("dense (sparse no smaller)")
        elif encoding:
            notes.append(encoding.split(" (")[0] + " encoding")
        if "student_params" in r.details:
            notes.append(f"params {r.details['teacher_params']}->{r.details['student_params']}")
        if "units" in r.details:
            notes.append(f"params {b.details.get('params') if b else '?'}->{r.details.get('params')}; units "
                         + ",".join(v.split("/")[0] for v in r.details["units"].values()))
        if "ranks" in r.details:
            notes.append("ranks " + ",".join(str(v) for v in r.details["ranks"].values()))
        lines.append([
            label, r.recipe, f"{r.size_bytes:,}",
            f"{r.size_bytes / b.size_bytes:.2f}x" if b and b.size_bytes else "-",
            f"{r.gzip_bytes:,}", f"{r.p50_ms:.4f}",
            f"{r.p50_ms / b.p50_ms:.2f}x" if b and b.p50_ms and r.p50_ms else "-",
            f"{r.p95_ms:.4f}", f"{r.accuracy:.4f}",
            f"{(r.accuracy or 0) - references[label]:+.4f}",
            "yes" if r.details.get("delegate_partitions") else "no",
            "; ".join(notes),
        ])
    print(markdown_table(header, lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing and training (a smoke run)")
    parser.add_argument("--skip-imagenet", action="store_true", help="only the digits models")
    parser.add_argument("--skip-torch", action="store_true", help="without the PyTorch model")
    args = parser.parse_args()
    settings = BenchmarkSettings(min_seconds=0.2, min_runs=20) if args.quick else BenchmarkSettings()
    rows, references = [], {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        cases = [digits_case(epochs=5 if args.quick else 15), resnet_case(epochs=3 if args.quick else 10)]
        if not args.skip_torch:
            cases.append(torch_case(Path(tmp)))
        if not args.skip_imagenet:
            samples = 8 if args.quick else 32
            cases += [imagenet_case("MobileNetV2", samples), imagenet_case("EfficientNetB0", samples)]
        for label, inputs, recipes in cases:
            inputs.settings = settings
            references[label] = float_reference(inputs)[0]
            rows += run_case(label, inputs, recipes, Path(tmp))
    import ai_edge_litert

    print(f"\nhost: {os.cpu_count()} cores, LiteRT {getattr(ai_edge_litert, '__version__', '?')}, 1 thread, "
          f"p50/p95 of >= {settings.min_runs} runs and >= {settings.min_seconds:g} s after warm-up; "
          f"ratios against float32 measured in the same run\n")
    print_table(rows, references)
    print_build_times([c for c in cases if c[0] in ("digits CNN", "MobileNetV2 (random inputs)")], settings)


if __name__ == "__main__":
    main()
