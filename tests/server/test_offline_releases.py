"""Releases signed with an offline release key: ``release prepare``, ``release sign`` (in a bare process: no data
directory, no database, no TensorFlow), ``release import``, and what ``rollout start`` ships then."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from server.db.models import AuditEvent, Device, Release, RolloutRelease
from server.devices import register_device, tag_device
from server.keys import load_keys, read_key_file
from server.releases import resign_release
from server.rollouts import RolloutPolicy, rollback_rollout, start_rollout
from server.roots import RootStore
from server.selection import Selection
from server.setup import Workspace
from shared.canonical import canonical_json
from shared.codec import decode, encode
from shared.errors import ConfigError
from shared.files import write_private
from shared.messages import Manifest, SignedEnvelope
from shared.protocol import decode_versioned, encode_versioned
from shared.release_files import read_release_file
from shared.signing import add_signatures, key_id, private_key_pem, sign_envelope, verify_manifest
from tests.server.test_cli_errors import assert_ok, assert_user_error, run
from tests.server.test_rollout_waves import NAMES, Fleet, installed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline(workspace: Workspace, tmp_path: Path) -> Path:
    """The workspace with its release key moved off the server, to ``tmp_path/release.pem``; one device."""
    key = workspace.data_dir.keys / "release.pem"
    key.rename(tmp_path / "release.pem")
    assert load_keys(workspace.data_dir.keys).release is None
    register_device(workspace.db, "cam-1", "x86-64")
    return tmp_path / "release.pem"


def data(workspace: Workspace) -> Path:
    return workspace.data_dir.root


def prepare(workspace: Workspace, tmp_path: Path, name: str = "unsigned.json") -> Path:
    out = tmp_path / name
    text = assert_ok(run("release", "prepare", "digits:1", "--profile", "x86-64", "--out", out,
                         "--data-dir", data(workspace)))
    assert text.startswith("prepared release ") and "digits:1 for profile x86-64" in text
    return out


def sign(unsigned: Path, key: Path, out: Path) -> Path:
    text = assert_ok(run("release", "sign", unsigned, "--key", key, "--out", out))
    assert f"with key {key_id(read_key_file(key, 'key').public_key())}" in text
    return out


def start(workspace: Workspace) -> str:
    return assert_ok(run("rollout", "start", "digits:1", "--device", "cam-1", "--data-dir", data(workspace))).strip()


def shipped(workspace: Workspace, rollout_id: str) -> Release:
    with workspace.db.session() as session:
        return session.scalars(select(Release).join(RolloutRelease, RolloutRelease.release_id == Release.id)
                               .where(RolloutRelease.rollout_id == rollout_id)).one()


def test_prepared_signed_and_imported_a_release_is_what_rollout_start_ships(
    workspace: Workspace, offline: Path, tmp_path: Path
) -> None:
    unsigned = prepare(workspace, tmp_path)
    prepared = read_release_file(unsigned)
    assert prepared.signatures == ()
    manifest = decode_versioned(Manifest, prepared.signed)
    signed = sign(unsigned, offline, tmp_path / "release.json")

    text = assert_ok(run("release", "import", signed, "--data-dir", data(workspace)))

    assert text.startswith(f"imported release {manifest.release_counter}: digits:1 for profile x86-64")
    release = shipped(workspace, start(workspace))
    assert release.id == manifest.release_counter
    envelope = decode(SignedEnvelope, release.manifest)
    root, _ = RootStore(workspace.data_dir.keys).current()
    assert verify_manifest(envelope, root.trusted_keys(), now=time.time()) == manifest
    assert release.model_sha256 == manifest.file("model").sha256  # the chunk server may serve it now


def test_a_prepared_manifest_is_exactly_what_the_server_would_have_signed(
    workspace: Workspace, tmp_path: Path
) -> None:
    """The same builder: an online signature of the next counter names the same files, digests and limits."""
    online = load_keys(workspace.data_dir.keys)
    register_device(workspace.db, "cam-1", "x86-64")
    prepared = decode_versioned(Manifest, read_release_file(prepare(workspace, tmp_path)).signed)
    signed_online = decode_versioned(Manifest, shipped(workspace, start(workspace)).manifest["signed"])
    assert online.release is not None
    assert signed_online.release_counter == prepared.release_counter + 1
    same = ("model", "version", "profile", "quantization", "files", "reference", "max_ram_bytes", "threads")
    assert all(getattr(prepared, f) == getattr(signed_online, f) for f in same)


def test_rollout_start_without_an_imported_release_names_the_commands(workspace: Workspace, offline: Path) -> None:
    assert_user_error(run("rollout", "start", "digits:1", "--device", "cam-1", "--data-dir", data(workspace)),
                      "no signed release of digits:1 for profile x86-64, and this server holds no release key",
                      "edgefleet release prepare digits:1 --profile x86-64", "edgefleet release sign",
                      "edgefleet release import")


def test_rollout_start_offline_for_an_unbuilt_profile_stops_before_building(
    workspace: Workspace, offline: Path
) -> None:
    register_device(workspace.db, "pi5", "rpi5")
    assert_user_error(run("rollout", "start", "digits:1", "--device", "pi5", "--data-dir", data(workspace)),
                      "no variant of digits:1 is built for profile(s) rpi5", "edgefleet model build digits:1")


def test_a_release_signed_by_the_director_key_is_not_imported(
    workspace: Workspace, offline: Path, tmp_path: Path
) -> None:
    forged = sign(prepare(workspace, tmp_path), workspace.data_dir.keys / "director.pem", tmp_path / "forged.json")
    assert_user_error(run("release", "import", forged, "--data-dir", data(workspace)),
                      "refusing this release: no valid signature by a pinned release key (root of trust v1)")
    assert_user_error(run("release", "import", prepare(workspace, tmp_path, "again.json"), "--data-dir",
                          data(workspace)), "refusing this release: release metadata carries no signature")


def test_a_signed_manifest_that_is_not_the_prepared_one_is_not_imported(
    workspace: Workspace, offline: Path, tmp_path: Path
) -> None:
    prepared = read_release_file(prepare(workspace, tmp_path))
    manifest = decode_versioned(Manifest, prepared.signed)
    key = read_key_file(offline, "release key")
    longer = sign_envelope(Manifest(**{**manifest.__dict__, "expires": manifest.expires + 86400}), key)
    (tmp_path / "longer.json").write_bytes(canonical_json(encode(longer)))
    assert_user_error(run("release", "import", tmp_path / "longer.json", "--data-dir", data(workspace)),
                      f"the signed manifest differs from the one prepared as release {manifest.release_counter} in: "
                      "expires")
    never = sign_envelope(Manifest(**{**manifest.__dict__, "release_counter": 9999}), key)
    (tmp_path / "never.json").write_bytes(canonical_json(encode(never)))
    assert_user_error(run("release", "import", tmp_path / "never.json", "--data-dir", data(workspace)),
                      "release 9999 was never prepared here")


def test_importing_the_same_release_twice_is_harmless(workspace: Workspace, offline: Path, tmp_path: Path) -> None:
    signed = sign(prepare(workspace, tmp_path), offline, tmp_path / "release.json")
    assert_ok(run("release", "import", signed, "--data-dir", data(workspace)))
    assert_ok(run("release", "import", signed, "--data-dir", data(workspace)))


def test_a_release_by_a_revoked_key_no_longer_ships(workspace: Workspace, offline: Path, tmp_path: Path) -> None:
    old = sign(prepare(workspace, tmp_path), offline, tmp_path / "old.json")
    assert_ok(run("release", "import", old, "--data-dir", data(workspace)))
    assert_ok(run("keys", "rotate", "--role", "release", "--new-key-out", tmp_path / "new.pem",
                  "--data-dir", data(workspace)))
    assert_ok(run("keys", "revoke", key_id(read_key_file(offline, "k").public_key()), "--data-dir", data(workspace)))

    assert_user_error(run("rollout", "start", "digits:1", "--device", "cam-1", "--data-dir", data(workspace)),
                      "cannot ship: no valid signature by a pinned release key; make a new one")
    assert_user_error(run("release", "import", sign(prepare(workspace, tmp_path, "u2.json"), offline,
                                                     tmp_path / "by-revoked.json"), "--data-dir", data(workspace)),
                      "refusing this release: no valid signature by a pinned release key (root of trust v3)")
    fresh = sign(prepare(workspace, tmp_path, "u3.json"), tmp_path / "new.pem", tmp_path / "new.json")
    assert_ok(run("release", "import", fresh, "--data-dir", data(workspace)))
    assert start(workspace).startswith("r-")


def test_resigning_needs_an_online_release_key(workspace: Workspace, offline: Path, tmp_path: Path) -> None:
    assert_ok(run("release", "import", sign(prepare(workspace, tmp_path), offline, tmp_path / "r.json"),
                  "--data-dir", data(workspace)))
    release = shipped(workspace, start(workspace))
    with workspace.db.session() as session, pytest.raises(ConfigError) as exc:
        resign_release(session, load_keys(workspace.data_dir.keys), session.get(Release, release.id))
    assert str(exc.value).startswith("re-signing a release needs the release key, and this server holds none")


def test_a_second_key_adds_a_second_signature(workspace: Workspace, tmp_path: Path) -> None:
    unsigned = prepare(workspace, tmp_path)
    other = tmp_path / "other.pem"
    write_private(other, private_key_pem(Ed25519PrivateKey.generate()))
    once = sign(unsigned, workspace.data_dir.keys / "release.pem", tmp_path / "once.json")
    twice = read_release_file(sign(once, other, tmp_path / "twice.json"))
    assert twice.signatures[0] == read_release_file(once).signatures[0]
    assert len(twice.signatures) == 2 and twice.signed == read_release_file(unsigned).signed


def test_sign_refuses_what_is_not_a_release(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_bytes(canonical_json(encode(add_signatures(
        SignedEnvelope(signed=encode_versioned({"model": "x"}), signatures=()), []))))
    key = tmp_path / "k.pem"
    write_private(key, private_key_pem(Ed25519PrivateKey.generate()))
    assert_user_error(run("release", "sign", tmp_path / "x.json", "--key", key, "--out", tmp_path / "o.json"),
                      "x.json does not hold a release manifest")
    assert_user_error(run("release", "sign", tmp_path / "missing.json", "--key", key, "--out", tmp_path / "o.json"),
                      "cannot read")
    assert not (tmp_path / "o.json").exists()


def test_release_sign_runs_in_a_bare_process_without_server_dependencies(
    workspace: Workspace, offline: Path, tmp_path: Path
) -> None:
    """Only the package and cryptography: TensorFlow, SQLAlchemy and the server's database layer are made
    unimportable, the environment is empty, and there is no data directory to find."""
    unsigned = prepare(workspace, tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    blocked = ("tensorflow", "keras", "tf_keras", "sqlalchemy", "alembic", "numpy", "server.db", "server.setup")
    program = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
               "from edgefleet.cli import main\nsys.argv = ['edgefleet', *sys.argv[1:]]\nmain()\n")
    proc = subprocess.run(
        [sys.executable, "-c", program, "release", "sign", str(unsigned), "--key", str(offline),
         "--out", str(bare / "release.json")],
        cwd=bare, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(bare)},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_ok(run("release", "import", bare / "release.json", "--data-dir", data(workspace)))


# -- the running engine, with the release key offline --------------------------------------------------------


def offline_fleet(workspace: Workspace, offline: Path, tmp_path: Path) -> Fleet:
    """The waves tests' fleet (five x86-64 devices, all online, a fake clock) on the offline workspace, with one
    release of digits:1 for x86-64 signed offline and imported."""
    assert_ok(run("release", "import", sign(prepare(workspace, tmp_path), offline, tmp_path / "r.json"),
                  "--data-dir", data(workspace)))
    ids = {"cam-1": tag_device(workspace.db, "cam-1", [("site", "lab")], ()).device.id}  # the fixture's
    ids |= {name: register_device(workspace.db, name, "x86-64", [("site", "lab")]).id for name in NAMES[1:]}
    with workspace.db.session() as session:
        for device in session.scalars(select(Device)):
            device.online = True
    return Fleet(workspace, ids)


def test_a_fleet_rollback_without_the_release_key_says_what_to_do(
    workspace: Workspace, offline: Path, tmp_path: Path
) -> None:
    fleet = offline_fleet(workspace, offline, tmp_path)
    installed(fleet)
    rollout_id = fleet.start(waves="100%")
    for name, deployment in fleet.deployments(rollout_id).items():
        fleet.commit(name, deployment, previous=(0.97, 1.0))

    rollback_rollout(workspace.db, rollout_id, "operator test@host")
    fleet.tick()

    assert fleet.deployments(rollout_id, "revert") == {}  # nothing it could sign
    assert fleet.audit(rollout_id).count("rollback.needs_release_key") == len(NAMES)
    with workspace.db.session() as session:
        message = session.scalars(select(AuditEvent.message).where(AuditEvent.kind == "rollback.needs_release_key")
                                  ).first()
    assert message is not None and "re-signing its release needs the release key, which is offline" in message


def test_a_device_joining_a_profile_with_no_imported_release_is_skipped_with_the_commands(
    workspace: Workspace, offline: Path, tmp_path: Path
) -> None:
    fleet = offline_fleet(workspace, offline, tmp_path)
    rollout_id = start_rollout(workspace.db, workspace.blobs, workspace.keys(), "digits",
                               Selection(tags=(("site", "lab"),)), RolloutPolicy(waves=("100%",)))
    fleet.tick()
    register_device(workspace.db, "pi-late", "rpi4", [("site", "lab")])
    fleet.tick()

    assert "device.skipped" in fleet.audit(rollout_id)
    with workspace.db.session() as session:
        message = session.scalars(select(AuditEvent.message).where(AuditEvent.kind == "device.skipped")).one()
    assert message.startswith("pi-late joined, but no signed release of digits:1 for profile rpi4")
    assert "edgefleet release prepare digits:1 --profile rpi4" in message
