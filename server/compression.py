"""``edgefleet model build`` / ``model report``: per-profile compression of a model version.

The long part (transforms, conversions, host measurements) runs with no
database session open, so the running server is never blocked on SQLite;
the report rows and the chosen artifact are written in one short session.

A build with the profile's own recipe (``auto`` for the built-ins) makes the
variant it chooses the profile's ``Artifact``, the file rollouts ship. A
build with any other ``--recipe`` is an **experiment**: its variant is
measured and kept in the report, marked ``experiment``, but the profile ships
what it shipped before, unless the operator asks with ``ship=True``
(``--ship``). An experiment's quantization must be one the profile allows.
A later build with the profile's own recipe replaces the report's rows except
experiments with recipes it did not build again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from server import audit, measurements
from server.blobs import BlobStore
from server.catalog import resolve_version
from server.compress.evalset import EvalSet, load_eval_file
from server.compress.pipeline import CompressionInputs, ProfileGoal, VariantReport, compress_for_profile
from server.compress.progress import BuildEvent, ProgressCallback, Step, ignore
from server.compress.quantization import Quantization
from server.compress.recipes import Recipe, auto_candidates, parse_recipe
from server.compress.sources import ModelSource, open_source, unpack_source
from server.db import Database, Session, queries
from server.db.models import Artifact, ModelVersion, Profile, Variant
from server.devices import get_profile
from server.keys import SigningKeys
from server.load_errors import LoadErrorReport, reports_on
from server.native_output import native_stderr_to_log
from shared.benchmark import BenchmarkSettings
from shared.errors import ConfigError, UserInputError

logger = logging.getLogger(__name__)

LARGE_DENSE_PARAMS = 4096


EXPERIMENT = "experiment"  # the key in a variant's details that marks it as an experiment


@dataclass(frozen=True)
class ExperimentOutcome:
    """What a build with an explicit ``--recipe`` did to its profile."""

    recipe: str
    ship: bool  # the operator asked to ship it
    shipped: bool  # and it is the profile's artifact now
    ships: str | None  # the recipe the profile ships after this build (None: nothing built yet)


@dataclass(frozen=True)
class ProfileReport:
    model: str
    version: int
    profile: str
    objective: str
    accuracy_budget: float
    reference_accuracy: float
    variants: tuple[VariantReport, ...]  # as stored: sha256 set, tflite not loaded
    eval_labelled: bool = True  # False: "accuracy" is top-1 agreement with the float model
    load_errors: tuple[LoadErrorReport, ...] = ()  # devices' reports on these variants' files, oldest first
    experiment: ExperimentOutcome | None = None  # set on what an experimental build returns

    @property
    def chosen(self) -> VariantReport | None:
        """The variant the profile ships."""
        return next((v for v in self.variants if v.chosen), None)

    def variant(self, recipe: str) -> VariantReport | None:
        return next((v for v in self.variants if v.recipe == recipe), None)

    def load_errors_of(self, variant: VariantReport) -> tuple[LoadErrorReport, ...]:
        return tuple(r for r in self.load_errors if variant.sha256 is not None and r.model_sha256 == variant.sha256)


def goal_of(profile: Profile) -> ProfileGoal:
    return ProfileGoal(
        name=profile.name,
        preferred=Quantization.parse(profile.quantization),
        objective=profile.objective,
        accuracy_budget=profile.accuracy_budget,
        max_model_bytes=profile.max_model_bytes,
        max_ram_bytes=profile.max_ram_bytes,
        threads=1,  # the host has 2 cores; every variant is measured alike
    )


def _has_large_dense(model: Any) -> bool:
    return model is not None and any(
        type(layer).__name__ == "Dense" and layer.kernel.shape[0] * layer.kernel.shape[1] >= LARGE_DENSE_PARAMS
        for layer in model.layers
    )


def is_experiment(variant: VariantReport) -> bool:
    return bool(variant.details.get(EXPERIMENT))


def allowed_quantizations(profile: Profile) -> tuple[str, ...]:
    return tuple(q.strip() for q in profile.quantizations.split(",") if q.strip()) or (profile.quantization,)


def experiment_recipe(profile: Profile, recipe: str | None, source: ModelSource) -> Recipe | None:
    """The recipe when ``recipe`` makes this build an experiment for ``profile``, else None.

    ``None``, ``auto`` and the profile's own recipe are the profile's build; a prebuilt model has only one
    way to ship. An experiment's quantization must be one the profile allows.
    """
    if recipe is None or recipe.strip().lower() == "auto" or source.kind == "tflite":
        return None
    parsed = parse_recipe(recipe)
    own = (profile.recipe or "auto").strip().lower()
    if own != "auto" and str(parse_recipe(own)) == str(parsed):
        return None
    allowed = allowed_quantizations(profile)
    if parsed.quantization.value not in allowed:
        raise UserInputError(
            f"profile {profile.name} does not allow {parsed.quantization.value} (recipe {parsed}); it allows "
            f"{', '.join(allowed)}: end the recipe with one of them, or use a profile that allows it"
        )
    return parsed


def recipes_for(
    profile: Profile, recipe: str | None, *, source: ModelSource, has_train: bool, has_student: bool = False
) -> list[Recipe]:
    text = recipe or profile.recipe or "auto"
    if source.kind == "tflite":  # a prebuilt model ships as it is, whatever the profile's recipe
        if recipe not in (None, "auto", "prebuilt"):
            raise UserInputError(f"a prebuilt .tflite model is shipped as it is; recipe {recipe!r} does not apply")
        return [Recipe((), Quantization.PREBUILT)]
    if text != "auto":
        fixed = parse_recipe(text)
        if fixed.retrains and not has_train:
            raise UserInputError(
                f"recipe {fixed} retrains the model: add the version with training data (model add --train)"
            )
        return [fixed]
    allowed = tuple(Quantization.parse(q) for q in profile.quantizations.split(",") if q.strip())
    preferred = Quantization.parse(profile.quantization)
    possible = tuple(q for q in allowed or (preferred,) if q in source.quantizations)  # a PyTorch model has fewer
    if not possible:
        raise UserInputError(
            f"profile {profile.name} allows only {', '.join(q.value for q in allowed or (preferred,))}, which a "
            f"{source.kind} model cannot be converted to; it can be: "
            f"{', '.join(q.value for q in source.quantizations)}"
        )
    return auto_candidates(
        possible, preferred if preferred in possible else possible[0],
        has_training_data=has_train and source.keras_model is not None,
        has_large_dense=_has_large_dense(source.keras_model),
        has_student=has_student,
    )


@dataclass(frozen=True)
class _Sources:
    model_name: str
    version: int
    version_id: int
    source_sha256: str
    source_name: str
    eval_sha256: str
    train_sha256: str | None


def _sources(version: ModelVersion) -> _Sources:
    return _Sources(
        version.model.name, version.version, version.id, version.source_sha256, version.source_name,
        version.full_eval_sha256 or version.eval_sha256, version.train_sha256,
    )


def _load_inputs(blobs: BlobStore, sources: _Sources, work: Path, settings: BenchmarkSettings) -> CompressionInputs:
    model_path = unpack_source(blobs.read(sources.source_sha256), sources.source_name, work)

    def evalset(sha256: str, name: str) -> EvalSet:
        path = work / name
        path.write_bytes(blobs.read(sha256))
        return load_eval_file(path)

    train = evalset(sources.train_sha256, "train.npz") if sources.train_sha256 else None
    return CompressionInputs(open_source(model_path), evalset(sources.eval_sha256, "eval.npz"), train, settings=settings)


BENCHMARK_SECONDS_VARIABLE = "EDGEFLEET_BENCHMARK_SECONDS"


def host_benchmark_settings() -> BenchmarkSettings:
    """How long a build times each candidate on the host: at least ``EDGEFLEET_BENCHMARK_SECONDS`` (default 1 s)
    after a warm-up of half that, at most 0.5 s. Shorter is noisier; the devices' own trials are not affected."""
    text = os.environ.get(BENCHMARK_SECONDS_VARIABLE, "").strip()
    if not text:
        return BenchmarkSettings()
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 600:
        raise UserInputError(f"{BENCHMARK_SECONDS_VARIABLE}={text!r}: expected seconds between 0 and 600")
    return BenchmarkSettings(min_seconds=seconds, warmup_seconds=min(0.5, seconds / 2))


