"""The fleet broker's files: what ``edgefleet init`` writes and ``edgefleet broker`` runs (no broker started here;
``tests/attacks/test_broker_attacks.py`` runs the real one)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from server.broker_setup import (
    SERVER_USERNAME,
    BrokerLayout,
    BrokerSettings,
    mosquitto_config,
    parse_listen,
    password_hash,
    reload_broker,
    setup_broker,
    write_identities,
)
from server.tls import certificate_sha256, server_hosts
from shared.errors import UserInputError


@pytest.fixture
def layout(tmp_path: Path) -> BrokerLayout:
    return BrokerLayout(tmp_path / "broker")


def test_a_first_setup_writes_everything_private(layout: BrokerLayout) -> None:
    settings, changed = setup_broker(layout, hosts=("broker.lan", "10.0.0.5"), listen="0.0.0.0:8883")
    assert settings == BrokerSettings(listen_host="0.0.0.0", port=8883, public_host="broker.lan")
    assert not changed  # nothing to compare with
    assert settings.device_url() == "mqtts://broker.lan:8883"
    tls = layout.tls
    for secret in (tls.ca_key, tls.server_key, layout.server_secret):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    assert layout.directory.stat().st_mode & 0o777 == 0o700
    assert set(server_hosts(tls)) == {"broker.lan", "10.0.0.5", "127.0.0.1", "localhost", "::1"}
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)


def test_running_setup_again_keeps_the_ca_and_changes_only_what_is_named(layout: BrokerLayout) -> None:
    setup_broker(layout, hosts=("broker.lan",), listen="0.0.0.0:8883")
    ca = certificate_sha256(layout.tls.ca_cert.read_bytes())
    server_cert = layout.tls.server_cert.read_bytes()
    secret = layout.server_secret.read_text()

    settings, changed = setup_broker(layout)
    assert not changed and settings.public_host == "broker.lan"
    assert layout.tls.server_cert.read_bytes() == server_cert  # no new host: the same certificate

    settings, changed = setup_broker(layout, hosts=("edge.example.net",))
    assert changed and settings.device_url() == "mqtts://edge.example.net:8883"
    assert {"edge.example.net", "broker.lan"} <= set(server_hosts(layout.tls))  # the old name stays valid
    assert certificate_sha256(layout.tls.ca_cert.read_bytes()) == ca  # devices keep trusting it
    assert layout.server_secret.read_text() == secret


def test_client_certificates_need_tls(layout: BrokerLayout) -> None:
    with pytest.raises(UserInputError, match="client certificates need TLS"):
        setup_broker(layout, tls=False, client_certificates=True)


@pytest.mark.parametrize("host", ["", "has space", "a/b", "user@host"])
def test_a_host_that_cannot_be_in_a_certificate_is_a_user_error(layout: BrokerLayout, host: str) -> None:
    with pytest.raises(UserInputError):
        setup_broker(layout, hosts=(host,))
    assert not layout.settings.exists()  # refused before anything was written: the next init starts clean


def test_a_stale_pid_file_never_signals_another_process(layout: BrokerLayout) -> None:
    """A broker killed hard leaves mosquitto.pid; by now that pid may be anyone (here: this test process, which
    a SIGHUP would kill)."""
    setup_broker(layout)
    layout.pid_file.write_text(f"{os.getpid()}\n")
    assert reload_broker(layout) is False
    layout.pid_file.write_text("not a pid\n")
    assert reload_broker(layout) is False


@pytest.mark.parametrize("value", ["8883", "host:", ":8883", "host:0", "host:70000", "host:port", "host\nlistener 1:1"])
def test_a_bad_listen_address_is_a_user_error(value: str) -> None:
    with pytest.raises(UserInputError, match="HOST:PORT"):
        parse_listen(value)


def test_parse_listen_takes_ipv6() -> None:
    assert parse_listen("[::]:8883") == ("::", 8883)


def test_the_listener_comes_first_and_tls_only_when_asked(layout: BrokerLayout) -> None:
    setup_broker(layout)
    with_tls = mosquitto_config(layout, BrokerSettings(client_certificates=True), listen_host="127.0.0.1", port=1)
    lines = with_tls.splitlines()
    assert lines[1] == "listener 1 127.0.0.1"  # before it, a listener option would open a default listener on 1883
    assert f"certfile {layout.tls.server_cert}" in lines and "require_certificate true" in lines
    for needed in ("allow_anonymous false", "use_username_as_clientid true", "max_queued_messages 100000"):
        assert needed in lines
    plain = mosquitto_config(layout, BrokerSettings(tls=False), listen_host="127.0.0.1", port=1)
    assert "cafile" not in plain and "require_certificate" not in plain


def test_the_password_file_is_rewritten_only_when_identities_change(layout: BrokerLayout) -> None:
    setup_broker(layout)
    assert write_identities(layout, [("d-1", password_hash("one"))]) is True
    content = layout.passwords.read_bytes()
    assert layout.passwords.stat().st_mode & 0o777 == 0o600
    assert write_identities(layout, [("d-1", content.decode().splitlines()[1].split(":", 1)[1])]) is False
    assert layout.passwords.read_bytes() == content
    assert write_identities(layout, []) is True
    assert [line.split(":")[0] for line in layout.passwords.read_text().splitlines()] == [SERVER_USERNAME]


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_password_hashes_are_the_ones_mosquitto_passwd_writes(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "cam", "s3cret"], check=True)
    _, entry = passwords.read_text().strip().split(":", 1)
    _, kind, iterations, salt, _ = entry.split("$")
    assert kind == "7" and int(iterations) == 101
    assert password_hash("s3cret", salt=base64.b64decode(salt)) == entry  # PBKDF2-HMAC-SHA512, 101 rounds


def test_init_reports_the_broker_it_set_up_and_a_bad_host_cleanly(tmp_path: Path) -> None:
    from edgefleet.cli import cli as main

    runner = CliRunner()
    result = runner.invoke(main, ["init", "--data-dir", str(tmp_path / "d"), "--release-key", "online", "--broker-host", "10.1.2.3"])
    assert result.exit_code == 0, result.output
    assert "devices connect to mqtts://10.1.2.3:8883" in result.output
    assert "edgefleet broker --data-dir" in result.output
    bad = runner.invoke(main, ["init", "--data-dir", str(tmp_path / "e"), "--release-key", "online", "--broker-host", "a b"])
    assert bad.exit_code == 1 and "not a host name or IP address" in bad.output
    assert "Traceback" not in bad.output
