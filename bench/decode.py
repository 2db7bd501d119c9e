"""Strict decoding of every MQTT payload kind: with each dataclass's type hints resolved once (cached) against
resolving them on every message, as decoding did before. Prints a Markdown table with the ratio.

    .venv/bin/python bench/decode.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.tables import markdown_table
from shared import codec
from shared.messages import decode_payload, encode_payload
from tests.shared.factories import SAMPLES


def per_message_us(payloads: list[tuple[object, bytes]], rounds: int, *, cached: bool) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for kind, payload in payloads:
            if not cached:
                codec.dataclass_schema.cache_clear()  # as before: every message resolves its type hints
            decode_payload(kind, payload)  # type: ignore[arg-type]
    return (time.perf_counter() - start) / (rounds * len(payloads)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    for kind, message in SAMPLES.items():
        payloads = [(kind, encode_payload(message))]
        json.loads(payloads[0][1])  # a valid payload
        uncached = per_message_us(payloads, args.rounds, cached=False)
        cached = per_message_us(payloads, args.rounds, cached=True)
        rows.append([kind.value, f"{len(payloads[0][1])}", f"{uncached:.1f}", f"{cached:.1f}", f"{uncached / cached:.1f}x"])
    print(markdown_table(["payload", "bytes", "µs/message, hints per message", "µs/message, hints cached",
                          "speed-up"], rows))


if __name__ == "__main__":
    main()