def build_profiles(
    db: Database,
    blobs: BlobStore,
    model_ref: str,
    profile_names: list[str],
    *,
    recipe: str | None = None,
    student: Path | None = None,
    settings: BenchmarkSettings | None = None,
    progress: ProgressCallback = ignore,
    ship: bool = False,
    actor: str | None = None,
    measure_on: Sequence[str] = (),
    keys: SigningKeys | None = None,
    measure_timeout_s: float = measurements.DEFAULT_TIMEOUT_S,
) -> list[ProfileReport]:
    """Build every candidate of each profile for a model version, store the reports, and make
    each profile's chosen variant the version's artifact for it. Transformed models (pruned,
    distilled, factorised) are built once and shared by all profiles, and so is each variant with its host
    measurement when two profiles ask for the same recipe at the same thread count.

    With a ``recipe`` other than ``auto`` and the profile's own, the build is an experiment (see the
    module's docstring): it changes what the profile ships only with ``ship``, and only if the variant
    passed the profile's budget and limits. Every profile's recipe is checked before anything is built.
    ``progress`` hears a ``BuildEvent`` (``server.compress.progress``) at every step.

    ``measure_on``: device names; each profile's candidates are also timed on its devices among them, and
    chosen by their numbers (``server/measurements.py``; it needs ``keys`` with the release key online).
    """
    with db.session() as session:
        version = resolve_version(session, model_ref)
        sources = _sources(version)
        profiles = [get_profile(session, name) for name in profile_names]
        for profile in profiles:
            session.expunge(profile)
        devices = {name: [d.id for d in found] for name, found in
                   measurements.reference_devices(session, measure_on, profile_names).items()}
        slice_reference = version.reference_accuracy
    if devices and (keys is None or keys.release is None):
        raise ConfigError("--measure-on signs every candidate for the device, and this server holds no release key "
                          "(it is offline): build without --measure-on, or keep the release key online")
    ref = f"{sources.model_name}:{sources.version}"
    reports = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        inputs = _load_inputs(blobs, sources, Path(tmp), settings or host_benchmark_settings())
        if student is not None:
            from server.compress.convert import load_keras_model

            inputs.student = load_keras_model(student)
        plans = [
            (profile, recipes_for(profile, recipe, source=inputs.source, has_train=inputs.train is not None,
                                  has_student=inputs.student is not None),
             experiment_recipe(profile, recipe, inputs.source))
            for profile in profiles
        ]
        if ship and not any(experiment for _, _, experiment in plans):
            raise UserInputError("--ship ships an experiment: give it with --recipe (a build with the profile's "
                                 "own recipe ships its choice anyway)")
        _check_experiments(db, sources, ref, plans, ship)
        for number, (profile, recipes, experiment) in enumerate(plans, start=1):
            progress(BuildEvent(Step.PROFILE, profile.name, index=number, total=len(recipes)))
            with native_stderr_to_log(f"compressing {sources.model_name} for {profile.name}"):
                reference, variants = compress_for_profile(recipes, inputs, goal_of(profile), progress)
            if profile.name in devices:
                assert keys is not None
                reference, variants = measurements.measure_candidates(
                    db, blobs, keys, sources.version_id, goal_of(profile), variants, devices[profile.name],
                    (reference, slice_reference), measure_timeout_s, progress)
            if experiment is None:
                _store(db, blobs, sources, profile.name, reference, variants)
                reports += compression_report(db, ref, profile.name)
                continue
            (variant,) = variants
            outcome = _store_experiment(db, blobs, sources, profile.name, reference, variant, ship=ship,
                                        actor=actor or audit.operator())
            reports += [replace(r, experiment=outcome) for r in compression_report(db, ref, profile.name)]
    return reports


