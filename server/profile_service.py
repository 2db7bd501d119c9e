"""User-defined device profiles: validate, load from TOML, add, list and show.

A :class:`ProfileSpec` is what an operator can set on a profile (every column
of ``server.db.models.Profile`` except ``builtin``); constructing one checks
it, so an invalid spec never reaches the database. The TOML form is one
``[profile]`` table whose keys are the column names::

    [profile]
    name = "cam-pi"
    description = "Pi 4 cameras on SD cards"
    quantizations = ["int8", "dynamic_range"]   # or "int8,dynamic_range"
    quantization = "int8"                       # preferred; defaults to the first choice
    objective = "size"
    accuracy_budget = 0.02
    max_model_bytes = "64MiB"                   # an integer of bytes, or a size string
    max_ram_bytes = "1 GiB"

Every problem is a :class:`~shared.errors.UserInputError` with one clear message.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from decimal import Decimal
from pathlib import Path
from typing import cast

from server.compress.quantization import Quantization
from server.db import Database, profile_queries
from server.db.models import Profile
from server.devices import get_profile
from shared.errors import AlreadyExistsError, UserInputError
from shared.tomlfile import read_toml

OBJECTIVES = ("latency", "size")
MAX_THREADS = 256
MAX_TEXT = 200  # the width of the description, quantizations and recipe columns
INT64_MAX = 2**63 - 1
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_RECIPE_FALLBACK = re.compile(r"[a-z0-9_.:+]+")
_RECIPES_MODULE = "server.compress.recipes"
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_FIELDS = ("max_model_bytes", "max_ram_bytes")


def quantization_choices() -> tuple[str, ...]:
    """Every quantization a model can be converted with, read from the enum at run time."""
    return tuple(q.value for q in Quantization.convertible())


@dataclass(frozen=True)
class ProfileSpec:
    """An operator-defined profile; the constructor rejects anything the registry must not store."""

    name: str
    quantization: str  # the preferred one: the tie-breaker when measured latencies are within noise
    quantizations: tuple[str, ...]  # what auto may choose from
    threads: int = 1
    recipe: str = "auto"  # or one fixed recipe
    objective: str = "latency"
    accuracy_budget: float = 0.01  # max accuracy drop vs float32 that auto accepts
    max_model_bytes: int | None = None
    max_ram_bytes: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise UserInputError(
                f"invalid profile name {self.name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if not isinstance(self.description, str) or len(self.description) > MAX_TEXT:
            raise UserInputError(f"the description must be text of at most {MAX_TEXT} characters")
        _check_quantizations(self.quantization, self.quantizations)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 1 <= self.threads <= MAX_THREADS:
            raise UserInputError(f"threads must be an integer from 1 to {MAX_THREADS}, got {self.threads!r}")
        object.__setattr__(self, "recipe", _canonical_recipe(self.recipe))  # the text form reports show
        if self.objective not in OBJECTIVES:
            raise UserInputError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        budget = self.accuracy_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
            math.isfinite(budget) and 0 <= budget <= 1
        ):
            raise UserInputError(
                f"accuracy_budget must be a number from 0 to 1 (an accuracy drop, 0.01 = one point), got {budget!r}"
            )
        for key in _SIZE_FIELDS:
            limit = getattr(self, key)
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= INT64_MAX
            ):
                raise UserInputError(f"{key} must be a positive number of bytes, got {limit!r}")


@dataclass(frozen=True)
class ProfileRow:
    """A stored profile as the CLI and the JSON output show it: the columns plus its device count."""

    name: str
    description: str
    quantization: str
    quantizations: tuple[str, ...]
    threads: int
    recipe: str
    objective: str
    accuracy_budget: float
    max_model_bytes: int | None
    max_ram_bytes: int | None
    builtin: bool
    devices: int

    @classmethod
    def of(cls, profile: Profile, devices: int) -> ProfileRow:
        return cls(
            name=profile.name,
            description=profile.description,
            quantization=profile.quantization,
            quantizations=tuple(q for q in profile.quantizations.split(",") if q),
            threads=profile.threads,
            recipe=profile.recipe,
            objective=profile.objective,
            accuracy_budget=profile.accuracy_budget,
            max_model_bytes=profile.max_model_bytes,
            max_ram_bytes=profile.max_ram_bytes,
            builtin=profile.builtin,
            devices=devices,
        )


# -- sizes and building specs ------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit, e.g. ``"512MiB"``, ``"2GB"``, ``"300 KB"``, ``"4096"``.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (units are case-insensitive);
    a fraction of a byte is rounded down.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise UserInputError(
            f"invalid size {text!r}: expected a number of bytes with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '512MiB' or '2GB'"
        )
    return int(Decimal(match.group(1)) * _SIZE_UNITS[unit])


def spec_from_toml(path: Path) -> ProfileSpec:
    """The profile in the ``[profile]`` table of the TOML file ``path``, which must name it."""
    values = _read_profile_table(path)
    if "name" not in values:
        raise UserInputError(f"{path}: the [profile] table needs a name")
    return _spec(values, where=f"{path}: ")


def spec_from_options(name: str, options: Mapping[str, object], *, from_file: Path | None = None) -> ProfileSpec:
    """The spec for profile ``name``: the file's ``[profile]`` table (if any), overridden by ``options``.

    ``options`` maps column names to command-line values (``None`` = not given); sizes may be
    size strings and ``quantizations`` a comma-separated string. A name in the file must be ``name``.
    """
    unknown = sorted(set(options) - (set(_spec_keys()) - {"name"}))
    if unknown:  # a programming error in the caller, not the user's
        raise TypeError(f"unknown profile options {unknown}")
    values = _read_profile_table(from_file) if from_file is not None else {}
    if values.get("name", name) != name:
        raise UserInputError(f"the profile name {name!r} does not match name = {values['name']!r} in {from_file}")
    values["name"] = name
    for key, value in options.items():
        if value is not None:
            values[key] = _field_value(key, value)
    return _spec(values, where="")


def _spec_keys() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ProfileSpec))


def _read_profile_table(path: Path) -> dict[str, object]:
    """The checked and normalised values of the ``[profile]`` table in ``path``."""
    data = read_toml(path, "profile file", UserInputError)
    if set(data) != {"profile"} or not isinstance(data["profile"], dict):
        extra = sorted(set(data) - {"profile"})
        detail = f"; unexpected top-level keys: {', '.join(extra)}" if extra else ""
        raise UserInputError(f"{path}: expected exactly one [profile] table{detail}")
    table: dict[str, object] = data["profile"]
    unknown = sorted(set(table) - set(_spec_keys()))
    if unknown:
        raise UserInputError(
            f"{path}: unknown key(s) in [profile]: {', '.join(unknown)}; allowed: {', '.join(_spec_keys())}"
        )
    try:
        return {key: _field_value(key, value) for key, value in table.items()}
    except UserInputError as exc:
        raise UserInputError(f"{path}: {exc}") from exc


def _field_value(key: str, value: object) -> object:
    """``value`` as the type ``ProfileSpec`` wants for ``key``; range checks are the spec's."""
    if key in _SIZE_FIELDS:
        if isinstance(value, str):
            return parse_size(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserInputError(f"{key} must be a number of bytes or a size such as '512MiB', got {value!r}")
    if key == "quantizations":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise UserInputError(f"quantizations must be a list of names or 'a,b,c', got {value!r}")
        names = [item.strip().lower() for item in items]
        return tuple(dict.fromkeys(n for n in names if n))  # in order, without repeats
    if key == "threads":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserInputError(f"threads must be an integer, got {value!r}")
    if key == "accuracy_budget":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserInputError(f"accuracy_budget must be a number, got {value!r}")
    if not isinstance(value, str):
        raise UserInputError(f"{key} must be a string, got {value!r}")
    return value.strip().lower() if key in ("quantization", "objective") else value


def _spec(values: dict[str, object], *, where: str) -> ProfileSpec:
    """Fill the preferred quantization and the choices from each other, then construct (and check)."""
    chosen = values.get("quantizations")
    preferred = values.get("quantization")
    if not chosen and preferred is None:
        raise UserInputError(
            f"{where}profile {values['name']!r} needs quantizations (what auto may choose from, e.g. int8,float16) "
            f"or a preferred quantization; choose from: {', '.join(quantization_choices())}"
        )
    if not chosen:
        values["quantizations"] = (preferred,)
    elif preferred is None:
        values["quantization"] = cast("tuple[str, ...]", chosen)[0]
    try:
        return ProfileSpec(**values)  # type: ignore[arg-type]
    except UserInputError as exc:
        raise UserInputError(f"{where}{exc}") from exc


def _check_quantizations(preferred: object, choices: object) -> None:
    valid = quantization_choices()
    if not isinstance(choices, tuple) or not choices:
        raise UserInputError(f"quantizations must list at least one of: {', '.join(valid)}")
    for name in (*choices, preferred):
        if name not in valid:
            raise UserInputError(f"unknown quantization {name!r}; choose from: {', '.join(valid)}")
    if len(set(choices)) != len(choices):
        raise UserInputError(f"quantizations lists one twice: {', '.join(choices)}")
    if len(",".join(choices)) > MAX_TEXT:
        raise UserInputError(f"quantizations is longer than {MAX_TEXT} characters")
    if preferred not in choices:
        raise UserInputError(
            f"the preferred quantization {preferred!r} is not one of the quantizations ({', '.join(choices)}); "
            "add it to them or prefer one of them"
        )


def _canonical_recipe(recipe: object) -> str:
    """``recipe`` in its canonical text form ("auto" or what ``parse_recipe`` prints), or a UserInputError."""
    if not isinstance(recipe, str) or not recipe.strip() or len(recipe) > MAX_TEXT:
        raise UserInputError(f"recipe must be 'auto' or a recipe of 1-{MAX_TEXT} characters, got {recipe!r}")
    if recipe.strip().lower() == "auto":
        return "auto"
    parse = _recipe_parser()
    if parse is None:
        if not _RECIPE_FALLBACK.fullmatch(recipe):
            raise UserInputError(
                f"invalid recipe {recipe!r}: use 'auto' or lower-case letters, digits, '_', '.', ':' and '+'"
            )
        return recipe
    try:
        parsed = parse(recipe)
    except (UserInputError, ValueError) as exc:
        raise UserInputError(f"invalid recipe {recipe!r}: {exc}") from exc
    return str(parsed) or recipe


def _recipe_parser() -> Callable[[str], object] | None:
    """``server.compress.recipes.parse_recipe`` when this installation has it, else None."""
    try:
        module = importlib.import_module(_RECIPES_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != _RECIPES_MODULE:
            raise
        return None
    parse = getattr(module, "parse_recipe", None)
    return parse if callable(parse) else None


# -- the registry --------------------------------------------------------------------------


def add_profile(db: Database, spec: ProfileSpec, *, replace: bool = False) -> ProfileRow:
    """Store ``spec``; an existing user profile is overwritten only with ``replace``, a built-in one never."""
    with db.session() as session:
        profile = session.get(Profile, spec.name)
        if profile is not None and profile.builtin:
            if replace:
                raise UserInputError(
                    f"profile {spec.name!r} is built in and cannot be replaced; add yours under another name"
                )
            raise AlreadyExistsError(f"profile {spec.name!r} already exists (built in, so it cannot be replaced)")
        if profile is not None and not replace:
            raise AlreadyExistsError(f"profile {spec.name!r} already exists; use --replace to overwrite it")
        if profile is None:
            profile = Profile(name=spec.name)
            session.add(profile)
        profile.description = spec.description
        profile.quantization = spec.quantization
        profile.quantizations = ",".join(spec.quantizations)
        profile.threads = spec.threads
        profile.recipe = spec.recipe
        profile.objective = spec.objective
        profile.accuracy_budget = float(spec.accuracy_budget)
        profile.max_model_bytes = spec.max_model_bytes
        profile.max_ram_bytes = spec.max_ram_bytes
        profile.builtin = False
        session.flush()
        return ProfileRow.of(profile, profile_queries.device_count(session, spec.name))


def list_profiles(db: Database) -> list[ProfileRow]:
    with db.session() as session:
        counts = profile_queries.device_counts(session)
        return [ProfileRow.of(p, counts.get(p.name, 0)) for p in profile_queries.profiles(session)]


def show_profile(db: Database, name: str) -> ProfileRow:
    """The profile ``name``, or a NotFoundError listing the known ones."""
    with db.session() as session:
        profile = get_profile(session, name)
        return ProfileRow.of(profile, profile_queries.device_count(session, name))
