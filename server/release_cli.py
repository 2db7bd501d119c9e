"""``edgefleet release``: releases signed with an offline release key.

``prepare`` and ``import`` run on the server; ``sign`` runs wherever the
release key is and needs no data directory, no database and no TensorFlow:
this module imports only click and ``shared`` at the top, and the server's
modules inside the commands that use them.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from server.cli_options import DATA_DIR, given_db_url
from shared.messages import Manifest

KEY_PREFIX = 16


def describe(manifest: Manifest) -> str:
    model = manifest.file("model")
    return (f"release {manifest.release_counter}: {manifest.model}:{manifest.version} for profile {manifest.profile} "
            f"({manifest.quantization}), model {model.sha256[:KEY_PREFIX]} ({model.size} B), eval "
            f"{manifest.file('eval').sha256[:KEY_PREFIX]}, expires "
            f"{time.strftime('%Y-%m-%d', time.gmtime(manifest.expires))}")


@click.group("release")
def release_group() -> None:
    """Releases signed with an offline release key: prepare, sign, import."""


@release_group.command("prepare")
@click.argument("model_ref", metavar="NAME[:VERSION]")
@click.option("--profile", required=True, help="The device profile whose variant the release ships.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Where to write the unsigned release (never overwritten).")
@DATA_DIR
def release_prepare(model_ref: str, profile: str, out: Path, data_dir: Path) -> None:
    """Build the manifest of a new release of NAME[:VERSION] for --profile, reserving its release counter, and
    write it unsigned, for 'edgefleet release sign' on the machine that holds the release key."""
    from server import audit
    from server.releases import prepare_release
    from server.setup import open_workspace
    from shared.release_files import release_manifest, write_release_file

    workspace = open_workspace(data_dir, db_url=given_db_url())
    envelope = prepare_release(workspace.db, workspace.blobs, model_ref, profile, actor=audit.operator())
    write_release_file(out, envelope)
    click.echo(f"prepared {describe(release_manifest(envelope, out))}")
    click.echo(f"unsigned: {out}; sign it with 'edgefleet release sign {out} --key RELEASE_KEY --out release.json', "
               "then 'edgefleet release import release.json'")


@release_group.command("sign")
@click.argument("release_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The release private key (PEM), e.g. what 'edgefleet init --release-key-out' wrote.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Where to write the signed release (never overwritten).")
def release_sign(release_file: Path, key_file: Path, out: Path) -> None:
    """Sign RELEASE_FILE (from 'release prepare', or already signed: a second key adds a second signature).
    Needs no data directory: run it where the release key is."""
    from shared.release_files import sign_release_file

    manifest, keyid = sign_release_file(release_file, key_file, out)
    click.echo(f"signed {describe(manifest)}")
    click.echo(f"with key {keyid}; signed release: {out}; bring it to the server with "
               f"'edgefleet release import {out} --data-dir DIR'")


@release_group.command("import")
@click.argument("release_file", type=click.Path(path_type=Path, dir_okay=False))
@DATA_DIR
def release_import(release_file: Path, data_dir: Path) -> None:
    """Check RELEASE_FILE's signatures against the current root of trust and that it is the manifest prepared
    under its counter, then store it: 'rollout start' ships it."""
    from server import audit
    from server.releases import import_release
    from server.roots import RootStore
    from server.setup import open_workspace
    from shared.release_files import read_release_file

    workspace = open_workspace(data_dir, db_url=given_db_url())
    root, _ = RootStore(workspace.data_dir.keys).current()
    manifest = import_release(workspace.db, root, read_release_file(release_file), actor=audit.operator())
    click.echo(f"imported {describe(manifest)}")
    click.echo(f"'edgefleet rollout start {manifest.model}:{manifest.version} --profile {manifest.profile}' ships it")
