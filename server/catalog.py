"""Models and their versions: ``edgefleet model add`` and name[:version] lookup."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from server.blobs import BlobStore
from server.compress.evalset import (
    EvalSet,
    MissingLabelsError,
    check_against_model,
    eval_file_bytes,
    eval_slice,
    load_eval_file,
    load_unlabelled_inputs,
)
from server.compress.sources import open_source, pack_source
from server.db import Database, Session, queries
from server.db.models import Model, ModelVersion
from shared.errors import NotFoundError, UserInputError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    eval_samples: int
    num_classes: int
    reference_accuracy: float
    labelled: bool = True


def add_model(
    db: Database, blobs: BlobStore, name: str, model_file: Path, eval_file: Path, train_file: Path | None = None
) -> VersionInfo:
    """Check the model and its data, keep them in the blob store, and record a new version.

    The whole eval set stays on the server for host evaluation; a bounded
    stratified slice of it travels with every artifact for the on-device check.
    Training data is optional and only used by the steps that retrain.
    """
    if not _NAME.match(name):
        raise UserInputError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-'")
    try:
        labelled: EvalSet | None = load_eval_file(eval_file)
    except MissingLabelsError:
        labelled = None  # no labels: the float model's own top-1 stands in, so accuracy reads as agreement
    train = load_eval_file(train_file) if train_file is not None else None
    source = open_source(model_file)
    num_classes = source.num_classes
    if labelled is None:
        x = load_unlabelled_inputs(eval_file)
        placeholder = EvalSet(x=x, y=np.zeros(len(x), dtype=np.int64))
        evalset = EvalSet(x=x, y=source.predict_classes(placeholder).astype(np.int64))
    else:
        evalset = labelled
    check_against_model(evalset, source.input_shape, num_classes)
    if train is not None:
        check_against_model(train, source.input_shape, num_classes)
    travelling = eval_slice(evalset)
    reference = float((source.predict_classes(travelling) == travelling.y).mean())
    packed, stored_name = pack_source(model_file)
    source_sha = blobs.put(packed)
    eval_sha = blobs.put(eval_file_bytes(travelling))
    full_eval_sha = blobs.put(eval_file_bytes(evalset))
    train_sha = blobs.put(eval_file_bytes(train)) if train is not None else None
    with db.session() as session:
        model = queries.model_by_name(session, name)
        if model is None:
            model = Model(name=name)
            session.add(model)
            session.flush()
        version = ModelVersion(
            model_id=model.id,
            version=queries.next_version_number(session, model),
            source_sha256=source_sha,
            source_name=stored_name,
            eval_sha256=eval_sha,
            full_eval_sha256=full_eval_sha,
            train_sha256=train_sha,
            eval_labelled=labelled is not None,
            eval_samples=len(travelling),
            num_classes=num_classes,
            reference_accuracy=reference,
        )
        session.add(version)
        session.flush()
        return VersionInfo(name, version.version, len(travelling), num_classes, reference, labelled is not None)


@dataclass(frozen=True)
class ShippedBuild:
    """What one profile ships of a model version (its ``Artifact``): the recipe that built it and its size."""

    profile: str
    recipe: str
    quantization: str
    size_bytes: int
    host_accuracy: float


@dataclass(frozen=True)
class VersionSummary:
    version: int
    created: datetime
    reference_accuracy: float
    eval_samples: int
    labelled: bool  # False: accuracies are top-1 agreement with the float model
    num_classes: int
    builds: tuple[ShippedBuild, ...]  # by profile; empty until built (model build, or a rollout)


@dataclass(frozen=True)
class ModelSummary:
    name: str
    versions: tuple[VersionSummary, ...]  # oldest first


def list_models(db: Database) -> list[ModelSummary]:
    """Every model with its versions and, per built profile, the recipe and size it ships."""
    with db.reading() as session:
        models = queries.models(session)
        builds: dict[int, list[ShippedBuild]] = defaultdict(list)
        for artifact in queries.artifacts_of(session, [v.id for m in models for v in m.versions]):
            builds[artifact.model_version_id].append(ShippedBuild(
                artifact.profile_name, artifact.recipe or artifact.quantization, artifact.quantization,
                artifact.size_bytes, artifact.host_accuracy,
            ))
        return [
            ModelSummary(model.name, tuple(
                VersionSummary(v.version, _utc(v.created_at), v.reference_accuracy, v.eval_samples, v.eval_labelled,
                               v.num_classes, tuple(builds[v.id]))
                for v in model.versions
            ))
            for model in models
        ]


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)  # SQLite drops the zone


def parse_model_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION`` (VERSION a positive integer, or ``latest``)."""
    name, _, version = ref.partition(":")
    if not name:
        raise UserInputError(f"expected NAME[:VERSION], got {ref!r}")
    if version in ("", "latest"):
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise UserInputError(f"version must be a positive integer, got {version!r}")
    return name, int(version)


def resolve_version(session: Session, ref: str) -> ModelVersion:
    name, number = parse_model_ref(ref)
    model = queries.model_by_name(session, name)
    if model is None:
        raise NotFoundError(f"unknown model {name!r}; add it with 'edgefleet model add'")
    version = queries.model_version(session, model, number)
    if version is None:
        raise NotFoundError(f"model {name!r} has no version {number}")
    return version
