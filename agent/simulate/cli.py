"""``edgefleet simulate``: run a fleet of simulated devices against a real broker and server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from agent.simulate.fleet import FleetSummary, config_paths
from agent.simulate.network import DeviceName
from agent.simulate.runtime import SimulatedRuntime
from agent.simulate.workers import run_fleet, run_split
from edgefleet.cli import log_level_chosen


def _latency(value: str) -> tuple[float, float]:
    try:
        numbers = [float(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2):
        raise click.BadParameter(f"expected P50 or P50,P95 in milliseconds, got {value!r}", param_hint="--latency-ms")
    return numbers[0], numbers[-1] if len(numbers) == 2 else numbers[0] * 1.5


@click.command("simulate")
@click.option("--configs", "config_dir", type=click.Path(path_type=Path, file_okay=False, exists=True), required=True,
              help="A directory of agent.toml files ('edgefleet device register-fleet --out-dir').")
@click.option("--devices", type=int, default=None, help="Run the first N configs [default: all of them].")
@click.option("--broker", default=None, help="Broker URL for every device instead of the one in its config.")
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Split the devices over this many processes.")
@click.option("--latency-ms", "latency", default="2,3", show_default=True, metavar="P50[,P95]",
              help="What each trial reports (jittered); P95 defaults to 1.5 x P50.")
@click.option("--accuracy", type=float, default=None,
              help="What each trial reports (jittered) [default: the host accuracy of the variant on trial].")
@click.option("--fail-fraction", type=float, default=0.0, show_default=True,
              help="This fraction of the devices (the same ones every run) report an accuracy far too low.")
@click.option("--trial-seconds", type=float, default=0.0, show_default=True, help="How long each trial takes.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds [default: SIGINT/SIGTERM].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def simulate_command(
    ctx: click.Context, config_dir: Path, devices: int | None, broker: str | None, processes: int, latency: str,
    accuracy: float | None, fail_fraction: float, trial_seconds: float, duration: float | None, as_json: bool,
) -> None:
    """Run simulated devices: each the real agent (signed directives, root of trust, chunked download,
    slots, outbox, state reports) with a stand-in runtime whose trials report the configured numbers.
    A few threads per process, whatever the number of devices. Prints a summary when stopped."""
    p50, p95 = _latency(latency)
    runtime = SimulatedRuntime(p50_ms=p50, p95_ms=p95, accuracy=accuracy, fail_fraction=fail_fraction,
                               trial_seconds=trial_seconds)
    paths = config_paths(config_dir, devices)
    root = logging.getLogger()
    if not log_level_chosen(ctx):
        root.setLevel(logging.WARNING)  # thousands of devices: their info lines would drown everything
    for handler in root.handlers:
        handler.addFilter(DeviceName())
    stop: Any = multiprocessing.get_context("spawn").Event() if processes > 1 else threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if processes > 1:
        summary = run_split(paths, runtime, stop, processes, broker=broker, duration=duration,
                            log_level=root.level)
    else:
        summary = run_fleet(paths, runtime, stop, broker=broker, duration=duration)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else render(summary))


def render(summary: FleetSummary) -> str:
    outcomes = ", ".join(f"{n} {state}" for state, n in summary.outcomes.items()) or "none"
    active = ", ".join(f"{n} on {model}" for model, n in summary.active.items())
    return "\n".join([
        (f"simulated {summary.devices} devices in {summary.processes} process(es) for {summary.seconds:.1f} s "
        f"(started in {summary.start_seconds:.1f} s); {summary.connected} connected at the end"),
        f"last deployments: {outcomes}",
        f"active models: {active}",
        f"connection attempts: {summary.connect_attempts} ({summary.connect_failures} failed)",
        (f"threads: {summary.threads} ({summary.threads_per_1000_devices:.1f} per 1,000 devices); resident memory "
        f"{summary.rss_bytes / 2**20:.0f} MiB, {summary.rss_per_1000_devices_mib:.0f} MiB per 1,000 devices "
        "beyond the process's own"),
    ])
