"""``edgefleet latency``: a device's, profile's or model version's served latency over time, from the same read
model as the HTTP API (``--json`` prints exactly what the API returns)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from server.cli_options import DATA_DIR, JSON, duration_seconds, given_db_url
from server.render import cell, table


def _model_ref(value: str) -> tuple[str, int]:
    name, sep, version = value.rpartition(":")
    if not sep or not name or not version.isdigit():
        raise click.BadParameter(f"expected NAME:VERSION, e.g. digits:2, got {value!r}", param_hint="--model")
    return name, int(version)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@click.command("latency")
@click.option("--device", default=None, help="A device, by name.")
@click.option("--profile", default=None, help="Every device of a profile, merged.")
@click.option("--model", "model_ref", default=None, metavar="NAME:VERSION", help="One model version, fleet-wide.")
@click.option("--since", default="1h", show_default=True,
              help="Start: 'now', a duration back from now (1h), epoch seconds, or ISO-8601.")
@click.option("--until", default="now", show_default=True, help="End (exclusive), in the same forms as --since.")
@click.option("--step", "step_s", metavar="DURATION", callback=duration_seconds, default=None,
              help="Width of each row (e.g. 1m) [default: at most 120 rows].")
@JSON
@DATA_DIR
def latency_command(device: str | None, profile: str | None, model_ref: str | None, since: str, until: str,
                    step_s: float | None, as_json: bool, data_dir: Path) -> None:
    """Served-model latency over time (p50/p90/p99 of invoke times, merged from on-device histograms), for
    one of --device, --profile or --model; times are UTC."""
    from server.latency import device_latency, model_latency, profile_latency, series_json
    from server.latency.timespec import auto_step, parse_time
    from server.setup import open_workspace
    from shared.errors import UserInputError

    if sum(x is not None for x in (device, profile, model_ref)) != 1:
        raise click.UsageError("give exactly one of --device, --profile or --model")
    model = _model_ref(model_ref) if model_ref is not None else None
    now = time.time()
    try:
        start, end = parse_time(since, now), parse_time(until, now)
    except UserInputError as exc:
        raise click.BadParameter(str(exc), param_hint="--since/--until") from exc
    step = step_s if step_s is not None else auto_step(start, end)
    db = open_workspace(data_dir, db_url=given_db_url()).db
    if device is not None:
        series = device_latency(db, device, since=start, until=end, step_s=step)
    elif profile is not None:
        series = profile_latency(db, profile, since=start, until=end, step_s=step)
    else:
        assert model is not None
        series = model_latency(db, model[0], model[1], since=start, until=end, step_s=step)
    if as_json:
        click.echo(json.dumps(series_json(series), indent=2))
        return
    title = f"{series.scope} {series.name}: {_when(series.since)} to {_when(series.until)} UTC, step {step:g} s"
    click.echo(title)
    if not series.points:
        click.echo("no serving reports in this range")
        return
    rows = [[_when(p.start), str(p.stats.calls), cell(p.stats.p50_ms, ".2f"), cell(p.stats.p90_ms, ".2f"),
             cell(p.stats.p99_ms, ".2f"), str(p.stats.errors), ",".join(p.sources)] for p in series.points]
    click.echo(table(["time", "calls", "p50 ms", "p90 ms", "p99 ms", "errors", "source"], rows))
    for v in series.versions:
        click.echo(f"{v.model}:{v.version}: {v.stats.calls} calls, p50 {cell(v.stats.p50_ms, '.2f')} ms, "
                   f"p99 {cell(v.stats.p99_ms, '.2f')} ms, {v.stats.errors} errors")
    for c in series.changes:
        previous = f" (was {c.previous_version})" if c.previous_version is not None else ""
        click.echo(f"{_when(c.ts)}: {c.device} now serves {c.model}:{c.version}{previous}")
