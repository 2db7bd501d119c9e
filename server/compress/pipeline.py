"""Build every candidate variant for a profile, measure it, and pick one.

For each recipe: apply its transforms to the Keras model (pruning, distillation,
low-rank factorisation; each cached, so the quantizations of one transformed
model share it), convert with its quantization, and evaluate the flatbuffer
on the host *in the interpreter the agents use*, in a child process
(``shared.trial``): accuracy, top-1 agreement with the float model, size and
gzip size, benchmark_model-style latency, peak RSS, and the graph's ops with
the number of XNNPACK partitions. ``choose`` then keeps the variants within
the accuracy budget and the profile's limits and picks by the profile's
objective — by measurement, with the preferred quantization only breaking
ties inside the latency noise band.
"""

from __future__ import annotations

import gzip
import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from server.compress.ahead import ConversionAhead, can_overlap
from server.compress.evalset import EvalSet, write_eval_file
from server.compress.graph import graph_report
from server.compress.progress import BuildEvent, ProgressCallback, Step, ignore
from server.compress.quantization import Quantization
from server.compress.recipes import Recipe, Transform, parse_recipe
from server.compress.sources import KerasSource, PrebuiltSource, SavedModelSource
from server.compress.torch_source import TorchSource
from shared.benchmark import BenchmarkSettings
from shared.errors import EdgefleetError, ModelError, UserInputError
from shared.trial import TrialRequest, run_trial

logger = logging.getLogger(__name__)

LATENCY_NOISE = 0.10  # p95 within 10% of the best counts as a tie on a noisy machine,
LATENCY_NOISE_MS = 0.02  # and so does a difference below 20 µs, under the timer and call overhead
SIZE_TIE = 0.01


@dataclass(frozen=True)
class ProfileGoal:
    """What a profile asks of its variant (a view of the Profile row)."""

    name: str
    preferred: Quantization
    objective: str = "latency"
    accuracy_budget: float = 0.01
    max_model_bytes: int | None = None
    max_ram_bytes: int | None = None
    threads: int = 1


@dataclass(frozen=True)
class VariantReport:
    recipe: str
    quantization: str
    tflite: bytes | None = field(repr=False, default=None)  # only right after a build
    sha256: str | None = None  # once stored
    size_bytes: int | None = None
    gzip_bytes: int | None = None
    accuracy: float | None = None
    agreement: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    peak_rss_bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    verdict: str = ""  # chosen | ok | over_budget | too_big | failed
    reason: str = ""

    @property
    def chosen(self) -> bool:
        return self.verdict == "chosen"


