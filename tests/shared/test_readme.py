"""The README's wire-protocol table matches shared/topics.py."""

from __future__ import annotations

import re
from pathlib import Path

from shared.topics import TOPIC_TABLE

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\|\s*`(ef/v1/[^`]+)`\s*\|\s*([^|]+?)\s*\|\s*(\d)\s*\|\s*(yes|no)\s*\|")


def test_readme_topic_table_matches_topics_module() -> None:
    rows = [m.groups() for line in README.read_text().splitlines() if (m := ROW.match(line))]
    documented = {(pattern, direction, int(qos), retained == "yes") for pattern, direction, qos, retained in rows}
    expected = {(s.pattern, s.direction, s.qos, s.retained) for s in TOPIC_TABLE.values()}
    assert len(rows) == len(documented)
    assert documented == expected


def test_readme_has_the_two_quick_start_commands() -> None:
    text = README.read_text()
    assert "## Quick start" in text
    assert "./scripts/demo" in text and "./scripts/test" in text
