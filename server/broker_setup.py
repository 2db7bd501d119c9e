"""The fleet's own Mosquitto: configuration, identities and topic ACLs, kept in ``DATA_DIR/broker``.

``edgefleet init`` writes it once (the private CA and the broker's certificate
too, see ``server/tls.py``); ``edgefleet broker`` runs Mosquitto 2 with it. Every
device has its own broker identity (its id as username, a random password whose
PBKDF2-SHA512 hash is all the server keeps), the server has one, and anonymous
clients are refused. ``use_username_as_clientid`` binds a session to its
identity: a client cannot take over a device's session without its password.
The ACL file is static, written from patterns with ``%u`` (the username, which
is the device id), so that a device publishes only under
``ef/v1/devices/{its id}/…``, reads only its own desired state and commands,
artifact chunks and the root of trust. The password file is regenerated from the
database on every register, enrolment and removal and the broker is told to
re-read it (SIGHUP): Mosquitto then drops at once a connected client whose
identity is gone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from server.replicas import SERVER_USERNAME
from server.tls import FleetCertificates, create_ca, create_server_certificate, server_hosts, subject_alternative_names
from shared.codec import decode
from shared.errors import ConfigError, ProtocolError, UserInputError
from shared.files import atomic_write_bytes, write_private
from shared.mqtt import BrokerAddress
from shared.tomlfile import read_toml
from shared.topics import PREFIX

__all__ = ["SERVER_USERNAME"]  # re-exported: the default replica's identity
DEFAULT_PORT = 8883
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes for $7$ (PBKDF2-SHA512) entries
SECRET_BYTES = 24

# Every device's rights, with %u = its username = its device id. Chunks and the root are for every device.
DEVICE_PATTERNS = f"""\
# Written by edgefleet. Every client (all are authenticated: anonymous access is off) reads the artifact
# chunks and the root of trust. These are patterns because "topic" lines before a "user" line are for
# anonymous clients only (Mosquitto warns that they name neither %u nor %c; that is intended).
pattern read {PREFIX}/artifacts/+/chunks/+
pattern read {PREFIX}/root
# every device (username = device id) publishes only under its own id
pattern write {PREFIX}/devices/%u/state
pattern write {PREFIX}/devices/%u/availability
pattern write {PREFIX}/devices/%u/events
pattern write {PREFIX}/devices/%u/telemetry
pattern write {PREFIX}/devices/%u/want/+
# and reads only its own desired state, commands and report acknowledgements
pattern read {PREFIX}/devices/%u/desired
pattern read {PREFIX}/devices/%u/cmd
pattern read {PREFIX}/devices/%u/ack
"""


def acl_text(servers: Iterable[str]) -> str:
    """The ACL file: the devices' patterns, then a block for each server replica's identity (all topics)."""
    blocks = [f"\n# the server{' replica' if name != SERVER_USERNAME else ''}\nuser {name}\ntopic readwrite {PREFIX}/#\n"
              for name in sorted(set(servers))]
    return DEVICE_PATTERNS + "".join(blocks)


DEVICE_ACL = acl_text([SERVER_USERNAME])


@dataclass(frozen=True)
class BrokerLayout:
    """The files of a data directory's broker."""

    directory: Path

    @property
    def settings(self) -> Path:
        return self.directory / "broker.toml"

    @property
    def config(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def passwords(self) -> Path:
        return self.directory / "passwd"

    @property
    def acl(self) -> Path:
        return self.directory / "acl"

    @property
    def pid_file(self) -> Path:
        return self.directory / "mosquitto.pid"

    @property
    def log(self) -> Path:
        return self.directory / "mosquitto.log"

    @property
    def persistence(self) -> Path:
        return self.directory / "data"

    @property
    def server_secret(self) -> Path:
        return self.directory / "server-password"

    @property
    def tls(self) -> FleetCertificates:
        return FleetCertificates(self.directory / "tls")

    def exists(self) -> bool:
        return self.settings.exists()


@dataclass(frozen=True)
class BrokerSettings:
    """What ``init`` chose: where the broker listens, the host devices reach it by, TLS and client certificates."""

    listen_host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    public_host: str = "127.0.0.1"  # in the URL device configs name; the certificate names it
    tls: bool = True
    client_certificates: bool = False  # mTLS: every client also presents a certificate from the fleet CA

    def device_url(self, port: int | None = None) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.public_host}:{port or self.port}"

    def to_toml(self) -> str:
        return "\n".join([
            "# edgefleet's broker settings, written by 'edgefleet init'",
            f"listen_host = {json.dumps(self.listen_host)}",
            f"port = {self.port}",
            f"public_host = {json.dumps(self.public_host)}",
            f"tls = {str(self.tls).lower()}",
            f"client_certificates = {str(self.client_certificates).lower()}",
            "",
        ])

    @classmethod
    def load(cls, layout: BrokerLayout) -> BrokerSettings:
        data = read_toml(layout.settings, "broker settings", ConfigError)
        try:
            return decode(cls, data, path="broker")
        except ProtocolError as exc:
            raise ConfigError(f"{layout.settings}: {exc}") from exc


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def password_hash(password: str, *, salt: bytes | None = None) -> str:
    """Mosquitto's ``$7$`` entry (PBKDF2-HMAC-SHA512), the same as ``mosquitto_passwd`` writes."""
    salt = salt if salt is not None else os.urandom(12)
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(derived).decode()}"


