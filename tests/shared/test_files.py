"""Durable, private file writes (``shared/files.py``)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import shared.files
from shared.errors import AlreadyExistsError, StorageError
from shared.files import atomic_write_bytes, write_private


def test_a_private_file_is_0600_from_the_start_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private(tmp_path / "key.pem", b"secret")
    finally:
        os.umask(old)
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "key.pem").read_bytes() == b"secret"
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temp file left


def test_replacing_is_atomic_and_exclusive_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "release.pem"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    with pytest.raises(AlreadyExistsError, match="already exists"):
        write_private(path, b"three", exclusive=True)
    assert path.read_bytes() == b"two"


def test_exclusive_on_a_file_system_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FAT stick (where an offline key belongs) has no hard links: the file is created exclusively instead."""
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(shared.files.os, "link", no_links)
    path = tmp_path / "release.pem"
    write_private(path, b"key", exclusive=True)
    assert path.read_bytes() == b"key" and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(AlreadyExistsError):
        write_private(path, b"other", exclusive=True)
    assert [p.name for p in tmp_path.iterdir()] == ["release.pem"]


def test_a_write_into_a_file_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        atomic_write_bytes(tmp_path / "file" / "inside", b"data")


def test_a_write_that_need_not_be_durable_skips_the_fsyncs_but_is_still_whole_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(shared.files.os, "fsync", lambda fd: synced.append(fd))
    target = tmp_path / "agent.toml"
    target.write_text("")  # a claim a run left empty
    atomic_write_bytes(target, b"[device]\n", private=True, durable=False)
    assert target.read_bytes() == b"[device]\n" and synced == []
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["agent.toml"]  # no temporary file left behind
    atomic_write_bytes(target, b"again\n")
    assert synced  # the default stays durable
