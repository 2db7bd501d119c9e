"""What the agent persists: the update record and the trusted state.

Both are written atomically before any side effect they describe. The trusted
state (highest release counter and directive sequence accepted) is written only
after a directive and its manifest passed every check.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from agent.files import atomic_write_json, read_json
from agent.states import State
from shared.codec import decode, encode
from shared.errors import ProtocolError, StorageError
from shared.messages import SignedEnvelope


@dataclass(frozen=True)
class UpdateRecord:
    state: str = State.IDLE.value
    deployment_id: str | None = None
    directive: SignedEnvelope | None = None
    manifest: SignedEnvelope | None = None
    slot: str | None = None
    reason: str = ""
    outcome: str | None = None  # the final UpdateState once reported; kept after IDLE for the device state

    @property
    def current(self) -> State:
        return State(self.state)

    def moved(self, state: State, **changes: object) -> UpdateRecord:
        return replace(self, state=state.value, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrustedState:
    release_counter: int = 0
    directive_seq: int = 0
    deployment_id: str | None = None


class RecordStore:
    def __init__(self, data_dir: Path) -> None:
        self.record_path = data_dir / "update-record.json"
        self.trusted_path = data_dir / "trusted.json"

    def _load(self, path: Path, cls: type, default: object) -> object:
        if not path.exists():
            return default
        try:
            return decode(cls, read_json(path))
        except (OSError, ValueError, ProtocolError) as exc:
            raise StorageError(f"{path} is unreadable ({exc}); move it away to start clean") from exc

    def load_record(self) -> UpdateRecord:
        record = self._load(self.record_path, UpdateRecord, UpdateRecord())
        assert isinstance(record, UpdateRecord)
        return record

    def save_record(self, record: UpdateRecord) -> None:
        atomic_write_json(self.record_path, encode(record))

    def load_trusted(self) -> TrustedState:
        trusted = self._load(self.trusted_path, TrustedState, TrustedState())
        assert isinstance(trusted, TrustedState)
        return trusted

    def save_trusted(self, trusted: TrustedState) -> None:
        atomic_write_json(self.trusted_path, encode(trusted))