def server_password(layout: BrokerLayout) -> str:
    try:
        return layout.server_secret.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the server's broker password {layout.server_secret}: {exc}") from exc


def _server_salt(secret: str, username: str) -> bytes:
    # From the server's own (random, 192-bit) password, so the same identities always make the same file and
    # a periodic reconciliation rewrites nothing; each replica's differs.
    seed = secret if username == SERVER_USERNAME else f"{username}\n{secret}"
    return hashlib.sha256(seed.encode()).digest()[:12]


def write_identities(layout: BrokerLayout, devices: Iterable[tuple[str, str]],
                     servers: Iterable[str] = (SERVER_USERNAME,)) -> bool:
    """The password file (each server replica's identity, all with the server's password, and each
    ``(device id, password hash)``) and the ACL (a block per replica); then the running broker (if any)
    re-reads them, which disconnects a client whose identity is gone. Nothing happens when the files
    already say exactly that; returns whether they changed."""
    secret = server_password(layout)
    servers = sorted({SERVER_USERNAME, *servers})
    lines = [f"{name}:{password_hash(secret, salt=_server_salt(secret, name))}" for name in servers]
    lines += [f"{device_id}:{hashed}" for device_id, hashed in sorted(devices)]
    changed = _write_if_changed(layout.passwords, ("\n".join(lines) + "\n").encode(), private=True)
    changed = _write_if_changed(layout.acl, acl_text(servers).encode(), private=False) or changed
    if changed:
        reload_broker(layout)
    return changed


def _write_if_changed(path: Path, content: bytes, *, private: bool) -> bool:
    try:
        if path.read_bytes() == content:
            return False
    except OSError:
        pass  # not written yet
    if private:
        write_private(path, content)
    else:
        atomic_write_bytes(path, content)
    return True


def reload_broker(layout: BrokerLayout) -> bool:
    """SIGHUP the broker ``edgefleet broker`` runs for this data directory; False when none runs."""
    try:
        pid = int(layout.pid_file.read_text().strip())
        # a broker killed hard leaves its pid file; that pid may belong to another process by now
        if Path(f"/proc/{pid}/comm").read_text().strip() != "mosquitto":
            return False
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False  # not running (or gone): it reads the files when it starts
    return True


