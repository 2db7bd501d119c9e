"""Chunk fan-out benchmark: how long agents that join a wave late wait, and what the wave costs in egress.

    python bench/fanout.py [--quick]

A real Mosquitto on a free port, the real ``ServerService`` loop, and
agent-like MQTT clients (``tests/server/fanout_harness.py``: subscribe to the
chunk filter, ask once for every chunk, re-ask for what is missing after the
agent's 5 s interval). First a lone agent downloads the artifact several times
(the baseline: the median), then waves of N agents join evenly spread over a
few hundred milliseconds, the way a wave's devices act on directives sent in
one engine tick. "Late joiners" subscribed after the wave's first chunk had
already gone out. Each wave downloads a fresh random artifact from the same
server. Rows with window 0 turn coalescing off (each want is served at once),
to show what coalescing saves. Ratios are against the lone agent measured in
the same run; "copies" is how many times the server published each chunk,
"egress" the bytes it published in artifacts. Prints one table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tables import markdown_table
from server.broker import Mosquitto
from server.chunks import DEFAULT_WINDOW_S
from server.setup import Workspace, init_data_dir
from shared.messages import DEFAULT_CHUNK_SIZE
from shared.mqtt import BrokerAddress
from tests.server.fanout_harness import (
    ChunkPublishCounter,
    Download,
    add_servable_blob,
    download_wave,
    running_server,
    wait_until_flushed,
)


@dataclass(frozen=True)
class Scenario:
    agents: int
    spread_s: float
    window_s: float = DEFAULT_WINDOW_S


@dataclass(frozen=True)
class Row:
    scenario: Scenario
    downloads: list[Download]
    copies: list[int]  # publishes per chunk
    egress: float  # bytes published / artifact size

    def late_joiners(self) -> list[Download]:
        first_out = min(d.first_chunk_at for d in self.downloads if d.first_chunk_at is not None)
        return [d for d in self.downloads if d.joined_at > first_out]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_scenario(workspace: Workspace, broker: BrokerAddress, scenario: Scenario, size: int, run: int) -> Row:
    data = os.urandom(size)
    sha256 = add_servable_blob(workspace, data, name=f"bench-{run}")
    offsets = [i * scenario.spread_s / max(1, scenario.agents - 1) for i in range(scenario.agents)]
    with running_server(workspace, broker, window_s=scenario.window_s) as (service, counter):
        downloads = download_wave(broker, data, offsets)
        wait_until_flushed(service)
    return Row(scenario, downloads, *egress_of(counter, sha256, data))


def egress_of(counter: ChunkPublishCounter, sha256: str, data: bytes) -> tuple[list[int], float]:
    chunks = [data[i : i + DEFAULT_CHUNK_SIZE] for i in range(0, len(data), DEFAULT_CHUNK_SIZE)]
    copies = counter.per_chunk(sha256, len(chunks))
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == sha256
    return copies, sum(n * len(c) for n, c in zip(copies, chunks)) / len(data)


def check(row: Row) -> None:
    broken = [d.name for d in row.downloads if not d.sha256_ok]
    if broken or len(row.downloads) != row.scenario.agents:
        raise SystemExit(f"{row.scenario}: {len(broken)} of {row.scenario.agents} agents did not get the artifact")


def print_table(lone: list[Row], rows: list[Row]) -> None:
    lone_s = statistics.median(d.seconds for r in lone for d in r.downloads if d.seconds is not None)
    header = ["agents", "join spread s", "window s", "late joiners", "late p50 s", "late p95 s", "late max s",
              "p50 vs lone", "all max s", "re-asks", "copies/chunk", "egress (artifacts)"]
    lines = [["1 (lone, median)", "-", f"{lone[0].scenario.window_s:g}", "-", f"{lone_s:.3f}", "-", "-", "1.00x",
              f"{max(d.seconds or 0 for r in lone for d in r.downloads):.3f}",
              str(sum(d.requests - 1 for r in lone for d in r.downloads)),
              f"{max(max(r.copies) for r in lone)}", f"{statistics.mean(r.egress for r in lone):.2f}"]]
    for row in rows:
        late = [d.seconds for d in row.late_joiners() if d.seconds is not None]
        every = [d.seconds for d in row.downloads if d.seconds is not None]
        stats = [f"{percentile(late, 0.5):.3f}", f"{percentile(late, 0.95):.3f}", f"{max(late):.3f}",
                 f"{percentile(late, 0.5) / lone_s:.2f}x"] if late else ["-"] * 4
        lines.append([
            str(row.scenario.agents), f"{row.scenario.spread_s:g}", f"{row.scenario.window_s:g}", str(len(late)),
            *stats, f"{max(every):.3f}", str(sum(d.requests - 1 for d in row.downloads)),
            f"{min(row.copies)}-{max(row.copies)}", f"{row.egress:.2f}",
        ])
    print(markdown_table(header, lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small wave (a smoke run)")
    args = parser.parse_args()
    size = (1 if args.quick else 2) * 1024 * 1024
    lone_runs = 2 if args.quick else 5
    waves = [Scenario(20, 0.5)] if args.quick else [
        Scenario(20, 0.5), Scenario(50, 0.5), Scenario(50, 1.0), Scenario(50, 2.0),
        Scenario(20, 0.5, window_s=0.0), Scenario(50, 0.5, window_s=0.0),
    ]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        mosquitto = Mosquitto(Path(tmp) / "broker").start()
        workspace = init_data_dir(Path(tmp) / "data")
        broker = BrokerAddress.parse(mosquitto.url)
        try:
            lone = [run_scenario(workspace, broker, Scenario(1, 0.0), size, run) for run in range(lone_runs)]
            rows = []
            for run, scenario in enumerate(waves, start=lone_runs):
                rows.append(run_scenario(workspace, broker, scenario, size, run))
                print(f"  {scenario.agents} agents over {scenario.spread_s:g} s, window {scenario.window_s:g} s: done",
                      file=sys.stderr)
            for row in lone + rows:
                check(row)
        finally:
            workspace.db.close()
            mosquitto.stop()
    print(f"\nhost: {os.cpu_count()} cores; artifact {size // 1024} KiB = {-(-size // DEFAULT_CHUNK_SIZE)} chunks of "
          f"{DEFAULT_CHUNK_SIZE // 1024} KiB; Mosquitto, server and agent-like clients on this host; download time is "
          f"from subscribing to holding every chunk; ratios against the lone agent in the same run\n")
    print_table(lone, rows)


if __name__ == "__main__":
    main()
