"""``edgefleet profile``: thin click wrappers around ``server.profile_service``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from server.cli_options import DATA_DIR, JSON, given_db_url
from server.profile_service import ProfileRow, add_profile, list_profiles, show_profile, spec_from_options
from server.render import cell, human_bytes, table
from server.setup import open_workspace


@click.group("profile")
def profile_group() -> None:
    """Add, list and show device profiles."""


@profile_group.command("add")
@click.argument("name")
@DATA_DIR
@click.option("--from-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML file with a [profile] table; the options below override it.")
@click.option("--quantization", default=None, metavar="Q", help="Preferred quantization [default: the first choice].")
@click.option("--quantizations", default=None, metavar="Q1,Q2", help="Quantizations auto may choose from.")
@click.option("--threads", type=int, default=None, help="Interpreter threads (1-256) [default: 1].")
@click.option("--recipe", default=None, help="'auto' or one fixed recipe [default: auto].")
@click.option("--objective", default=None, metavar="latency|size", help="What auto optimises [default: latency].")
@click.option("--accuracy-budget", type=float, default=None, metavar="F",
              help="Largest accuracy drop vs float32 that auto accepts, 0-1 [default: 0.01].")
@click.option("--max-model-size", default=None, metavar="SIZE", help="Largest model file, e.g. 512MiB or 2GB.")
@click.option("--max-ram", default=None, metavar="SIZE", help="Largest RAM use, e.g. 1GiB.")
@click.option("--description", default=None, help="One line about the devices.")
@click.option("--replace", is_flag=True, help="Overwrite an existing user profile of this name.")
def profile_add(
    name: str, data_dir: Path, from_file: Path | None, quantization: str | None, quantizations: str | None,
    threads: int | None, recipe: str | None, objective: str | None, accuracy_budget: float | None,
    max_model_size: str | None, max_ram: str | None, description: str | None, replace: bool,
) -> None:
    """Add profile NAME from options and/or a TOML file."""
    spec = spec_from_options(
        name,
        {
            "quantization": quantization, "quantizations": quantizations, "threads": threads, "recipe": recipe,
            "objective": objective, "accuracy_budget": accuracy_budget, "max_model_bytes": max_model_size,
            "max_ram_bytes": max_ram, "description": description,
        },
        from_file=from_file,
    )
    row = add_profile(open_workspace(data_dir, db_url=given_db_url()).db, spec, replace=replace)
    click.echo(
        f"{'saved' if replace else 'added'} profile {row.name}: prefers {row.quantization}, "
        f"chooses from {', '.join(row.quantizations)}, objective {row.objective}"
    )


@profile_group.command("list")
@DATA_DIR
@JSON
def profile_list(data_dir: Path, as_json: bool) -> None:
    """Every profile: choices, objective, limits and device count."""
    rows = list_profiles(open_workspace(data_dir, db_url=given_db_url()).db)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    click.echo(
        table(
            ["NAME", "PREFERRED", "CHOICES", "OBJECTIVE", "BUDGET", "MAX MODEL", "MAX RAM", "THREADS", "RECIPE",
             "DEVICES", "BUILTIN"],
            [
                [
                    r.name, r.quantization, ",".join(r.quantizations), r.objective, cell(r.accuracy_budget, "g"),
                    human_bytes(r.max_model_bytes), human_bytes(r.max_ram_bytes), str(r.threads), r.recipe,
                    str(r.devices), cell(r.builtin),
                ]
                for r in rows
            ],
        )
    )


def profile_details(row: ProfileRow) -> str:
    def size(value: int | None) -> str:
        return "-" if value is None else f"{human_bytes(value)} ({value} bytes)"

    pairs = [
        ("name", row.name),
        ("description", row.description or "-"),
        ("preferred", row.quantization),
        ("choices", ", ".join(row.quantizations)),
        ("objective", row.objective),
        ("accuracy budget", cell(row.accuracy_budget, "g")),
        ("max model size", size(row.max_model_bytes)),
        ("max RAM", size(row.max_ram_bytes)),
        ("threads", str(row.threads)),
        ("recipe", row.recipe),
        ("devices", str(row.devices)),
        ("built in", cell(row.builtin)),
    ]
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key + ':':<{width + 1}}  {value}" for key, value in pairs)


@profile_group.command("show")
@click.argument("name")
@DATA_DIR
@JSON
def profile_show(name: str, data_dir: Path, as_json: bool) -> None:
    """Everything about profile NAME."""
    row = show_profile(open_workspace(data_dir, db_url=given_db_url()).db, name)
    click.echo(json.dumps(asdict(row), indent=2) if as_json else profile_details(row))