def _check_experiments(
    db: Database, sources: _Sources, ref: str, plans: list[tuple[Profile, list[Recipe], Recipe | None]], ship: bool
) -> None:
    """Refuse, before the long work, an experiment with the very recipe its profile ships: it would only
    measure the shipped variant again, under another name."""
    with db.session() as session:
        for profile, _, experiment in plans:
            artifact = queries.artifact_for_ids(session, sources.version_id, profile.name)
            if experiment is not None and not ship and artifact is not None and artifact.recipe == str(experiment):
                raise UserInputError(
                    f"{ref} already ships {experiment} to {profile.name}: to measure it again rebuild the profile "
                    f"('edgefleet model build {ref} --profile {profile.name}'), or add --ship to replace the "
                    "shipped file with this build"
                )


def _variant_row(sources: _Sources, profile: str, reference: float, report: VariantReport,
                 sha256: str | None, *, experiment: bool = False) -> Variant:
    details = {**report.details, "reference_accuracy": reference}
    if experiment:
        details[EXPERIMENT] = True
    return Variant(
        model_version_id=sources.version_id, profile_name=profile, recipe=report.recipe,
        quantization=report.quantization, sha256=sha256,
        size_bytes=report.size_bytes, gzip_bytes=report.gzip_bytes, accuracy=report.accuracy,
        agreement=report.agreement, p50_ms=report.p50_ms, p95_ms=report.p95_ms,
        peak_rss_bytes=report.peak_rss_bytes, verdict=report.verdict, details=details,
        reason=report.reason, chosen=report.chosen,
    )


def _unchoose(row: Variant, why: str) -> None:
    row.chosen, row.verdict, row.reason = False, "ok", why