def mosquitto_config(layout: BrokerLayout, settings: BrokerSettings, *, listen_host: str, port: int) -> str:
    # The listener comes first: a listener option before any "listener" line makes Mosquitto open its default
    # listener on 1883 as well.
    lines = [
        "# Written by 'edgefleet broker' from broker.toml; edits are overwritten on its next start",
        f"listener {port} {listen_host}",
    ]
    if settings.tls:
        tls = layout.tls
        lines += [f"cafile {tls.ca_cert}", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}",
                  "tls_version tlsv1.2"]
        if settings.client_certificates:
            lines += ["require_certificate true"]
    lines += [
        "",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {layout.passwords}",
        f"acl_file {layout.acl}",
        "use_username_as_clientid true",
        "persistence true",
        f"persistence_location {layout.persistence}/",
        "autosave_interval 5",
        # Mosquitto's default (1000) silently drops QoS 1 messages for a slow or offline session under load.
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        # Nothing edgefleet sends comes near it (chunks are 256 KiB, a desired state tens of KiB): a client
        # cannot make the broker hold a huge message for every subscriber.
        "max_packet_size 2097152",
        f"pid_file {layout.pid_file}",
        f"log_dest file {layout.log}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if os.geteuid() == 0:  # else Mosquitto switches to user "mosquitto", who cannot read these files
        lines += ["user root"]
    return "\n".join(lines) + "\n"


def write_broker_files(layout: BrokerLayout, settings: BrokerSettings) -> None:
    """broker.toml, the ACL and the server's identity (kept when it exists: init runs again safely)."""
    layout.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(layout.directory, 0o700)
    atomic_write_bytes(layout.settings, settings.to_toml().encode())
    atomic_write_bytes(layout.acl, DEVICE_ACL.encode())
    if not layout.server_secret.exists():
        write_private(layout.server_secret, (new_secret() + "\n").encode())


def server_address(layout: BrokerLayout, url: str | None, username: str = SERVER_USERNAME) -> BrokerAddress:
    """How the server reaches the broker: ``url`` (or this data directory's broker on loopback), as the
    server's identity (``username``: a replica's), pinning the fleet CA for ``mqtts://``."""
    settings = BrokerSettings.load(layout)
    if url is None:
        host = "127.0.0.1" if settings.listen_host in ("0.0.0.0", "::", "127.0.0.1") else settings.listen_host
        url = f"{'mqtts' if settings.tls else 'mqtt'}://{host}:{settings.port}"
    tls = url.startswith("mqtts:")
    files = layout.tls
    return BrokerAddress.parse(
        url, username=username, password=server_password(layout),
        ca_file=str(files.ca_cert) if tls else None,
        cert_file=str(files.server_cert) if tls and settings.client_certificates else None,
        key_file=str(files.server_key) if tls and settings.client_certificates else None,
    )


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``) for ``--listen``; a user error otherwise."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if (not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536
            or not all(c.isalnum() or c in ".-:_" for c in host)):  # it goes into mosquitto.conf as is
        raise UserInputError(f"--listen must look like HOST:PORT, got {value!r}")
    return host, int(port_text)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def setup_broker(
    layout: BrokerLayout, *, hosts: tuple[str, ...] = (), listen: str | None = None, tls: bool | None = None,
    client_certificates: bool | None = None,
) -> tuple[BrokerSettings, bool]:
    """Create (or update with what is given) the data directory's broker: settings, ACL, the server's
    identity, the CA and a server certificate for ``hosts`` (and loopback). Returns the settings and
    whether anything about how devices reach the broker changed."""
    before = BrokerSettings.load(layout) if layout.exists() else None
    settings = before or BrokerSettings()
    changes: dict[str, object] = {}
    if hosts:
        changes["public_host"] = hosts[0]
    if listen is not None:
        changes["listen_host"], changes["port"] = parse_listen(listen)
    if tls is not None:
        changes["tls"] = tls
    if client_certificates is not None:
        changes["client_certificates"] = client_certificates
    settings = replace(settings, **changes)  # type: ignore[arg-type]
    subject_alternative_names([*hosts, settings.public_host])  # a bad host is refused before anything is written
    if settings.client_certificates and not settings.tls:
        raise UserInputError("client certificates need TLS: drop --no-tls or --client-certificates")
    write_broker_files(layout, settings)
    files = layout.tls
    if not files.ca_cert.exists():
        create_ca(files)
    named = server_hosts(files) if files.server_cert.exists() else []
    wanted = list(dict.fromkeys([settings.public_host, *hosts, *named, *LOOPBACK_HOSTS]))
    if not set(wanted) <= set(named):  # a new host: a new certificate naming the old ones too
        create_server_certificate(files, wanted)
    return settings, before is not None and before != settings
