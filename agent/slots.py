"""Two model slots and an atomically switched pointer to the active one.

::

    data_dir/slots/a/{model.tflite, eval.npz, manifest.json}
    data_dir/slots/b/...
    data_dir/active.json      {"slot": "a", "deployment_id": ...}   (replaced atomically)

A new model is staged in the spare slot; committing rewrites ``active.json``
in one rename, so a crash leaves either the old or the new model active,
never a mixture. The active slot is never written to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from agent.download import verify_file
from agent.files import atomic_write_json, read_json, storage_error
from shared.codec import decode, encode
from shared.errors import EdgefleetError, StorageError
from shared.failpoints import failpoint
from shared.messages import FileEntry, Manifest

SLOTS = ("a", "b")


class SlotStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "slots"
        self.pointer = data_dir / "active.json"

    def _read_pointer(self) -> dict[str, Any] | None:
        if not self.pointer.exists():
            return None
        try:
            value = read_json(self.pointer)
        except (OSError, ValueError) as exc:
            raise StorageError(f"{self.pointer} is unreadable ({exc})") from exc
        if not isinstance(value, dict):
            raise StorageError(f"{self.pointer} is not a JSON object")
        return value

    def active_slot(self) -> str | None:
        pointer = self._read_pointer()
        slot = None if pointer is None else pointer.get("slot")
        return slot if slot in SLOTS else None

    def spare_slot(self) -> str:
        return "b" if self.active_slot() == "a" else "a"

    def slot_dir(self, slot: str) -> Path:
        return self.root / slot

    def manifest(self, slot: str) -> Manifest | None:
        path = self.slot_dir(slot) / "manifest.json"
        if not path.exists():
            return None
        return decode(Manifest, read_json(path))

    def active_manifest(self) -> Manifest | None:
        slot = self.active_slot()
        return self.manifest(slot) if slot else None

    def file_path(self, slot: str, entry: FileEntry) -> Path:
        return self.slot_dir(slot) / entry.name

    def find_local(self, entry: FileEntry) -> Path | None:
        """A file with the same digest already held in a slot, to copy instead of download. A slot whose
        manifest is unreadable holds nothing to trust: its files are downloaded again instead."""
        for slot in SLOTS:
            try:
                manifest = self.manifest(slot)
            except (EdgefleetError, OSError, ValueError):
                continue
            if manifest is None:
                continue
            for held in manifest.files:
                path = self.file_path(slot, held)
                if held.sha256 == entry.sha256 and path.exists():
                    return path
        return None

    def clear_spare(self) -> str:
        spare = self.spare_slot()
        shutil.rmtree(self.slot_dir(spare), ignore_errors=True)
        return spare

    def stage(self, manifest: Manifest, files: dict[str, Path]) -> str:
        """Move verified files into the spare slot; returns the slot name.

        Idempotent: after a crash half-way, files already moved are found in the
        slot and checked again against the manifest (files moved now were verified
        just before, and are not hashed twice).
        """
        spare = self.spare_slot()
        target = self.slot_dir(spare)
        try:
            (target / "manifest.json").unlink(missing_ok=True)  # the slot is no longer a whole model
            target.mkdir(parents=True, exist_ok=True)
            for entry in manifest.files:
                source, staged = files[entry.name], target / entry.name
                if source.exists():
                    os.replace(source, staged)
                else:
                    verify_file(staged, entry)
            for leftover in set(target.iterdir()) - {target / e.name for e in manifest.files}:
                leftover.unlink()
            failpoint("agent.staged.files_moved")
            atomic_write_json(target / "manifest.json", encode(manifest))
        except OSError as exc:
            raise storage_error(exc, f"slot {spare}") from exc
        return spare

    def commit(self, slot: str, deployment_id: str) -> None:
        atomic_write_json(self.pointer, {"slot": slot, "deployment_id": deployment_id})

    def active_deployment(self) -> str | None:
        pointer = self._read_pointer()
        value = None if pointer is None else pointer.get("deployment_id")
        return value if isinstance(value, str) else None

    def digest_of_active(self) -> str | None:
        """sha256 of the active pointer plus the active model bytes; lets tests prove nothing moved."""
        slot = self.active_slot()
        manifest = self.manifest(slot) if slot else None
        if slot is None or manifest is None:
            return None
        digest = hashlib.sha256(self.pointer.read_bytes())
        try:
            digest.update(self.file_path(slot, manifest.file("model")).read_bytes())
        except OSError as exc:
            raise StorageError(f"active model unreadable: {exc}") from exc
        return digest.hexdigest()