def _store_experiment(
    db: Database, blobs: BlobStore, sources: _Sources, profile: str, reference: float, report: VariantReport,
    *, ship: bool, actor: str,
) -> ExperimentOutcome:
    """Keep an experiment's row (replacing an earlier row of its recipe); ship it only if asked and it fits."""
    fits = report.verdict == "chosen"  # choose() picks a lone variant when it is within budget and limits
    shipping = ship and fits
    if shipping:
        report = replace(report, reason="an experiment, shipped with --ship")
    elif fits:
        report = replace(report, verdict="ok", reason="an experiment: not shipped (--ship ships it)")
    sha256 = blobs.put(report.tflite) if report.tflite else None
    with db.session() as session:
        rows = queries.variants_of(session, sources.version_id, profile)
        for row in rows:
            if row.recipe == report.recipe:
                session.delete(row)
            elif shipping and row.chosen:
                _unchoose(row, f"was chosen; {report.recipe} was shipped instead with --ship")
        session.flush()
        session.add(_variant_row(sources, profile, reference, report, sha256, experiment=True))
        if shipping:
            assert sha256 is not None
            _set_artifact(session, sources, profile, report, sha256)
            audit.record(session, "model.experiment_shipped",
                         f"{sources.model_name}:{sources.version} ships {report.recipe} to profile {profile} "
                         f"(an experiment, --ship): {report.size_bytes} bytes, host accuracy {report.accuracy:.4f}",
                         actor=actor, data={"model": sources.model_name, "version": sources.version,
                                            "profile": profile, "recipe": report.recipe, "sha256": sha256})
        artifact = queries.artifact_for_ids(session, sources.version_id, profile)
        ships = (artifact.recipe or artifact.quantization) if artifact is not None else None
    return ExperimentOutcome(report.recipe, ship, shipping, ships)


def _set_artifact(session: Session, sources: _Sources, profile: str, best: VariantReport, sha256: str) -> None:
    """Make ``best`` what ``profile`` ships of this model version."""
    assert best.accuracy is not None
    artifact = queries.artifact_for_ids(session, sources.version_id, profile)
    if artifact is None:
        artifact = Artifact(model_version_id=sources.version_id, profile_name=profile)
        session.add(artifact)
    artifact.quantization, artifact.recipe = best.quantization, best.recipe
    artifact.sha256, artifact.size_bytes, artifact.gzip_bytes = sha256, best.size_bytes or 0, best.gzip_bytes
    artifact.host_accuracy, artifact.host_p50_ms, artifact.host_p95_ms = best.accuracy, best.p50_ms, best.p95_ms


def _store(
    db: Database, blobs: BlobStore, sources: _Sources, profile: str, reference: float, reports: list[VariantReport]
) -> None:
    """The profile's own build: its rows replace the report's, except experiments of recipes it did not
    build again; its chosen variant becomes the artifact (none fits: the profile ships nothing)."""
    built = {report.recipe for report in reports}
    with db.session() as session:
        for row in queries.variants_of(session, sources.version_id, profile):
            if row.recipe in built or not row.details.get(EXPERIMENT):
                session.delete(row)
            elif row.chosen:
                _unchoose(row, "was shipped with --ship until the profile's own build replaced it")
        session.flush()
        chosen: tuple[VariantReport, str] | None = None
        for report in reports:
            sha256 = blobs.put(report.tflite) if report.tflite else None
            session.add(_variant_row(sources, profile, reference, report, sha256))
            if report.chosen and sha256 is not None:
                chosen = (report, sha256)
        if chosen is None:
            artifact = queries.artifact_for_ids(session, sources.version_id, profile)
            if artifact is not None:
                session.delete(artifact)
            return
        best, sha256 = chosen
        _set_artifact(session, sources, profile, best, sha256)


def compression_report(db: Database, model_ref: str, profile: str | None = None) -> list[ProfileReport]:
    """The stored reports: every built profile's, or only ``profile``'s (an error if it has none)."""
    with db.session() as session:
        version = resolve_version(session, model_ref)
        rows = queries.variants_of(session, version.id, profile)
        by_profile: dict[str, list[Variant]] = {}
        for row in rows:
            by_profile.setdefault(row.profile_name, []).append(row)
        reports = []
        for name, variants in by_profile.items():
            p = get_profile(session, name)
            reports.append(
                ProfileReport(
                    version.model.name, version.version, name, p.objective, p.accuracy_budget,
                    float(variants[0].details.get("reference_accuracy", version.reference_accuracy)),
                    tuple(_row(v) for v in variants),
                    version.eval_labelled,
                    reports_on(session, {v.sha256 for v in variants if v.sha256 is not None}),
                )
            )
    if profile is not None and not reports:
        raise UserInputError(
            f"no compression report for {model_ref} on {profile}: run 'edgefleet model build {model_ref} "
            f"--profile {profile}'"
        )
    return reports


def _row(v: Variant) -> VariantReport:
    return VariantReport(
        v.recipe, v.quantization, sha256=v.sha256, size_bytes=v.size_bytes, gzip_bytes=v.gzip_bytes,
        accuracy=v.accuracy, agreement=v.agreement, p50_ms=v.p50_ms, p95_ms=v.p95_ms,
        peak_rss_bytes=v.peak_rss_bytes, details=dict(v.details), verdict=v.verdict, reason=v.reason,
    )
