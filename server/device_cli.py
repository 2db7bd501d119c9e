"""``edgefleet device``: register, tag, remove and list devices (thin wrappers over ``server.devices``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import click

from server import audit
from server.cli_options import DATA_DIR, JSON, duration_seconds, given_db_url
from server.devices import DeviceRow
from server.render import cell, table
from server.roots import ROOT_FILE, RootStore, write_root_file
from server.selection import Selection, parse_tag
from server.setup import open_workspace
from shared.agent_toml import BrokerIdentity
from shared.errors import UserInputError
from shared.failpoints import failpoint
from shared.mqtt import BrokerAddress
from shared.serve_address import DEFAULT_SERVE_LISTEN, ServeAddress


def _tags(values: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    try:
        return [parse_tag(value) for value in values]
    except UserInputError as exc:
        raise UserInputError(f"{what}: {exc}") from exc


TAG_OPTION = click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
                          help="A tag on the device, e.g. site=lab (repeatable).")


@click.group("device")
def device_group() -> None:
    """Register, tag, remove and list devices."""


@device_group.command("register")
@click.argument("name")
@click.option("--profile", required=True, help="Device profile, e.g. rpi4, rpi5, jetson-nano, x86-64.")
@TAG_OPTION
@DATA_DIR
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the device's whole agent.toml here (mode 0600: it holds its broker password).")
@click.option("--token", "token", is_flag=True,
              help="Print a one-time enrolment token for 'edgefleet agent enrol' on the device (instead of, or as "
                   "well as, --out).")
@click.option("--token-ttl", "token_ttl", metavar="DURATION", callback=duration_seconds, default="24h",
              show_default=True, help="How long the enrolment token works (e.g. 30m, 24h, 7d).")
@click.option("--broker", default=None,
              help="Broker URL the agent connects to [default: the data directory's broker, as 'edgefleet init' "
                   "set it up; without one mqtt://127.0.0.1:1883].")
@click.option(
    "--agent-data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The agent's own data directory for its model slots [default: beside agent.toml].",
)
@click.option("--serve-listen", default=DEFAULT_SERVE_LISTEN, show_default=True,
              help="Where the agent serves its model: HOST:PORT (port 0: any free port, for several agents on one "
                   "host) or unix:/path.")
def device_register(
    name: str, profile: str, tags: tuple[str, ...], data_dir: Path, out: Path | None, token: bool, token_ttl: float,
    broker: str | None, agent_data_dir: Path | None, serve_listen: str,
) -> None:
    """Register device NAME with its broker identity: write its agent configuration (--out), or print a
    one-time enrolment token the device redeems itself (--token), or both."""
    from server.broker_identities import new_identity, sync_broker, write_device_files
    from server.broker_setup import BrokerLayout, BrokerSettings
    from server.devices import agent_config_toml, register_device
    from server.enrolment import create_token

    if out is None and not token:
        raise click.UsageError("give --out FILE (write the agent's config) or --token (print an enrolment token)")
    try:
        ServeAddress.parse(serve_listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--serve-listen") from None
    initial = _tags(tags, "--tag")
    workspace = open_workspace(data_dir, db_url=given_db_url())
    layout = BrokerLayout(workspace.data_dir.broker)
    managed = layout.exists()  # a broker whose identities this data directory keeps
    if token and not managed:
        raise click.ClickException(f"{data_dir} has no broker set up, so devices cannot enrol: run 'edgefleet init "
                                   f"--data-dir {data_dir}'")
    url = BrokerAddress.parse(broker or (BrokerSettings.load(layout).device_url() if managed
                                         else "mqtt://127.0.0.1:1883")).url()
    if out is not None:
        _claim(out)  # before registering, so a path we cannot write leaves nothing half-done
    password, hashed = new_identity() if managed and out is not None else ("", None)
    try:
        root = write_root_file(RootStore(workspace.data_dir.keys), out.parent / ROOT_FILE) if out else None
        device = register_device(workspace.db, name, profile, initial, actor=audit.operator(), broker_secret=hashed)
    except BaseException:
        if out is not None:
            out.unlink(missing_ok=True)
        raise
    tagged = f", tags {_tags_cell(device)}" if device.tags else ""
    click.echo(f"registered {device.name} ({device.id}), profile {device.profile}{tagged}")
    if out is not None and root is not None:
        identity: str | BrokerIdentity = url
        if managed:
            sync_broker(workspace.db, layout)  # the running broker knows the device from now on
            identity = write_device_files(layout, device.id, device.name, password, url, out.parent)
        slots = (agent_data_dir or out.parent / f"{name}-data").resolve()
        out.write_text(agent_config_toml(device, identity, slots, serve_listen=serve_listen), encoding="utf-8")
        click.echo(f"agent config: {out} (root of trust v{root.version}: {out.parent / ROOT_FILE}, shared by the "
                   "configs beside it)")
    if token:
        text, expires = create_token(workspace.db, layout, device.id, ttl_s=token_ttl)
        click.echo(f"enrolment token (works once, until {expires:%Y-%m-%d %H:%M} UTC):\n{text}\n"
                   f"on the device: edgefleet agent enrol --server https://SERVER:PORT --token {text} "
                   f"--data-dir /var/lib/edgefleet")


def _claim(out: Path) -> None:
    """Create ``out`` empty with mode 0600, or fail if it exists or cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise click.ClickException(f"{out} already exists; choose another --out") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from exc


