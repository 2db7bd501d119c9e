"""Operator commands: thin click wrappers that call a service and render the result."""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import asdict
from pathlib import Path
from types import FrameType

import click

from server import audit
from server.catalog import ModelSummary
from server.cli_options import DATA_DIR, JSON
from server.compression import ProfileReport, is_experiment
from server.load_errors import CONFIRMATIONS, KnownLoadErrors, LoadErrorReport, by_pair
from server.render import cell, human_bytes, table
from server.setup import init_data_dir, open_workspace
from shared.mqtt import BrokerAddress

logger = logging.getLogger(__name__)


def _broker(url: str) -> BrokerAddress:
    return BrokerAddress.parse(url)


@click.command("init")
@DATA_DIR
def init_command(data_dir: Path) -> None:
    """Create keys and the database in a data directory (safe to run again)."""
    workspace = init_data_dir(data_dir)
    click.echo(f"initialised {workspace.data_dir.root}")


@click.command("server")
@DATA_DIR
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True, help="MQTT 5 broker, mqtt://HOST:PORT.")
@click.option("--http", "http_address", default="127.0.0.1:8080", show_default=True,
              help="Dashboard and JSON API address, HOST:PORT, or 'off'.")
def server_command(data_dir: Path, broker: str, http_address: str) -> None:
    """Run the server until stopped (Ctrl-C)."""
    from server.dashboard import DashboardServer
    from server.service import ServerService

    address = _broker(broker)
    workspace = open_workspace(data_dir)
    service = ServerService(workspace.data_dir, address, db=workspace.db)
    dashboard = None
    if http_address != "off":
        host, _, port = http_address.rpartition(":")
        if not host or not port.isdigit():
            raise click.BadParameter(f"expected HOST:PORT or 'off', got {http_address!r}", param_hint="--http")
        try:
            dashboard = DashboardServer(workspace.db, host, int(port)).start()
        except OSError as exc:
            raise click.ClickException(f"cannot serve the dashboard on {http_address}: {exc.strerror or exc}") from exc

    def stop(signum: int, frame: FrameType | None) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(f"edgefleet server on {workspace.data_dir.root}, broker {address.url()}", err=True)
    if dashboard is not None:
        click.echo(f"dashboard {dashboard.url}", err=True)
    try:
        service.run()
    finally:
        if dashboard is not None:
            dashboard.stop()


# -- models ----------------------------------------------------------------------


@click.group("model")
def model_group() -> None:
    """Add models and list their versions."""


@model_group.command("add")
@click.argument("name")
@click.option("--file", "model_file", type=click.Path(path_type=Path), required=True,
              help="Keras model (.keras or .h5), a TensorFlow SavedModel directory, or a prebuilt .tflite.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Evaluation data: .npz with arrays x (inputs) and y (integer labels).")
@click.option("--train", "train_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Training data (.npz, x and y) for the steps that retrain: pruning, distillation, low-rank.")
@DATA_DIR
def model_add(name: str, model_file: Path, eval_file: Path, train_file: Path | None, data_dir: Path) -> None:
    """Add a new version of model NAME."""
    from server.catalog import add_model

    workspace = open_workspace(data_dir)
    info = add_model(workspace.db, workspace.blobs, name, model_file, eval_file, train_file)
    click.echo(
        f"{info.model}:{info.version}  ({info.num_classes} classes, reference accuracy "
        f"{info.reference_accuracy:.4f} on {info.eval_samples} travelling eval samples)"
    )
    if not info.labelled:
        click.echo("note: the eval file has no labels 'y'; accuracies are top-1 agreement with the float model",
                   err=True)


@model_group.command("list")
@DATA_DIR
@JSON
def model_list(data_dir: Path, as_json: bool) -> None:
    """Every model with its versions and, per built profile, the recipe it ships."""
    from server.catalog import list_models

    models = list_models(open_workspace(data_dir).db)
    if as_json:
        click.echo(json.dumps([model_json(m) for m in models], indent=2))
    elif not models:
        click.echo("no models yet: add one with 'edgefleet model add'")
    else:
        click.echo(model_table(models))


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


def model_table(models: list[ModelSummary]) -> str:
    """One row per version and built profile; a version not built yet has one row with '-'."""
    rows = []
    for model in models:
        for v in model.versions:
            first = [f"{model.name}:{v.version}", v.created.strftime("%Y-%m-%d %H:%MZ"), f"{v.reference_accuracy:.4f}",
                     str(v.eval_samples), cell(v.labelled)]
            blank = ["", "", "", "", ""]
            if not v.builds:
                rows.append([*first, "-", "-", "-"])
            for i, b in enumerate(v.builds):
                rows.append([*(blank if i else first), b.profile, b.recipe, human_bytes(b.size_bytes)])
    return table(["MODEL", "CREATED", "REFERENCE ACC", "EVAL SAMPLES", "LABELLED", "PROFILE", "SHIPS", "SIZE"], rows)


@model_group.command("build")
@click.argument("model_ref", metavar="NAME[:VERSION]")
@click.option("--profile", "profiles", multiple=True, required=True, help="Device profile to build for (repeatable).")
@click.option("--recipe", default=None, help="'auto' (every candidate, measured) or a recipe like prune:0.5+int8 "
              "[default: the profile's recipe]. Any other recipe than the profile's is an experiment: measured and "
              "reported, not shipped unless --ship.")
