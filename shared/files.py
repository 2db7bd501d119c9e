"""Durable file writes: a temp file in the same directory, fsync, rename, fsync the directory.

A power cut leaves the old file or the new one, never half of one. A private
file (keys, passwords, tokens, signed roots) has mode 0600 from its first
byte, whatever the umask says; ``exclusive`` refuses to replace an existing
file by linking the temp file into place, which fails atomically where a
check-then-rename would race (refusing to overwrite a key is part of the
contract of the commands that make one).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from shared.errors import AlreadyExistsError, StorageError
from shared.failpoints import failpoint

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV})


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"disk full while writing {what}")
    return StorageError(f"cannot write {what}: {exc.strerror or exc}")


def fsync_file(path: Path) -> None:
    """Make a file's contents durable (its directory entry is made durable when the file is renamed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error(exc, str(path)) from exc


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it 0700."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from exc


def atomic_write_bytes(
    path: Path, data: bytes, *, private: bool = False, exclusive: bool = False, failpoint_name: str | None = None,
    durable: bool = True,
) -> None:
    """Replace ``path`` with ``data`` all at once, durably. ``private``: mode 0600 from the start;
    ``exclusive``: refuse (AlreadyExistsError) if ``path`` exists; ``failpoint_name``: a failpoint between
    the new bytes being safe in the temp file and the rename (``shared/failpoints.py``); ``durable=False``:
    no fsyncs (still whole or absent for a killed process, but a power cut may leave it empty)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = PRIVATE_FILE if private else 0o644
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            if private:
                os.fchmod(fd, PRIVATE_FILE)  # whatever the umask said
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if failpoint_name is not None:
            failpoint(failpoint_name)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExistsError(f"{path} already exists; refusing to overwrite it") from None
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:
                    raise
                _create_exclusive(path, data, mode)  # e.g. a FAT stick for an offline key: no hard links there
        else:
            os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except OSError as exc:
        raise storage_error(exc, str(path)) from exc
    finally:
        with contextlib.suppress(OSError):  # gone after a rename; the directory itself may be what failed
            tmp.unlink(missing_ok=True)


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` only if it does not exist, and write it: not atomic, for file systems without links."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise AlreadyExistsError(f"{path} already exists; refusing to overwrite it") from None
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """``atomic_write_bytes`` for a secret: mode 0600 from the first byte."""
    atomic_write_bytes(path, data, private=True, exclusive=exclusive)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
