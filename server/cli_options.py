"""Options every operator command shares."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

_DB_URL_META = "edgefleet.db_url"


def _remember_db_url(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta[_DB_URL_META] = value


_DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The server's data directory (keys, database, artifacts).",
)
# Not passed to the command function: commands read it with given_db_url(), so a command only needs
# @DATA_DIR to take it.
_DB_URL = click.option(
    "--db-url", envvar="EDGEFLEET_DB_URL", show_envvar=True, expose_value=False, callback=_remember_db_url,
    metavar="URL",
    help="The registry database: postgresql://USER[:PASSWORD]@HOST:PORT/DATABASE or sqlite:///PATH [default: what "
         "'edgefleet init --db-url' recorded in the data directory, else its SQLite file].",
)


def DATA_DIR(command: F) -> F:
    """``--data-dir`` and ``--db-url``: where a server command finds its data directory and database."""
    return _DATA_DIR(_DB_URL(command))


def given_db_url() -> str | None:
    """``--db-url`` (or ``EDGEFLEET_DB_URL``) as the running command got it; None when not given."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_DB_URL_META) if ctx is not None else None
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")



def duration_seconds(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """An option callback: a duration like 90s, 15m, 24h or 30d (``server.latency.timespec``) as seconds."""
    from server.latency.timespec import parse_duration
    from shared.errors import UserInputError

    if value is None:
        return None
    try:
        return parse_duration(value)
    except UserInputError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