@dataclass
class CompressionInputs:
    source: Any  # a ModelSource, or a Keras model (wrapped in a KerasSource)
    evalset: EvalSet  # host-side evaluation (the whole eval set)
    train: EvalSet | None = None
    student: Any | None = None  # a user-supplied student architecture for distill:student
    epochs: int = 3
    settings: BenchmarkSettings = field(default_factory=BenchmarkSettings)
    _transformed: dict[tuple[Transform, ...], tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    # Variants built and measured so far, by (recipe, threads): profiles that ask for the same variant with
    # the same thread count share one build and one measurement.
    _variants: dict[tuple[str, int], VariantReport] = field(default_factory=dict)
    # Transformed models by id, each with its one SavedModel export (a KerasSource keeps the model alive)
    _exports: dict[int, KerasSource] = field(default_factory=dict)
    _float_predictions: np.ndarray | None = None
    _eval_file: Path | None = None  # the evalset written once for the trial children

    def __post_init__(self) -> None:
        if not isinstance(self.source, (KerasSource, SavedModelSource, PrebuiltSource, TorchSource)):
            self.source = KerasSource(self.source)


def keras_source(inputs: CompressionInputs, model: Any) -> KerasSource:
    """``model`` (the source's, or a transformed one) as a source that exports it once for all its conversions."""
    if isinstance(inputs.source, KerasSource) and model is inputs.source.model:
        return inputs.source
    known = inputs._exports.get(id(model))
    if known is None or known.model is not model:
        known = inputs._exports[id(model)] = KerasSource(model)
    return known


def gzip_size(data: bytes) -> int:
    """Pruning shrinks a model only once compressed: report both sizes."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def float_reference(inputs: CompressionInputs) -> tuple[float, np.ndarray]:
    """The float model's accuracy on the eval set and its top-1 predictions (computed once)."""
    if inputs._float_predictions is None:
        inputs._float_predictions = inputs.source.predict_classes(inputs.evalset)
    predictions = inputs._float_predictions
    return float(np.mean(predictions == inputs.evalset.y)), predictions


# -- transforms ------------------------------------------------------------------


def _apply(transform: Transform, model: Any, inputs: CompressionInputs) -> tuple[Any, dict[str, Any]]:
    train = inputs.train
    if train is None:
        raise UserInputError(f"{transform} retrains the model: add the model version with training data (--train)")
    if transform.kind in ("prune", "prune24"):
        from server.compress.bn_fold import fold_batch_norms
        from server.compress.pruning import prune_model

        model, folded = fold_batch_norms(model)  # magnitudes as the device multiplies by them
        pruned = prune_model(
            model, train, sparsity=transform.value or 0.5, structured_2_4=transform.kind == "prune24",
            epochs=inputs.epochs,
        )
        return pruned.model, {"zero_fraction": round(pruned.zero_fraction, 4), "layers_pruned": pruned.layers_pruned,
                              **_folded_detail(folded)}
    if transform.kind == "prune-units":
        from server.compress.structured import prune_units

        narrowed = prune_units(model, train, fraction=transform.value or 0.5, epochs=inputs.epochs)
        return narrowed.model, {"units": narrowed.units, "untouched": narrowed.untouched}
    if transform.kind == "distill":
        from server.compress.distill import distill, width_scaled_student

        if transform.value is None:
            if inputs.student is None:
                raise UserInputError("distill:student needs the student architecture: model build --student FILE")
            from server.compress.convert import import_keras

            student = import_keras().models.clone_model(inputs.student)  # fresh weights; the input stays as it is
        else:
            student = width_scaled_student(model, transform.value)
        result = distill(model, student, train, epochs=inputs.epochs * 3)
        return result.model, {"student_params": result.student_params, "teacher_params": result.teacher_params}
    if transform.kind == "lowrank":
        from server.compress.bn_fold import fold_batch_norms
        from server.compress.lowrank import factorize_dense, fine_tune

        model, folded = fold_batch_norms(model)  # the directions of the weights the device multiplies by
        factored = factorize_dense(model, energy=transform.value or 0.9)
        tuned = fine_tune(factored.model, train, epochs=inputs.epochs)
        return tuned, {"ranks": {r.name: r.rank for r in factored.replaced}, **_folded_detail(folded)}
    raise AssertionError(f"unknown transform {transform.kind}")


def _folded_detail(folded: list[str]) -> dict[str, Any]:
    return {"bn_folded": folded} if folded else {}


def transformed_model(
    recipe: Recipe, inputs: CompressionInputs, step: Callable[[Step, str], None] = lambda *_: None,
) -> tuple[Any, dict[str, Any]]:
    """The Keras model after the recipe's transforms; each prefix is built once per run."""
    model = inputs.source.keras_model
    details: dict[str, Any] = {}
    if recipe.transforms and model is None:
        raise UserInputError(
            f"{recipe} needs a Keras model (.keras or .h5): pruning, distillation and low-rank retrain it"
        )
    for i in range(1, len(recipe.transforms) + 1):
        key = recipe.transforms[:i]
        if key not in inputs._transformed:
            step(Step.TRANSFORM, str(key[-1]))
            started = time.monotonic()
            new_model, new_details = _apply(key[-1], model, inputs)
            new_details[f"{key[-1].kind}_seconds"] = round(time.monotonic() - started, 1)
            inputs._transformed[key] = (new_model, {**details, **new_details})
        model, details = inputs._transformed[key]
    return model, dict(details)


# -- measuring -------------------------------------------------------------------


def measure(tflite: bytes, inputs: CompressionInputs, workdir: Path, threads: int) -> dict[str, Any]:
    """Run the flatbuffer in a child process with the agents' interpreter and benchmark."""
    model_path = workdir / "candidate.tflite"
    model_path.write_bytes(tflite)
    if inputs._eval_file is None or not inputs._eval_file.exists():
        inputs._eval_file = write_eval_file(inputs.evalset, workdir / f"eval-{id(inputs):x}.npz")
    eval_path = inputs._eval_file
    s = inputs.settings
    result = run_trial(
        TrialRequest(
            model_path=str(model_path), eval_path=str(eval_path), threads=threads, runtime="ai-edge-litert",
            warmup_runs=s.warmup_runs, warmup_seconds=s.warmup_seconds, min_runs=s.min_runs,
            min_seconds=s.min_seconds, with_predictions=True,
        ),
        timeout=600,
    )
    if not result.ok or result.benchmark is None:
        raise EdgefleetError(result.reason)
    _, float_predictions = float_reference(inputs)
    agreement = float(np.mean(np.asarray(result.predictions) == float_predictions))
    return {
        "accuracy": result.accuracy,
        "agreement": round(agreement, 6),
        "p50_ms": result.benchmark.p50_ms,
        "p95_ms": result.benchmark.p95_ms,
        "peak_rss_bytes": result.benchmark.peak_rss_bytes,
        "ops": list(dict.fromkeys(result.ops)),
        "undelegated_ops": len(result.ops),  # what XNNPACK left to the reference kernels
        "delegate_partitions": result.delegate_partitions,
    }


def build_variant(
    recipe: Recipe, inputs: CompressionInputs, workdir: Path, threads: int = 1,
    step: Callable[[Step, str], None] = lambda *_: None, *, converted: Future[bytes] | None = None,
    before_measure: Callable[[], None] = lambda: None,
) -> VariantReport:
    """Build and measure one recipe; any failure becomes a ``failed`` row with its reason.

    ``step`` hears each step as it starts (transform, convert, measure) with a detail. ``converted``: the
    plain recipe's conversion, already started (``server/compress/ahead.py``); ``before_measure`` runs between
    the conversion and the measurement.
    """
    representative = (inputs.train or inputs.evalset).x
    try:
        model, details = transformed_model(recipe, inputs, step)
        if model is not None:
            details["params"] = int(model.count_params())
        step(Step.CONVERT, "")
        if recipe.transforms:
            tflite = keras_source(inputs, model).convert(recipe.quantization, representative)
        elif converted is not None:
            tflite = converted.result()  # its error, if it failed
        else:
            tflite = inputs.source.convert(recipe.quantization, representative)
        step(Step.MEASURE, f"{len(tflite)} bytes")
        before_measure()
        metrics = measure(tflite, inputs, workdir, threads)
        if any(t.kind in ("prune", "prune24") for t in recipe.transforms):
            tflite, metrics = _prefer_sparse_encoding(model, recipe, inputs, workdir, threads, tflite, metrics, step)
    except EdgefleetError as exc:
        logger.warning("variant %s failed: %s", recipe, exc)
        return VariantReport(str(recipe), recipe.quantization.value, verdict="failed", reason=str(exc))
    details.update({k: metrics.pop(k) for k in ("ops", "undelegated_ops", "delegate_partitions", "encoding")
                    if k in metrics})
    try:
        details["graph"] = graph_report(tflite, model)
    except ModelError as exc:  # the variant ran; only its description is missing
        details["graph"] = {"error": str(exc)}
    return VariantReport(
        str(recipe), recipe.quantization.value, tflite=tflite, size_bytes=len(tflite), gzip_bytes=gzip_size(tflite),
        details=details, **metrics,
    )


def sparse_encoding_verdict(
    dense_bytes: int, dense_partitions: int, sparse_bytes: int, sparse_partitions: int
) -> tuple[bool, str]:
    """Ship the sparse encoding of a pruned model only if it is smaller and XNNPACK delegates it
    as fully as the dense one; sparse int8 kernels often are not delegated, and then run far slower."""
    if sparse_bytes >= dense_bytes:
        return False, "dense (the sparse encoding saved nothing)"
    if sparse_partitions == 0 or sparse_partitions < dense_partitions:
        return False, (f"dense: XNNPACK did not delegate the sparse encoding "
                       f"({sparse_partitions} partitions vs {dense_partitions}), fell back")
    return True, f"sparse ({sparse_bytes} bytes vs {dense_bytes} dense)"


def _prefer_sparse_encoding(
    model: Any, recipe: Recipe, inputs: CompressionInputs, workdir: Path, threads: int,
    dense: bytes, dense_metrics: dict[str, Any], step: Callable[[Step, str], None] = lambda *_: None,
) -> tuple[bytes, dict[str, Any]]:
    try:
        step(Step.CONVERT, "sparse encoding")
        sparse = keras_source(inputs, model).convert(recipe.quantization, (inputs.train or inputs.evalset).x,
                                                     sparse_encoding=True)
        step(Step.MEASURE, f"sparse encoding, {len(sparse)} bytes")
        sparse_metrics = measure(sparse, inputs, workdir, threads)
    except EdgefleetError as exc:
        where = "XNNPACK could not run" if "delegate" in str(exc).lower() else "could not build or run"
        return dense, {**dense_metrics, "encoding": f"dense: {where} the sparse encoding, fell back ({exc})"}
    use_sparse, note = sparse_encoding_verdict(
        len(dense), dense_metrics["delegate_partitions"], len(sparse), sparse_metrics["delegate_partitions"]
    )
    return (sparse, {**sparse_metrics, "encoding": note}) if use_sparse else (dense, {**dense_metrics, "encoding": note})


# -- choosing --------------------------------------------------------------------


def judge(report: VariantReport, goal: ProfileGoal, reference: float) -> VariantReport:
    """Mark a built variant ok, over_budget or too_big, with the reason."""
    if report.verdict == "failed":
        return report
    assert report.size_bytes is not None and report.accuracy is not None
    if goal.max_model_bytes is not None and report.size_bytes > goal.max_model_bytes:
        return replace(report, verdict="too_big",
                       reason=f"{report.size_bytes} bytes exceed {goal.name}'s limit of {goal.max_model_bytes}")
    if goal.max_ram_bytes is not None and (report.peak_rss_bytes or 0) > goal.max_ram_bytes:
        return replace(report, verdict="too_big",
                       reason=f"peak RSS {report.peak_rss_bytes} bytes exceeds {goal.name}'s limit of {goal.max_ram_bytes}")
    floor = reference - goal.accuracy_budget
    if report.accuracy < floor - 1e-9:
        return replace(report, verdict="over_budget",
                       reason=f"accuracy {report.accuracy:.4f} below {floor:.4f} (float32 {reference:.4f} "
                              f"- budget {goal.accuracy_budget:g})")
    return replace(report, verdict="ok", reason="")


def choose(reports: list[VariantReport], goal: ProfileGoal, reference: float) -> list[VariantReport]:
    """Judge every variant and mark the one the profile's objective picks as ``chosen``."""
    judged = [judge(r, goal, reference) for r in reports]
    ok = [i for i, r in enumerate(judged) if r.verdict == "ok"]
    if not ok:
        return judged

    def p95(i: int) -> float:
        return judged[i].p95_ms or float("inf")

    def size(i: int) -> int:
        return judged[i].size_bytes or 0

    def preferred_first(i: int) -> int:
        return 0 if judged[i].quantization == goal.preferred.value else 1

    def accuracy(i: int) -> float:
        return judged[i].accuracy or 0.0

    # A transform that left the shipped file as large as the plain quantization's (pruning whose sparse
    # encoding fell back to dense, say) gained nothing a device sees: the simpler variant is chosen.
    transformed = {i for i in ok if parse_recipe(judged[i].recipe).transforms}
    plain = {judged[i].quantization: size(i) for i in ok if i not in transformed}
    shadowed = {i for i in transformed if size(i) == plain.get(judged[i].quantization)}
    for i in shadowed:
        judged[i] = replace(judged[i], reason=f"ships as many bytes as plain {judged[i].quantization}: the "
                                              "simpler variant is preferred")
    eligible = [i for i in ok if i not in shadowed]
    if goal.objective == "size":
        best = min(size(i) for i in eligible)
        band = [i for i in eligible if size(i) <= best * (1 + SIZE_TIE)]
        pick = min(band, key=lambda i: (p95(i), preferred_first(i)))
        why = f"smallest within {SIZE_TIE:.0%} ({size(pick)} bytes); then lowest p95"
    else:
        best_p95 = min(p95(i) for i in eligible)
        band = [i for i in eligible if p95(i) <= max(best_p95 * (1 + LATENCY_NOISE), best_p95 + LATENCY_NOISE_MS)]
        pick = min(band, key=lambda i: (preferred_first(i), -accuracy(i), size(i), p95(i)))
        why = (f"p95 within noise ({LATENCY_NOISE:.0%}/{LATENCY_NOISE_MS * 1000:.0f} µs) of the best "
               f"{best_p95:.4f} ms; then preferred {goal.preferred.value}, then accuracy, then size")
    judged[pick] = replace(judged[pick], verdict="chosen", reason=why)
    return judged


def compress_for_profile(
    recipes: list[Recipe], inputs: CompressionInputs, goal: ProfileGoal, progress: ProgressCallback = ignore,
) -> tuple[float, list[VariantReport]]:
    """Build, measure and judge every recipe for one profile; returns (float reference, reports).

    ``progress`` hears a ``BuildEvent`` at every step of every candidate.
    """
    reference, _ = float_reference(inputs)
    reports = []
    total = len(recipes)
    with (tempfile.TemporaryDirectory(prefix="edgefleet-variants-") as tmp,
          closing(ConversionAhead(inputs, enabled=can_overlap(goal.threads))) as ahead):
        for index, recipe in enumerate(recipes, start=1):
            name = str(recipe)

            def step(kind: Step, detail: str, name: str = name, index: int = index) -> None:
                progress(BuildEvent(kind, goal.name, name, index, total, detail))

            step(Step.VARIANT, "")
            built = inputs._variants.get((name, goal.threads))
            if built is None:
                # Only the very next candidate, and only if plain too: its conversion has ended (taken)
                # before anything else runs in this process, so it never overlaps retraining.
                following = recipes[index] if index < total else None
                if following is not None and (following.transforms or (str(following), goal.threads) in inputs._variants):
                    following = None
                overlapped = (lambda following=following: ahead.start(following)) if not recipe.transforms else None
                built = inputs._variants[name, goal.threads] = build_variant(
                    recipe, inputs, Path(tmp), threads=goal.threads, step=step, converted=ahead.take(recipe),
                    before_measure=overlapped or (lambda: None))
                outcome = variant_outcome(built)
            else:
                outcome = f"{variant_outcome(built)} (built for an earlier profile)"
            report = replace(built, details=dict(built.details))
            progress(BuildEvent(Step.DONE, goal.name, name, index, total, outcome, failed=report.verdict == "failed"))
            reports.append(report)
    return reference, choose(reports, goal, reference)


def variant_outcome(report: VariantReport) -> str:
    """One line on a built candidate, before it is judged."""
    if report.verdict == "failed":
        return report.reason
    parts = [f"{report.size_bytes} bytes"]
    if report.accuracy is not None:
        parts.append(f"accuracy {report.accuracy:.4f}")
    if report.p50_ms is not None and report.p95_ms is not None:
        parts.append(f"p50 {report.p50_ms:.4f} ms, p95 {report.p95_ms:.4f} ms")
    return ", ".join(parts)