@click.option("--ship", is_flag=True, help="Make the experiment's variant what the profile ships (if it fits).")
@click.option("--student", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A Keras student architecture for distill:student (its weights are not used).")
@DATA_DIR
@JSON
def model_build(
    model_ref: str, profiles: tuple[str, ...], recipe: str | None, ship: bool, student: Path | None, data_dir: Path,
    as_json: bool,
) -> None:
    """Compress NAME[:VERSION] for each profile, measure every variant, and pick one."""
    from server.compression import build_profiles

    workspace = open_workspace(data_dir)
    reports = build_profiles(workspace.db, workspace.blobs, model_ref, list(profiles), recipe=recipe,
                             student=student, progress=lambda line: click.echo(line, err=True), ship=ship,
                             actor=audit.operator())
    _print_reports(reports, as_json)
    if not as_json:
        for report in reports:
            if report.experiment is not None:
                click.echo(experiment_summary(report))
    problems = [problem for r in reports if (problem := build_problem(r))]
    if problems:
        raise click.ClickException("; ".join(problems))


def experiment_summary(report: ProfileReport) -> str:
    outcome = report.experiment
    assert outcome is not None
    ships = outcome.ships or "nothing yet (its own build makes a variant to ship)"
    if outcome.shipped:
        return f"shipped: {report.profile} now ships {outcome.recipe} of {report.model}:{report.version} (--ship)"
    return (f"experiment: {outcome.recipe} was measured for {report.profile}, not shipped; "
            f"{report.profile} ships {ships}")


def build_problem(report: ProfileReport) -> str | None:
    """Why a build should exit non-zero, or None."""
    outcome = report.experiment
    if outcome is None:
        return None if report.chosen is not None else f"no variant fits profile {report.profile}: see the verdicts above"
    variant = report.variant(outcome.recipe)
    assert variant is not None
    if variant.verdict == "failed":
        return f"the experiment {outcome.recipe} failed for profile {report.profile}: {variant.reason}"
    if outcome.ship and not outcome.shipped:
        return (f"not shipped: {outcome.recipe} is {variant.verdict} for profile {report.profile} ({variant.reason}); "
                f"{report.profile} still ships {outcome.ships or 'nothing'}")
    return None


@model_group.command("report")
@click.argument("model_ref", metavar="NAME[:VERSION]")
@click.option("--profile", default=None, help="Only this profile.")
@DATA_DIR
@JSON
def model_report(model_ref: str, profile: str | None, data_dir: Path, as_json: bool) -> None:
    """The compression report: every variant built for each profile, and the one chosen."""
    from server.compression import compression_report

    _print_reports(compression_report(open_workspace(data_dir).db, model_ref, profile), as_json)


def _print_reports(reports: list[ProfileReport], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([report_json(r) for r in reports], indent=2))
        return
    click.echo("\n\n".join(report_table(r) for r in reports))


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


def report_table(report: ProfileReport) -> str:
    float32 = next((v for v in report.variants if v.recipe == "float32" and v.size_bytes), None)
    base = float32.size_bytes if float32 else None
    base_p50 = float32.p50_ms if float32 else None

    def ratio(value: float | None, reference: float | None) -> str:
        return f"{value / reference:.2f}x" if value and reference else "-"

    rows = [
        [
            ("* " if v.chosen else "  ") + v.recipe + (" [experiment]" if is_experiment(v) else ""), cell(v.size_bytes), ratio(v.size_bytes, base), cell(v.gzip_bytes),
            cell(v.accuracy, ".4f"),
            f"{v.accuracy - report.reference_accuracy:+.4f}" if v.accuracy is not None else "-",
            cell(v.p50_ms, ".4f"), ratio(v.p50_ms, base_p50), cell(v.p95_ms, ".4f"), human_bytes(v.peak_rss_bytes),
            v.verdict, v.reason or str(v.details.get("encoding", "")),
        ]
        for v in report.variants
    ]
    header = (f"{report.model}:{report.version} for {report.profile} (objective {report.objective}, budget "
              f"{report.accuracy_budget:g} below float32 accuracy {report.reference_accuracy:.4f}); * = chosen (ships)")
    if any(is_experiment(v) for v in report.variants):
        header += "\n[experiment] = built with 'model build --recipe', not the profile's own recipe: shipped only with --ship"
    if not report.eval_labelled:
        header += "\n(the eval set has no labels: ACCURACY is top-1 agreement with the float model)"
    return header + "\n" + table(
        ["RECIPE", "BYTES", "VS F32", "GZIP", "ACCURACY", "DELTA", "P50 MS", "VS F32", "P95 MS", "RSS", "VERDICT",
         "WHY"], rows,
    ) + load_errors_table(report)


def load_errors_table(report: ProfileReport) -> str:
    """Who reported that their runtime could not load a variant; empty when nobody did."""
    known = by_pair(report.load_errors)
    rows = [
        [v.recipe, e.runtime, "confirmed" if known[e.model_sha256, e.runtime].confirmed else "unconfirmed", e.device,
         cell(e.deployment_id), e.reported_at.strftime("%Y-%m-%d %H:%MZ"), e.reason]
        for v in report.variants for e in report.load_errors_of(v)
    ]
    if not rows:
        return ""
    return (f"\n\nload errors reported by devices (a runtime with {CONFIRMATIONS}+ reports is refused at rollout "
            "unless --ignore-load-errors):\n"
            + table(["RECIPE", "RUNTIME", "STATUS", "DEVICE", "DEPLOYMENT", "REPORTED", "REASON"], rows))
