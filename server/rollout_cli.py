"""``edgefleet rollout ...`` and ``edgefleet events``: thin wrappers over ``server.rollouts``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from server.cli_options import DATA_DIR, JSON, given_db_url
from server.render import cell, human_bytes, table
from server.rollouts.policy import DEFAULT_LATENCY_SLACK_MS
from server.rollouts.read_model import AuditEntry, RolloutStatus, RolloutSummary

WAVES_HELP = ("Cumulative wave sizes, each a count or a share of the selection; the last wave always reaches "
              "every device.")


@click.group("rollout")
def rollout_group() -> None:
    """Roll a model out to a fleet in waves, watch it, pause, resume, abort or roll it back."""


@rollout_group.command("start")
@click.argument("model_ref", metavar="NAME[:VERSION]")
@DATA_DIR
@click.option("--profile", "profiles", multiple=True, help="Select every device of this profile (repeatable).")
@click.option("--tag", "tags", multiple=True, metavar="K=V",
              help="Select devices carrying this tag (repeatable: all must match; combined with --profile).")
@click.option("--device", "devices", multiple=True, help="Select this device by name (repeatable; always included).")
@click.option("--waves", default="1,100%", show_default=True, help=WAVES_HELP)
@click.option("--min-reports", default=None, metavar="N|P%",
              help="Reports a wave needs before its gate decides [default: all of its devices, or their timeout].")
@click.option("--max-failure-ratio", type=float, default=0.0, show_default=True,
              help="Failed (or timed-out) devices a wave may have, as a share of its reports.")
@click.option("--min-accuracy", type=float, default=0.0, show_default=True, help="Absolute on-device accuracy floor.")
@click.option("--max-accuracy-drop", type=float, default=0.02, show_default=True,
              help="Allowed on-device accuracy drop below the float model's host reference.")
@click.option("--max-regression", type=float, default=0.01, show_default=True,
              help="Allowed accuracy drop below the model it replaces, on the same device and eval samples.")
@click.option("--max-p95-ms", type=float, default=None, help="On-device p95 latency ceiling in milliseconds.")
@click.option("--max-latency-ratio", type=float, default=1.5, show_default=True,
              help="Allowed on-device p95 ÷ the replaced model's p95 (same device, same trial).")
@click.option("--latency-slack-ms", type=float, default=DEFAULT_LATENCY_SLACK_MS, show_default=True,
              help="A p95 at most this many ms above the replaced model's passes whatever its ratio "
                   "(the ratio of microsecond timings is noise).")
@click.option("--report-timeout", "report_timeout", type=float, default=1800.0, show_default=True,
              help="Seconds a device has to report after it was sent the rollout; then it counts as failed.")
@click.option("--on-failure", type=click.Choice(["rollback", "pause"]), default="rollback", show_default=True,
              help="What a failed wave gate does.")
@click.option("--ignore-load-errors", is_flag=True,
              help="Send a variant even to runtimes that devices confirmed cannot load it (still warns).")
def rollout_start(
    model_ref: str, data_dir: Path, profiles: tuple[str, ...], tags: tuple[str, ...], devices: tuple[str, ...],
    waves: str, min_reports: str | None, max_failure_ratio: float, min_accuracy: float, max_accuracy_drop: float,
    max_regression: float, max_p95_ms: float | None, max_latency_ratio: float, latency_slack_ms: float,
    report_timeout: float, on_failure: str, ignore_load_errors: bool,
) -> None:
    """Roll NAME[:VERSION] out to the selected devices; prints the rollout id.

    The running server delivers it wave by wave: a wave starts once the one before passed its gate.
    """
    from server import audit
    from server.build_progress import build_progress
    from server.rollouts import OnFailure, RolloutPolicy, parse_waves, start_rollout
    from server.rollouts.policy import parse_size
    from server.selection import Selection, parse_tag
    from server.setup import open_workspace

    policy = RolloutPolicy(
        waves=parse_waves(waves), min_reports=parse_size(min_reports, "--min-reports") if min_reports else None,
        max_failure_ratio=max_failure_ratio, min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop,
        max_regression=max_regression, max_p95_ms=max_p95_ms, max_latency_ratio=max_latency_ratio,
        latency_slack_ms=latency_slack_ms, report_timeout_s=report_timeout, on_failure=OnFailure(on_failure),
    )
    selection = Selection(profiles=tuple(profiles), tags=tuple(sorted(parse_tag(t) for t in tags)),
                          devices=tuple(devices))
    workspace = open_workspace(data_dir, db_url=given_db_url())
    with build_progress() as progress:  # a profile not built yet is built first
        rollout_id = start_rollout(
            workspace.db, workspace.blobs, workspace.keys(), model_ref, selection, policy,
            progress=progress, ignore_load_errors=ignore_load_errors,
            warn=lambda message: click.echo(f"warning: {message}", err=True), actor=audit.operator(),
        )
    click.echo(rollout_id)


@rollout_group.command("list")
@DATA_DIR
@JSON
def rollout_list(data_dir: Path, as_json: bool) -> None:
    """Recent rollouts, newest first."""
    from server.rollouts import list_rollouts
    from server.rollouts.read_model import summary_json
    from server.setup import open_workspace

    rows = list_rollouts(open_workspace(data_dir, db_url=given_db_url()).db)
    click.echo(json.dumps([summary_json(r) for r in rows], indent=2) if as_json else list_table(rows))


def list_table(rows: list[RolloutSummary]) -> str:
    return table(
        ["ROLLOUT", "MODEL", "STATE", "WAVES", "DEVICES", "COMMITTED", "FAILED", "SELECTION", "CREATED"],
        [[r.rollout, f"{r.model}:{r.version}", r.state, r.waves, str(r.devices), str(r.committed), str(r.failed),
          r.selection, r.created_at.strftime("%Y-%m-%d %H:%M:%SZ")] for r in rows],
    )


@rollout_group.command("status")
@click.argument("rollout_id")
@DATA_DIR
@JSON
def rollout_status_command(rollout_id: str, data_dir: Path, as_json: bool) -> None:
    """Every wave with each gate's measured value against its threshold, then every device."""
    from server.rollouts import rollout_status
    from server.rollouts.read_model import status_json
    from server.setup import open_workspace

    status = rollout_status(open_workspace(data_dir, db_url=given_db_url()).db, rollout_id)
    click.echo(json.dumps(status_json(status), indent=2) if as_json else status_table(status))


