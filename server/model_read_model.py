"""The one read model of models and their compression reports: what ``model list --json``,
``model report --json`` and the HTTP API (``/api/v1/models``, ``/api/v1/models/{name}/{version}/report``) show."""

from __future__ import annotations

from dataclasses import asdict

from server.catalog import ModelSummary, list_models
from server.compression import ProfileReport, compression_report, is_experiment
from server.db import Database
from server.load_errors import KnownLoadErrors, LoadErrorReport, by_pair


def model_json(model: ModelSummary) -> dict[str, object]:
    return {
        "model": model.name,
        "versions": [
            {
                "version": v.version, "created": v.created.isoformat(), "reference_accuracy": v.reference_accuracy,
                "eval_samples": v.eval_samples, "eval_labelled": v.labelled, "num_classes": v.num_classes,
                "builds": [asdict(b) for b in v.builds],
            }
            for v in model.versions
        ],
    }


def report_json(report: ProfileReport) -> dict[str, object]:
    known = by_pair(report.load_errors)
    return {
        "model": report.model,
        "version": report.version,
        "profile": report.profile,
        "objective": report.objective,
        "accuracy_budget": report.accuracy_budget,
        "reference_accuracy": report.reference_accuracy,
        "eval_labelled": report.eval_labelled,
        "ships": report.chosen.recipe if report.chosen is not None else None,
        "variants": [
            {**{k: value for k, value in asdict(v).items() if k != "tflite"}, "chosen": v.chosen,
             "experiment": is_experiment(v),
             "load_errors": [load_error_json(e, known) for e in report.load_errors_of(v)]}
            for v in report.variants
        ],
        **({"experiment": asdict(report.experiment)} if report.experiment is not None else {}),
    }


def load_error_json(error: LoadErrorReport, known: dict[tuple[str, str], KnownLoadErrors]) -> dict[str, object]:
    return {
        "runtime": error.runtime, "device": error.device, "deployment": error.deployment_id, "reason": error.reason,
        "reported_at": error.reported_at.isoformat(),
        "confirmed": known[error.model_sha256, error.runtime].confirmed,  # for this file on this runtime
    }


def models_json(db: Database) -> list[dict[str, object]]:
    """Every model with its versions (``model list --json``)."""
    return [model_json(m) for m in list_models(db)]


def reports_json(db: Database, model_ref: str, profile: str | None = None) -> list[dict[str, object]]:
    """The compression report of NAME[:VERSION], one entry per built profile (``model report --json``)."""
    return [report_json(r) for r in compression_report(db, model_ref, profile)]
