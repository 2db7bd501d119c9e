"""Options every operator command shares."""

from __future__ import annotations

from pathlib import Path

import click

DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The server's data directory (keys, database, artifacts).",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
