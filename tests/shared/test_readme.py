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


def _bash_commands(text: str) -> list[tuple[int, str]]:
    """(block index, command line) of every line in the README's ```bash blocks, continuations joined,
    comments dropped."""
    commands = []
    for index, block in enumerate(re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append((index, line))
    return commands


def test_the_readme_says_where_the_edgefleet_command_is_before_using_it() -> None:
    commands = _bash_commands(README.read_text())
    first_use = next(i for i, (_, line) in enumerate(commands) if line.startswith("edgefleet "))
    activations = [i for i, (_, line) in enumerate(commands) if line == "source .venv/bin/activate"]
    assert activations and activations[0] < first_use, "activate .venv before the first 'edgefleet' command"


def test_every_edgefleet_command_in_the_readme_exists_with_its_options() -> None:
    import click

    from edgefleet.cli import cli

    context = click.Context(cli)
    checked = 0
    for _, line in _bash_commands(README.read_text()):
        if not line.startswith("edgefleet "):
            continue
        words = [w.strip("[]") for w in line.split()[1:]]
        command = cli.get_command(context, words[0])
        assert command is not None, f"no command {words[0]!r}: {line}"
        commands = [command]
        if isinstance(command, click.Group):  # its subcommands named on the line, e.g. 'list|show NAME|add NAME'
            named = [command.get_command(context, part) for word in words[1:] for part in word.split("|")]
            commands = [c for c in named if c is not None] or [command]
            assert commands != [command] or command.invoke_without_command, f"no such subcommand: {line}"
        options = {opt for c in commands for p in c.params for opt in p.opts}
        for word in words[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"{word} is not an option of: {line}"
        checked += 1
    assert checked >= 15
