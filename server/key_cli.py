"""``edgefleet keys``: show the root of trust, rotate a role's key, revoke a key (``server/key_rotation.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from server import audit
from server.cli_options import DATA_DIR, JSON, given_db_url
from server.render import table

ROOT_KEY_OPTION = click.option(
    "--root-key", "root_keys", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
    help="A root private key to sign the new root with, when it is not in the data directory (repeatable).",
)


@click.group("keys")
def keys_group() -> None:
    """The signed root of trust: show it, rotate a role's key, revoke a key."""


@keys_group.command("show")
@DATA_DIR
@JSON
def keys_show(data_dir: Path, as_json: bool) -> None:
    """The current root of trust: version, expiry, and per role its threshold and key ids."""
    from server.key_rotation import online_keys
    from server.paths import DataDir
    from server.roots import RootStore
    from shared.root import ROLE_NAMES

    keys_dir = DataDir(data_dir.resolve()).keys
    root, _ = RootStore(keys_dir).current()
    held = online_keys(keys_dir)
    if as_json:
        click.echo(json.dumps({
            "version": root.version, "expires": root.expires,
            "roles": {name: {"threshold": role.threshold, "keyids": list(role.keyids)} for name, role in root.roles.items()},
            "held": {kid: str(path) for kid, path in held.items()},
        }, indent=2))
        return
    days = (root.expires - time.time()) / 86400
    click.echo(f"root of trust v{root.version}, expires {time.strftime('%Y-%m-%d', time.gmtime(root.expires))} "
               + (f"(in {days:.0f} days)" if days >= 0 else "(EXPIRED: agents refuse it as a new root)"))
    rows = [[name, str(root.roles[name].threshold), kid, str(held[kid]) if kid in held else "not on this server"]
            for name in ROLE_NAMES for kid in root.roles[name].keyids]
    click.echo(table(["ROLE", "THRESHOLD", "KEY ID", "PRIVATE KEY"], rows))


@keys_group.command("rotate")
@click.option("--role", type=click.Choice(["release", "director", "root"]), required=True,
              help="Whose key: a new one is made and signs from now on.")
@click.option("--new-key-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the new private key here (0600, never overwritten) instead of into the data directory: "
                   "required for a role whose key is offline; for an online release or root key, takes it offline.")
@ROOT_KEY_OPTION
@DATA_DIR
def keys_rotate(role: str, new_key_out: Path | None, root_keys: tuple[Path, ...], data_dir: Path) -> None:
    """Make a new key for ROLE and publish the next root of trust, signed by the old and new root keys. A new
    release or director key is added (revoke the old one once nothing signed by it is in flight); a new root
    key replaces the old."""
    from server.key_rotation import rotate_key
    from server.setup import open_workspace
    from shared.signing import KeyRole

    workspace = open_workspace(data_dir, db_url=given_db_url())
    change = rotate_key(workspace.data_dir, workspace.db, KeyRole(role), new_key_out=new_key_out,
                        root_keys=root_keys, actor=audit.operator())
    click.echo(f"root of trust v{change.version}: {change.summary}")
    click.echo(f"new private key: {change.key_written}")
    if change.note:
        click.echo(change.note)
    click.echo("the running server publishes it to the agents on its next tick")


@keys_group.command("revoke")
@click.argument("keyid", metavar="KEYID")
@ROOT_KEY_OPTION
@DATA_DIR
def keys_revoke(keyid: str, root_keys: tuple[Path, ...], data_dir: Path) -> None:
    """Remove KEYID (or a unique prefix of at least 8 digits) from every role, in the next root of trust."""
    from server.key_rotation import revoke_key
    from server.setup import open_workspace

    workspace = open_workspace(data_dir, db_url=given_db_url())
    change = revoke_key(workspace.data_dir, workspace.db, keyid, root_keys=root_keys, actor=audit.operator())
    click.echo(f"root of trust v{change.version}: {change.summary}")
    click.echo("the running server publishes it to the agents on its next tick")