@device_group.command("tag")
@click.argument("name")
@click.argument("tags", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="Remove the tag KEY (repeatable).")
@DATA_DIR
def device_tag(name: str, tags: tuple[str, ...], remove: tuple[str, ...], data_dir: Path) -> None:
    """Set tags on device NAME (overwriting a key's value), or remove them with --remove KEY."""
    from server.devices import tag_device

    wanted = _tags(tags, "tag")
    change = tag_device(open_workspace(data_dir, db_url=given_db_url()).db, name, wanted, remove, actor=audit.operator())
    for key in change.not_set:
        click.echo(f"note: {name} had no tag {key!r}", err=True)
    click.echo(f"{change.device.name}: {_tags_cell(change.device)}")


@device_group.command("remove")
@click.argument("name")
@DATA_DIR
def device_remove(name: str, data_dir: Path) -> None:
    """Remove device NAME: its open deployments end as 'removed' and its name is free again."""
    from server.broker_identities import sync_broker
    from server.broker_setup import BrokerLayout
    from server.devices import remove_device

    workspace = open_workspace(data_dir, db_url=given_db_url())
    removed = remove_device(workspace.db, name, actor=audit.operator())
    failpoint("server.device.removed")  # committed, the broker not told yet: the running server reconciles
    sync_broker(workspace.db, BrokerLayout(workspace.data_dir.broker))  # its broker identity ends now
    settled = f"; {len(removed.settled)} open deployment(s) ended as removed" if removed.settled else ""
    click.echo(f"removed {removed.device.name} ({removed.device.id}){settled}")


@device_group.command("list")
@TAG_OPTION
@click.option("--profile", "profiles", multiple=True, help="Only devices of this profile (repeatable: any of them).")
@DATA_DIR
@JSON
def device_list(tags: tuple[str, ...], profiles: tuple[str, ...], data_dir: Path, as_json: bool) -> None:
    """Devices with profile, tags, online state and active model (filters: every --tag, any --profile)."""
    from server.devices import list_devices

    wanted = _tags(tags, "--tag")
    selection = Selection(profiles=profiles, tags=tuple(wanted)) if wanted or profiles else None
    rows = list_devices(open_workspace(data_dir, db_url=given_db_url()).db, selection)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    click.echo(device_table(rows))


def _tags_cell(row: DeviceRow) -> str:
    return ",".join(f"{k}={v}" for k, v in row.tags.items()) or "-"


def device_table(rows: list[DeviceRow]) -> str:
    return table(
        ["DEVICE", "ID", "PROFILE", "TAGS", "STATUS", "RUNTIME", "ACTIVE MODEL", "VARIANT"],
        [
            [
                r.name,
                r.id,
                r.profile,
                _tags_cell(r),
                "online" if r.online else "offline",
                cell(r.runtime),
                f"{r.active_model} v{r.active_version}" if r.active_model else "-",
                cell(r.variant),
            ]
            for r in rows
        ],
    )


@device_group.command("register-fleet")
@click.option("--prefix", required=True, help="Device names are PREFIX-00001, PREFIX-00002, ...")
@click.option("--count", type=int, required=True, help="How many devices to register.")
@click.option("--start", type=int, default=1, show_default=True, help="The number of the first device.")
@click.option("--profile", required=True, help="Device profile of every device, e.g. rpi4, x86-64.")
@click.option("--out-dir", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Write NAME.toml for each device here (mode 0600), with the root of trust they share.")
@click.option("--broker", default=None,
              help="Broker URL the agents connect to [default: the data directory's broker; without one "
                   "mqtt://127.0.0.1:1883].")
@click.option("--agent-data-dir", "agent_data_root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Each agent's data directory is ROOT/NAME [default: NAME-data beside its config].")
@click.option("--serve-listen", default=DEFAULT_SERVE_LISTEN, show_default=True,
              help="Where each agent serves its model (port 0: any free port, for several agents on one host).")
@DATA_DIR
@JSON
def device_register_fleet(
    prefix: str, count: int, start: int, profile: str, out_dir: Path, broker: str | None,
    agent_data_root: Path | None, serve_listen: str, data_dir: Path, as_json: bool,
) -> None:
    """Register COUNT devices at once, in one transaction, and write an agent.toml for each: scripted
    enrolment for simulated fleets and bulk provisioning ('edgefleet simulate --configs OUT_DIR' runs them)."""
    from server.fleet_register import fleet_names, register_fleet

    try:
        ServeAddress.parse(serve_listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--serve-listen") from None
    names = fleet_names(prefix, count, start)
    done = register_fleet(open_workspace(data_dir, db_url=given_db_url()), names, profile, out_dir, broker=broker,
                          agent_data_root=agent_data_root, serve_listen=serve_listen)
    if as_json:
        click.echo(json.dumps({"broker": done.broker_url, "root_version": done.root_version,
                               "devices": [{"name": d.name, "id": d.id, "config": str(c)}
                                           for d, c in zip(done.devices, done.configs)]}, indent=2))
        return
    click.echo(f"registered {len(done.devices)} devices ({names[0]} .. {names[-1]}), profile {profile}, broker "
               f"{done.broker_url}; configs in {out_dir} (root of trust v{done.root_version})")
