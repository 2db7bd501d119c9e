"""The agent's root of trust: which keys verify manifests and directives, and how that changes.

An agent configured with ``[keys] root_file`` starts from that signed root,
or from the newer one it saved in its data directory (``trusted-root.json``).
The server publishes the chain of every root version, retained, on
``ef/v1/root``; ``RootTrust.receive`` walks it from the trusted root
(``shared/root.py``), saves the new root atomically *before* anything uses
it, and only then hands out its keys. A chain that fails a check is logged
and reported once, and changes nothing: the trusted root on disk and in
memory stay as they were.

An agent with pinned keys (``[keys] release``/``director``, the older form)
has no root: it keeps its pins, does not subscribe to the root, and cannot
follow a rotation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import AgentConfig
from agent.files import atomic_write_json
from shared.canonical import canonical_digest
from shared.codec import encode
from shared.errors import ProtocolError, StorageError, TrustError
from shared.failpoints import failpoint
from shared.messages import RootChain, SignedEnvelope, clip_reason
from shared.root import Root, read_root_file, root_from_json, update_root
from shared.signing import TrustedKeys

logger = logging.getLogger(__name__)

TRUSTED_ROOT = "trusted-root.json"


def trusted_root_path(data_dir: Path) -> Path:
    return data_dir / TRUSTED_ROOT


def load_saved_root(path: Path) -> tuple[Root, SignedEnvelope] | None:
    """The root this agent saved after verifying it, or None before its first rotation."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"{path} is unreadable ({exc.strerror or exc})") from exc
    try:
        return root_from_json(data)
    except (ProtocolError, TrustError) as exc:
        raise StorageError(f"{path} is unreadable ({exc}); move it away to start from the configured root") from exc


class RootTrust:
    """The trusted root of an agent with a ``root_file``; ``keys`` is what the updater verifies with."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.path = trusted_root_path(config.data_dir)
        self.clock = clock
        self.root, self.envelope = read_root_file(Path(config.keys.root_file))
        saved = load_saved_root(self.path)
        if saved is not None and saved[0].version >= self.root.version:
            self.root, self.envelope = saved  # newer than the configured one: it came over MQTT
        self._last_rejected = ""  # digest of the last chain refused: a retained one comes on every reconnect

    @property
    def version(self) -> int:
        return self.root.version

    @property
    def keys(self) -> TrustedKeys:
        return self.root.trusted_keys()

    def receive(self, chain: RootChain, rejected: Callable[[str], None]) -> bool:
        """Walk ``chain`` from the trusted root; True when it moved the trusted root on (saved first).
        A chain that fails a check changes nothing; it is logged and passed to ``rejected`` once."""
        try:
            update = update_root(self.root, self.envelope, chain.roots, now=self.clock())
        except TrustError as exc:
            digest = canonical_digest(encode(chain))
            if digest != self._last_rejected:
                self._last_rejected = digest
                logger.warning("rejected root of trust: %s (still trusting root v%d)", exc, self.root.version)
                rejected(clip_reason(f"rejected root of trust: {exc}"))
            return False
        if update is None:
            return False
        failpoint("agent.root.verified")  # verified, not saved
        atomic_write_json(self.path, encode(update.envelope))  # before any key of it is used
        failpoint("agent.root.saved")  # saved, not yet used
        old = self.root.version
        self.root, self.envelope = update.root, update.envelope
        logger.info("trusted root v%d → v%d", old, update.root.version)
        return True


def trusted_keys(config: AgentConfig) -> TrustedKeys:
    """What an agent starting now verifies with: its trusted root's keys, or its pinned ones."""
    return RootTrust(config).keys if config.keys.uses_root else config.pinned_keys()
