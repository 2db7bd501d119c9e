"""``edgefleet token``: create, list, revoke and rotate the HTTP API's bearer tokens (``server.api_tokens``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from server.api_tokens import IssuedToken, Scope, TokenInfo
from server.cli_options import DATA_DIR, JSON, given_db_url
from server.render import cell, table

OUT = click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
                   help="Write the token to this file (mode 0600) instead of printing it.")


@click.group("token")
def token_group() -> None:
    """Bearer tokens for the HTTP API and dashboard (scopes: read, operator, metrics)."""


def _hand_out(issued: IssuedToken, out: Path | None) -> None:
    """The token on stdout (alone, for ``$(...)``), unless it went to ``out``; the note on stderr."""
    if out is not None:
        click.echo(f"API token {issued.name} ({issued.scope.value}) written to {out} (mode 0600)", err=True)
        return
    click.echo(issued.token)
    click.echo(f"API token {issued.name} ({issued.scope.value}): shown once, only its hash is kept", err=True)


@token_group.command("create")
@click.argument("name")
@click.option("--scope", type=click.Choice([s.value for s in Scope]), required=True,
              help="read: pages and GET routes; operator: also the write routes and /metrics; metrics: /metrics only.")
@OUT
@DATA_DIR
def token_create(name: str, scope: str, out: Path | None, data_dir: Path) -> None:
    """Create token NAME and print it (once: only its sha256 is stored)."""
    from server import audit
    from server.api_tokens import create_token, write_token_file
    from server.setup import open_workspace

    db = open_workspace(data_dir, db_url=given_db_url()).db
    issued = create_token(db, name, Scope(scope), actor=audit.operator(),
                          keep=(lambda token: write_token_file(out, token)) if out is not None else None)
    _hand_out(issued, out)


@token_group.command("list")
@DATA_DIR
@JSON
def token_list(data_dir: Path, as_json: bool) -> None:
    """Every token with its scope and when it was last used (never a secret)."""
    from server.api_tokens import list_tokens, token_json
    from server.setup import open_workspace

    tokens = list_tokens(open_workspace(data_dir, db_url=given_db_url()).db)
    if as_json:
        click.echo(json.dumps([token_json(t) for t in tokens], indent=2))
    elif not tokens:
        click.echo("no API tokens: create one with 'edgefleet token create NAME --scope read|operator|metrics'")
    else:
        click.echo(tokens_table(tokens))


def tokens_table(tokens: list[TokenInfo]) -> str:
    def when(info: TokenInfo, attr: str) -> str:
        moment = getattr(info, attr)
        return cell(moment.strftime("%Y-%m-%d %H:%MZ") if moment is not None else None)

    return table(["NAME", "ID", "SCOPE", "STATE", "CREATED", "LAST USED", "CREATED BY"],
                 [[t.name, t.id, t.scope.value, "active" if t.active else f"revoked {when(t, 'revoked_at')}",
                   when(t, "created_at"), when(t, "last_used_at"), t.created_by] for t in tokens])


@token_group.command("revoke")
@click.argument("name")
@DATA_DIR
def token_revoke(name: str, data_dir: Path) -> None:
    """Revoke token NAME: the next request that presents it is refused."""
    from server import audit
    from server.api_tokens import revoke_token
    from server.setup import open_workspace

    revoke_token(open_workspace(data_dir, db_url=given_db_url()).db, name, actor=audit.operator())
    click.echo(f"API token {name} revoked")


@token_group.command("rotate")
@click.argument("name")
@OUT
@DATA_DIR
def token_rotate(name: str, out: Path | None, data_dir: Path) -> None:
    """A new secret for token NAME (same scope); the old one is refused at once.

    When DATA_DIR/api-token held the old secret, it gets the new one (unless --out says otherwise).
    """
    from server import audit
    from server.api_tokens import file_holds, rotate_token, write_token_file
    from server.setup import open_workspace

    workspace = open_workspace(data_dir, db_url=given_db_url())
    written: list[Path] = []

    def keep(issued: IssuedToken, old_sha256: str) -> None:
        target = out
        if target is None and file_holds(workspace.data_dir.api_token, old_sha256):
            target = workspace.data_dir.api_token
        if target is not None:
            write_token_file(target, issued.token)
            written.append(target)

    issued = rotate_token(workspace.db, name, actor=audit.operator(), keep=keep)
    _hand_out(issued, written[0] if written else None)
