"""Client certificates (mTLS): ``edgefleet init --client-certificates``, then ``edgefleet broker``.

Every client must present a certificate signed by the fleet CA on top of its password: a device's config from
``device register`` carries one (key made on the server) and works; the same password without the certificate,
or with a certificate from another CA, gets no TLS session at all; the server connects with its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import load_config
from server.broker_setup import BrokerLayout, server_address
from shared.mqtt import BrokerAddress
from tests.attacks.test_broker_attacks import Client
from tests.e2e.fleet import cli
from tests.fleet_broker import FleetBroker

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetBroker, BrokerAddress]]:
    root = tmp_path_factory.mktemp("mtls")
    data_dir = root / "server"
    broker = FleetBroker(data_dir)
    cli("init", "--data-dir", str(data_dir), "--release-key", "online", "--broker-host", "127.0.0.1", "--broker-listen", broker.listen,
        "--client-certificates")
    broker.start()
    try:
        config = root / "cam" / "agent.toml"
        cli("device", "register", "cam", "--profile", "x86-64", "--data-dir", str(data_dir), "--out", str(config))
        yield broker, load_config(config).broker_address()
    finally:
        broker.stop()


def connect(address: BrokerAddress, client_id: str) -> Client:
    return Client(address, client_id).connect()


def test_a_device_with_its_certificate_connects(mtls: tuple[FleetBroker, BrokerAddress]) -> None:
    _, address = mtls
    assert address.cert_file and address.key_file
    assert Path(address.key_file).stat().st_mode & 0o777 == 0o600
    client = connect(address, "cam")
    try:
        assert client.connack == ["Success"]
    finally:
        client.close()


def test_the_server_connects_with_its_own_certificate(mtls: tuple[FleetBroker, BrokerAddress]) -> None:
    broker, _ = mtls
    address = server_address(BrokerLayout(broker.data_dir / "broker"), broker.url)
    assert address.cert_file
    client = connect(address, "edgefleet-server")
    try:
        assert client.connack == ["Success"]
    finally:
        client.close()


def test_the_right_password_without_a_certificate_gets_no_session(
    mtls: tuple[FleetBroker, BrokerAddress],
) -> None:
    _, address = mtls
    client = connect(replace(address, cert_file=None, key_file=None), "cam")
    try:
        assert client.connack == [] and not client.connected.is_set()
    finally:
        client.close()


def test_a_certificate_from_another_ca_gets_no_session(
    mtls: tuple[FleetBroker, BrokerAddress], tmp_path: Path
) -> None:
    _, address = mtls
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address.username or "cam")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "self.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "self-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    forged = replace(address, cert_file=str(tmp_path / "self.pem"), key_file=str(tmp_path / "self-key.pem"))
    client = connect(forged, "cam")
    try:
        assert client.connack == [] and not client.connected.is_set()
    finally:
        client.close()
