"""When a device's interpreter cannot load a variant: one report warns, a confirmed one blocks.

Agents report ``load_error`` when their runtime cannot load a model file;
ingest stores one report per deployment (``LoadErrorRecord``). A
(model file sha256, runtime) pair is *confirmed* broken once it has
``CONFIRMATIONS`` reports: two devices, or one device on two deployments.
One report alone may be one device's problem (a damaged slot, a misreported
runtime), and blocking a whole runtime's fleet on it is too much, so it only
warns. ``start_rollout`` refuses a confirmed pair unless the operator passes
``--ignore-load-errors``; every message names who reported it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from server.db import Session, queries
from shared.errors import UserInputError

CONFIRMATIONS = 2
NAMES_SHOWN = 5  # target devices named in one message; the rest are counted


@dataclass(frozen=True)
class LoadErrorReport:
    model_sha256: str
    runtime: str  # "<name> <version>", as the device reported it
    device: str  # the reporting device's name
    deployment_id: str | None  # None for a report migrated from before reports were kept per deployment
    reason: str
    reported_at: datetime


@dataclass(frozen=True)
class KnownLoadErrors:
    """Every report on one (model file, runtime) pair, oldest first (never empty)."""

    model_sha256: str
    runtime: str
    reports: tuple[LoadErrorReport, ...]

    @property
    def confirmed(self) -> bool:
        return len(self.reports) >= CONFIRMATIONS

    @property
    def first_reason(self) -> str:
        return self.reports[0].reason

    def reporters(self) -> str:
        """Who reported it, e.g. ``cam-1 (2 times) and cam-2``."""
        counts = Counter(r.device for r in self.reports)  # in order of first report
        return _names([name if n == 1 else f"{name} ({n} times)" for name, n in counts.items()])


@dataclass(frozen=True)
class Shipment:
    """A variant a rollout is about to send to the target devices on one runtime."""

    model_ref: str  # NAME:VERSION
    profile: str
    recipe: str
    model_sha256: str
    runtime: str
    devices: tuple[str, ...]

    @property
    def variant(self) -> str:
        return f"{self.model_ref}'s {self.recipe} variant for {self.profile} ({self.model_sha256[:12]})"


def reports_on(
    session: Session, model_sha256s: Collection[str], runtime: str | None = None
) -> tuple[LoadErrorReport, ...]:
    """Every report on these model files (by devices on ``runtime``, if given), oldest first."""
    return tuple(
        LoadErrorReport(r.model_sha256, r.runtime, name, r.deployment_id, r.reason, _utc(r.created_at))
        for r, name in queries.load_error_reports(session, model_sha256s, runtime)
    )


def by_pair(reports: Sequence[LoadErrorReport]) -> dict[tuple[str, str], KnownLoadErrors]:
    """Group reports by (model file, runtime), keeping their order."""
    grouped: dict[tuple[str, str], list[LoadErrorReport]] = {}
    for report in reports:
        grouped.setdefault((report.model_sha256, report.runtime), []).append(report)
    return {key: KnownLoadErrors(*key, tuple(group)) for key, group in grouped.items()}


def known_load_errors(session: Session, model_sha256: str, runtime: str) -> KnownLoadErrors | None:
    reports = reports_on(session, [model_sha256], runtime)
    return KnownLoadErrors(model_sha256, runtime, reports) if reports else None


def vet_shipments(session: Session, shipments: Sequence[Shipment], *, ignore_load_errors: bool) -> list[str]:
    """The warnings to show before sending these; raises UserInputError on the first confirmed pair,
    unless ``ignore_load_errors``. Nothing is warned when something is refused."""
    warnings = []
    for shipment in shipments:
        known = known_load_errors(session, shipment.model_sha256, shipment.runtime)
        if known is None:
            continue
        if not known.confirmed:
            warnings.append(_unconfirmed_warning(shipment, known))
        elif ignore_load_errors:
            warnings.append(_override_warning(shipment, known))
        else:
            raise UserInputError(_refusal(shipment, known))
    return warnings


def _refusal(shipment: Shipment, known: KnownLoadErrors) -> str:
    ref, profile = shipment.model_ref, shipment.profile
    return (
        f"{_run(shipment.devices)} {shipment.runtime}, which cannot load {shipment.variant}: confirmed by "
        f"{len(known.reports)} load_error reports from {known.reporters()} (first: {known.first_reason}); "
        f"build and ship another recipe ('edgefleet model build {ref} --profile {profile} --recipe ... --ship'), "
        f"leave "
        f"{'that device' if len(shipment.devices) == 1 else 'those devices'} out, or pass --ignore-load-errors "
        "to roll it out anyway"
    )


def _unconfirmed_warning(shipment: Shipment, known: KnownLoadErrors) -> str:
    return (
        f"{shipment.variant} goes to {_names(shipment.devices)} on {shipment.runtime} although "
        f"{known.reporters()} reported that runtime could not load it ({known.first_reason}); "
        "one report is not a confirmation, another will block later rollouts"
    )


def _override_warning(shipment: Shipment, known: KnownLoadErrors) -> str:
    return (
        f"--ignore-load-errors: {shipment.variant} goes to {_names(shipment.devices)} on {shipment.runtime} "
        f"although {len(known.reports)} load_error reports from {known.reporters()} say that runtime cannot load "
        f"it (first: {known.first_reason})"
    )


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite drops the zone; we store UTC


def _names(names: Sequence[str]) -> str:
    shown = list(names[:NAMES_SHOWN])
    if len(names) > NAMES_SHOWN:
        shown.append(f"{len(names) - NAMES_SHOWN} more")
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"


def _run(devices: Sequence[str]) -> str:
    return f"{_names(devices)} {'runs' if len(devices) == 1 else 'run'}"