def _gate_cell(measured: float | None, threshold: float | None, passed: bool) -> str:
    mark = "ok" if passed else "FAIL"
    return f"{cell(measured, '.4g')} / {cell(threshold, '.4g')} {mark}"


def status_table(status: RolloutStatus) -> str:
    header = f"rollout {status.rollout}: {status.model}:{status.version}  {status.state}"
    if status.state_reason:
        header += f" ({status.state_reason})"
    header += f"\nselection: {status.selection}; on failure: {status.policy.on_failure.value}"
    gate_names = [g.name for g in status.waves[0].gates] if status.waves and status.waves[0].gates else [
        "reports", "failure_ratio", "accuracy", "regression", "p95_ms", "latency_ratio"]
    waves = table(
        ["WAVE", "SIZE", "DEVICES", "STATE", *(n.upper() for n in gate_names)],
        [[str(w.index + 1), w.spec, cell(w.target_count), w.state,
          *(_gate_cell(g.measured, g.threshold, g.passed) for g in w.gates)]
         + ["-"] * (len(gate_names) - len(w.gates))
         for w in status.waves],
    )
    devices = table(
        ["DEVICE", "PROFILE", "WAVE", "STATE", "VARIANT", "SIZE", "P50 MS", "P95 MS", "PREV P95", "ACCURACY",
         "PREV ACC", "GATE", "REASON"],
        [
            [
                d.device, d.profile, cell(d.wave + 1 if d.wave is not None else None),
                d.state + (" (timed out)" if d.timed_out else "") + (f", reverted: {d.reverted}" if d.reverted else ""),
                d.recipe, human_bytes(d.size_bytes), cell(d.p50_ms, ".3f"), cell(d.p95_ms, ".3f"),
                cell(d.previous_p95_ms, ".3f"), cell(d.accuracy, ".4f"), cell(d.previous_accuracy, ".4f"),
                cell(d.gate, ".4f"), d.reason,
            ]
            for d in status.devices
        ],
    )
    return f"{header}\n\n{waves}\n\n{devices}"


def _control(name: str, action: Callable[..., None], done: str, help_text: str) -> click.Command:
    @click.command(name, help=help_text)
    @click.argument("rollout_id")
    @DATA_DIR
    def command(rollout_id: str, data_dir: Path) -> None:
        from server import audit
        from server.setup import open_workspace

        action(open_workspace(data_dir, db_url=given_db_url()).db, rollout_id, audit.operator())
        click.echo(f"{rollout_id} {done}; the running server carries it out")

    return command


def _register_controls() -> None:
    from server.rollouts import control

    for name, action, done in (
        ("pause", control.pause_rollout, "paused"),
        ("resume", control.resume_rollout, "resumed"),
        ("abort", control.abort_rollout, "aborted"),
        ("rollback", control.rollback_rollout, "rolled back"),
    ):
        rollout_group.add_command(_control(name, action, done, (action.__doc__ or "").strip().splitlines()[0]))


_register_controls()


@click.command("events")
@DATA_DIR
@click.option("--rollout", "rollout_id", default=None, help="Only this rollout.")
@click.option("--device", "device_name", default=None, help="Only this device.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the newest N.")
@JSON
def events_command(data_dir: Path, rollout_id: str | None, device_name: str | None, limit: int | None,
                   as_json: bool) -> None:
    """The audit log: every rollout decision and operator action, oldest first."""
    from server.rollouts import list_events
    from server.rollouts.read_model import entry_json
    from server.setup import open_workspace

    entries = list_events(open_workspace(data_dir, db_url=given_db_url()).db, rollout_id=rollout_id, device_name=device_name, limit=limit)
    click.echo(json.dumps([entry_json(e) for e in entries], indent=2) if as_json else events_table(entries))


def events_table(entries: list[AuditEntry]) -> str:
    return table(
        ["TIME", "EVENT", "ROLLOUT", "DEVICE", "BY", "WHAT"],
        [[e.ts.strftime("%Y-%m-%d %H:%M:%SZ"), e.kind, cell(e.rollout), cell(e.device), e.actor, e.message]
         for e in entries],
    )
