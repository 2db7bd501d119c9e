"""Operator commands: thin click wrappers that call a service and render the result."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import click

from server import audit
from server.catalog import ModelSummary
from server.cli_options import DATA_DIR, JSON, duration_seconds, given_db_url
from server.compression import ProfileReport
from server.db import Database
from server.model_read_model import model_json, report_json
from server.paths import DataDir
from server.render import cell, human_bytes, table
from server.report_text import ops_section, report_table
from server.setup import Workspace, init_data_dir, open_workspace
from shared.mqtt import BrokerAddress

if TYPE_CHECKING:
    from server.enrolment import Enrolment

logger = logging.getLogger(__name__)


def server_broker(data_dir: DataDir, url: str | None, replica: str = "main") -> BrokerAddress:
    """The broker the server connects to, as its own identity (the replica's) when the data directory has a
    broker set up."""
    from server.broker_setup import BrokerLayout, server_address
    from server.replicas import broker_username

    layout = BrokerLayout(data_dir.broker)
    if layout.exists():
        return server_address(layout, url, broker_username(replica))
    return BrokerAddress.parse(url or "mqtt://127.0.0.1:1883")


@click.command("init")
@DATA_DIR
@click.option("--release-key", "release_key", type=click.Choice(["offline", "online"]), default=None,
              help="Where the release private key (it signs every model release) lives. offline [the default for a "
                   "new data directory]: written to --release-key-out, never into the data directory; releases are "
                   "signed with 'edgefleet release sign' and imported. online: keys/release.pem, and this server "
                   "signs releases itself (single-box installs). An existing data directory keeps its mode.")
@click.option("--release-key-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Offline release key: where to write its private key (mode 0600, never overwritten). Keep it off "
                   "the server.")
@click.option("--broker-host", "broker_hosts", multiple=True, metavar="HOST",
              help="A host name or IP address devices reach the broker by (repeatable); the first goes into device "
                   "configs, all go into the broker's TLS certificate [default: 127.0.0.1, a single box].")
@click.option("--broker-listen", metavar="HOST:PORT", default=None,
              help="Where 'edgefleet broker' listens [default: 0.0.0.0:8883].")
@click.option("--tls/--no-tls", "tls", default=None,
              help="MQTT over TLS with the fleet's private CA (the default) or plain MQTT (a closed lab network).")
@click.option("--client-certificates/--no-client-certificates", "client_certificates", default=None,
              help="mTLS: every client also presents a certificate signed by the fleet CA [default: off].")
def init_command(data_dir: Path, release_key: str | None, release_key_out: Path | None, broker_hosts: tuple[str, ...],
                 broker_listen: str | None, tls: bool | None, client_certificates: bool | None) -> None:
    """Create keys, the root of trust, the database, an operator API token and the fleet broker's configuration
    in a data directory (safe to run again; options given again change only what they name)."""
    from server.api_tokens import ensure_admin_token
    from server.broker_setup import BrokerLayout, setup_broker
    from server.keys import ReleaseKeyMode

    workspace = init_data_dir(data_dir, release_key=ReleaseKeyMode(release_key) if release_key else None,
                              release_key_out=release_key_out, new_release_key=ReleaseKeyMode.OFFLINE,
                              db_url=given_db_url())
    setup = workspace.key_setup
    assert setup is not None
    layout = BrokerLayout(workspace.data_dir.broker)
    settings, changed = setup_broker(layout, hosts=broker_hosts, listen=broker_listen, tls=tls,
                                     client_certificates=client_certificates)
    click.echo(f"initialised {workspace.data_dir.root}")
    if setup.mode is ReleaseKeyMode.OFFLINE:
        where = f"written to {setup.release_key_written}; " if setup.release_key_written else ""
        click.echo(f"release key: offline ({where}this data directory holds no release private key: sign releases "
                   "with 'edgefleet release sign' and bring them in with 'edgefleet release import')")
    else:
        click.echo(f"release key: online ({workspace.data_dir.keys / 'release.pem'}: this server signs releases "
                   "itself; 'edgefleet init --release-key offline' keeps a new data directory's off the server)")
    click.echo(f"root of trust: v{setup.root_version}{' (new)' if setup.created_root else ''}; "
               "'edgefleet keys show' lists its keys")
    if setup.note:
        click.echo(f"note: {setup.note}", err=True)
    security = "TLS with the fleet CA" if settings.tls else "plain MQTT, no TLS"
    if settings.client_certificates:
        security += " and client certificates"
    click.echo(f"broker: per-device identities and topic ACLs, anonymous access off, {security}; devices connect to "
               f"{settings.device_url()}; run it with 'edgefleet broker --data-dir {data_dir}'")
    if changed:
        click.echo("note: the broker settings changed; device configs written before name the old ones", err=True)
    if ensure_admin_token(workspace.db, workspace.data_dir) is not None:
        click.echo(f"API token 'admin' (operator) written to {workspace.data_dir.api_token} (mode 0600); "
                   "'edgefleet token' manages tokens")


def enrolment_service(workspace: Workspace) -> Enrolment | None:
    """What serves ``/enrol``: a data directory with a broker set up enrols devices into it."""
    from server.broker_setup import BrokerLayout
    from server.enrolment import Enrolment

    layout = BrokerLayout(workspace.data_dir.broker)
    return Enrolment(workspace.db, layout, workspace.data_dir.keys) if layout.exists() else None


@click.command("server")
@DATA_DIR
@click.option("--broker", default=None,
              help="MQTT 5 broker, mqtt(s)://HOST:PORT [default: the data directory's broker on this machine, as "
                   "'edgefleet broker' runs it; without one mqtt://127.0.0.1:1883]. The server connects as its own "
                   "broker identity and pins the fleet CA.")
@click.option("--http", "http_address", default="127.0.0.1:8080", show_default=True,
              help="Dashboard and JSON API address, HOST:PORT, or 'off'. Beyond loopback every request needs an "
                   "API token ('edgefleet token').")
@click.option("--auth/--no-auth", "auth", default=None,
              help="Require an API token on loopback too (--auth) [default: only beyond loopback; --no-auth beyond "
                   "loopback is refused].")
@click.option("--http-cert", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Serve the dashboard, API and enrolment over HTTPS with this certificate (PEM; with --http-key), "
                   "e.g. the one init made: DATA_DIR/broker/tls/server.pem.")
@click.option("--http-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The private key (PEM) of --http-cert.")
@click.option("--latency-raw-retention", "raw_retention", metavar="DURATION", callback=duration_seconds,
              default="24h", show_default=True,
              help="How long serving reports are kept as they arrived (e.g. 90s, 15m, 24h, 30d).")
@click.option("--latency-rollup-step", "rollup_step", metavar="DURATION", callback=duration_seconds,
              default="1m", show_default=True,
              help="The step older serving reports are merged into (whole seconds, at most the raw retention).")
@click.option("--latency-rollup-retention", "rollup_retention", metavar="DURATION", callback=duration_seconds,
              default="30d", show_default=True,
              help="How long the merged (rolled-up) serving reports are kept.")
@click.option("--replica", "replica", envvar="EDGEFLEET_REPLICA", default="main", show_default=True, metavar="NAME",
              help="This server replica's name (a-z, 0-9, '-'): its MQTT session and, on the fleet broker, its "
                   "identity (edgefleet-server-NAME; 'main' is edgefleet-server).")
@click.option("--blob-dir", "blob_dir", envvar="EDGEFLEET_BLOB_DIR", default=None, metavar="DIR",
              type=click.Path(path_type=Path, file_okay=False),
              help="The artifact store, a directory every replica and command reaches [default: DATA_DIR/artifacts]. "
                   "Other commands read $EDGEFLEET_BLOB_DIR.")
def server_command(data_dir: Path, broker: str | None, http_address: str, auth: bool | None, http_cert: Path | None,
                   http_key: Path | None, raw_retention: float, rollup_step: float, rollup_retention: float,
                   replica: str, blob_dir: Path | None) -> None:
    """Run the server until stopped (Ctrl-C). Several replicas may share one PostgreSQL database, one broker and
    one data directory (or blob directory, $EDGEFLEET_BLOB_DIR): one of them (the engine lease's holder) runs
    the rollouts; all of them share the ingest."""
    from server.latency.retention import RetentionPolicy
    from server.replicas import check_replica_name
    from server.server_lock import SingleServerLock
    from server.service import ServerService
    from server.web import WebServer
    from server.web.server import TlsFiles
    from shared.errors import UserInputError

    try:
        retention = RetentionPolicy(raw_retention, rollup_step, rollup_retention)
        check_replica_name(replica)
    except UserInputError as exc:
        raise click.BadParameter(str(exc), param_hint="--latency-* or --replica") from exc
    if (http_cert is None) != (http_key is None):
        raise click.UsageError("--http-cert and --http-key go together")
    tls = TlsFiles(http_cert, http_key) if http_cert is not None and http_key is not None else None
    if http_address == "off" and (tls is not None or auth is not None):
        raise click.UsageError("--auth, --no-auth, --http-cert and --http-key need --http HOST:PORT, not 'off'")
    workspace = open_workspace(data_dir, db_url=given_db_url(), blobs=blob_dir)
    lock = None
    if workspace.db.engine.dialect.name == "sqlite":  # one server per file; replicas need PostgreSQL
        lock = SingleServerLock(workspace.data_dir.server_lock, workspace.data_dir.database)
        lock.acquire()
    address = server_broker(workspace.data_dir, broker, replica)
    dashboard = None
    if http_address != "off":
        host, _, port = http_address.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise click.BadParameter(f"expected HOST:PORT or 'off', got {http_address!r}", param_hint="--http")
        try:
            dashboard = WebServer(workspace.db, host, int(port), auth=auth, tls=tls,  # TLS files are loaded here
                                  enrolment=enrolment_service(workspace))
        except UserInputError as exc:  # --no-auth beyond loopback
            raise click.UsageError(str(exc)) from exc
        except OSError as exc:
            raise click.ClickException(f"cannot serve the dashboard on {http_address}: {exc.strerror or exc}") from exc
        _warn_without_tokens(workspace.db, dashboard.auth_required)
    service = ServerService(workspace.data_dir, address, db=workspace.db, retention=retention, replica=replica,
                            blobs=workspace.blobs)
    if dashboard is not None:
        try:
            dashboard.start()
        except OSError as exc:
            raise click.ClickException(f"cannot serve the dashboard on {http_address}: {exc.strerror or exc}") from exc

    def stop(signum: int, frame: FrameType | None) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    click.echo(f"edgefleet server on {workspace.data_dir.root}, broker {address.url()}", err=True)
    logger.info("serving latency retention: %s", retention.describe())
    if dashboard is not None:
        needs = (f"API token needed (the admin token is in {workspace.data_dir.api_token})" if dashboard.auth_required
                 else "open on loopback")
        click.echo(f"dashboard {dashboard.url} ({needs})", err=True)
    try:
        service.run()
    finally:
        if dashboard is not None:
            dashboard.stop()
        if lock is not None:
            lock.release()


def _warn_without_tokens(db: Database, auth_required: bool) -> None:
    from server.api_tokens import list_tokens

    if auth_required and not any(t.active for t in list_tokens(db)):
        click.echo("warning: the API needs a token and there is no active one: create one with "
                   "'edgefleet token create NAME --scope read|operator|metrics'", err=True)


# -- models ----------------------------------------------------------------------


@click.group("model")
def model_group() -> None:
    """Add models and list their versions."""


@model_group.command("add")
@click.argument("name")
@click.option("--file", "model_file", type=click.Path(path_type=Path), required=True,
              help="Keras model (.keras or .h5), a TensorFlow SavedModel directory, a PyTorch torch.export "
                   "program (.pt2, needs edgefleet[torch]), or a prebuilt .tflite.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Evaluation data: .npz with arrays x (inputs) and y (integer labels).")
@click.option("--train", "train_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Training data (.npz, x and y) for the steps that retrain: pruning, distillation, low-rank.")
@DATA_DIR
def model_add(name: str, model_file: Path, eval_file: Path, train_file: Path | None, data_dir: Path) -> None:
    """Add a new version of model NAME."""
    from server.catalog import add_model

    workspace = open_workspace(data_dir, db_url=given_db_url())
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

    models = list_models(open_workspace(data_dir, db_url=given_db_url()).db)
    if as_json:
        click.echo(json.dumps([model_json(m) for m in models], indent=2))
    elif not models:
        click.echo("no models yet: add one with 'edgefleet model add'")
    else:
        click.echo(model_table(models))


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
@click.option("--measure-on", "measure_on", multiple=True, metavar="DEVICE",
              help="Also time every candidate on this online device of the profile (repeatable; a benchmark-only "
                   "trial, never installed) and choose by its numbers. Needs the server running and the release "
                   "key online.")
@click.option("--measure-timeout", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="Seconds to wait for the devices' numbers; without them the host's stand.")
@DATA_DIR
@JSON
def model_build(
    model_ref: str, profiles: tuple[str, ...], recipe: str | None, ship: bool, student: Path | None,
    measure_on: tuple[str, ...], measure_timeout: float, data_dir: Path, as_json: bool,
) -> None:
    """Compress NAME[:VERSION] for each profile, measure every variant, and pick one."""
    from server.build_progress import build_progress
    from server.compression import build_profiles

    workspace = open_workspace(data_dir, db_url=given_db_url())
    with build_progress() as progress:
        reports = build_profiles(workspace.db, workspace.blobs, model_ref, list(profiles), recipe=recipe,
                                 student=student, progress=progress, ship=ship, actor=audit.operator(),
                                 measure_on=measure_on, keys=workspace.keys() if measure_on else None,
                                 measure_timeout_s=measure_timeout)
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
@click.option("--ops", "with_ops", is_flag=True,
              help="Also each variant's TFLite graph: operator counts, XNNPACK coverage, fused layers.")
@DATA_DIR
@JSON
def model_report(model_ref: str, profile: str | None, with_ops: bool, data_dir: Path, as_json: bool) -> None:
    """The compression report: every variant built for each profile, and the one chosen."""
    from server.compression import compression_report

    reports = compression_report(open_workspace(data_dir, db_url=given_db_url()).db, model_ref, profile)
    _print_reports(reports, as_json, with_ops=with_ops)


def _print_reports(reports: list[ProfileReport], as_json: bool, *, with_ops: bool = False) -> None:
    if as_json:  # the graph is in each variant's details
        click.echo(json.dumps([report_json(r) for r in reports], indent=2))
        return
    click.echo("\n\n".join(report_table(r) + (ops_section(r) if with_ops else "") for r in reports))


