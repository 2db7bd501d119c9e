"""``edgefleet device``: register, tag, remove and list devices (thin wrappers over ``server.devices``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from server import audit
from server.cli_options import DATA_DIR, JSON
from server.devices import DeviceRow
from server.render import cell, table
from server.selection import Selection, parse_tag
from server.setup import open_workspace
from shared.errors import UserInputError
from shared.mqtt import BrokerAddress


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
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="Where to write agent.toml.")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True, help="Broker the agent connects to.")
@click.option(
    "--agent-data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The agent's own data directory for its model slots [default: beside agent.toml].",
)
def device_register(
    name: str, profile: str, tags: tuple[str, ...], data_dir: Path, out: Path, broker: str,
    agent_data_dir: Path | None,
) -> None:
    """Register device NAME and write its agent configuration."""
    from server.devices import agent_config_toml, register_device

    address = BrokerAddress.parse(broker)
    initial = _tags(tags, "--tag")
    workspace = open_workspace(data_dir)
    keys = workspace.keys()
    try:  # claim --out before registering, so a path we cannot write leaves nothing half-done
        out.parent.mkdir(parents=True, exist_ok=True)
        out.open("x").close()
    except FileExistsError:
        raise click.ClickException(f"{out} already exists; choose another --out") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from exc
    try:
        device = register_device(workspace.db, name, profile, initial, actor=audit.operator())
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    slots = (agent_data_dir or out.parent / f"{name}-data").resolve()
    out.write_text(agent_config_toml(device, address.url(), keys, slots), encoding="utf-8")
    tagged = f", tags {_tags_cell(device)}" if device.tags else ""
    click.echo(f"registered {device.name} ({device.id}), profile {device.profile}{tagged}; agent config: {out}")


@device_group.command("tag")
@click.argument("name")
@click.argument("tags", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="Remove the tag KEY (repeatable).")
@DATA_DIR
def device_tag(name: str, tags: tuple[str, ...], remove: tuple[str, ...], data_dir: Path) -> None:
    """Set tags on device NAME (overwriting a key's value), or remove them with --remove KEY."""
    from server.devices import tag_device

    wanted = _tags(tags, "tag")
    change = tag_device(open_workspace(data_dir).db, name, wanted, remove, actor=audit.operator())
    for key in change.not_set:
        click.echo(f"note: {name} had no tag {key!r}", err=True)
    click.echo(f"{change.device.name}: {_tags_cell(change.device)}")


@device_group.command("remove")
@click.argument("name")
@DATA_DIR
def device_remove(name: str, data_dir: Path) -> None:
    """Remove device NAME: its open deployments end as 'removed' and its name is free again."""
    from server.devices import remove_device

    removed = remove_device(open_workspace(data_dir).db, name, actor=audit.operator())
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
    rows = list_devices(open_workspace(data_dir).db, selection)
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
