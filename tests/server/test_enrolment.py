"""Enrolment over real HTTPS: the server's web app with the fleet certificate, the agent's ``enrol``.

A token works once, expires, names the CA (a server with another CA gets
nothing, not even the token), and a used, expired, unknown or removed
device's token gets nothing either. Two devices racing with one token: one
wins. The device's key never leaves it; its certificate names its id.
"""

from __future__ import annotations

import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.config import load_config
from agent.enrol import CERT_FILE, CONFIG_FILE, KEY_FILE, enrol
from server.broker_setup import BrokerLayout, setup_broker
from server.db.models import Device, EnrolmentToken
from server.devices import register_device, remove_device
from server.enrolment import Enrolment, create_token
from server.setup import Workspace, init_data_dir
from server.web import WebServer
from server.web.server import TlsFiles
from shared.enrolment import EnrolmentToken as TokenText
from shared.errors import TransportError, UserInputError


@dataclass
class Site:
    workspace: Workspace
    layout: BrokerLayout
    web: WebServer

    @property
    def url(self) -> str:
        return self.web.url.rstrip("/")

    def token(self, name: str, **options: float) -> str:
        with self.workspace.db.reading() as session:
            device = session.query(Device).filter_by(name=name, removed_at=None).one()
            device_id = device.id
        return create_token(self.workspace.db, self.layout, device_id, actor="test", **options)[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("enrol")
    workspace = init_data_dir(root / "server")
    layout = BrokerLayout(workspace.data_dir.broker)
    setup_broker(layout, hosts=("127.0.0.1",), listen="127.0.0.1:18883")
    tls = layout.tls
    web = WebServer(workspace.db, "127.0.0.1", 0, enrolment=Enrolment(workspace.db, layout, workspace.data_dir.keys),
                    tls=TlsFiles(tls.server_cert, tls.server_key)).start()
    try:
        yield Site(workspace, layout, web)
    finally:
        web.stop()


def registered(site: Site, name: str) -> str:
    register_device(site.workspace.db, name, "rpi4", actor="test")
    return site.token(name)


def test_a_token_enrols_the_device_once_and_its_config_works(site: Site, tmp_path: Path) -> None:
    token = registered(site, "cam-1")
    config_path = enrol(site.url, token, tmp_path / "cam-1")
    assert config_path == tmp_path / "cam-1" / CONFIG_FILE
    assert config_path.stat().st_mode & 0o777 == 0o600 and (tmp_path / "cam-1" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    config = load_config(config_path)
    address = config.broker_address()
    assert config.device.name == "cam-1" and config.device.profile == "rpi4"
    assert address.url() == "mqtts://127.0.0.1:18883" and address.username == config.device.id and address.password
    assert address.ca_file == str(tmp_path / "cam-1" / "ca.pem")
    assert str(site.workspace.data_dir.root) not in config_path.read_text()  # no server-side path
    # the client certificate names the device, over the key made on the device
    cert = x509.load_pem_x509_certificate((tmp_path / "cam-1" / CERT_FILE).read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == config.device.id
    # the broker's password file now holds the device's identity
    assert f"{config.device.id}:$7$" in site.layout.passwords.read_text()

    with pytest.raises(TransportError, match=r"already used.*\(HTTP 403\)"):
        enrol(site.url, token, tmp_path / "thief")
    assert not (tmp_path / "thief" / CONFIG_FILE).exists()


def test_an_expired_token_gets_nothing(site: Site, tmp_path: Path) -> None:
    register_device(site.workspace.db, "cam-2", "rpi4", actor="test")
    token = site.token("cam-2", ttl_s=0.001)
    with pytest.raises(TransportError, match=r"expired at .*\(HTTP 403\)"):
        enrol(site.url, token, tmp_path / "cam-2")


def test_an_unknown_or_forged_token_gets_nothing(site: Site, tmp_path: Path) -> None:
    real = TokenText.parse(registered(site, "cam-3"))
    for forged in (TokenText(real.token_id, "x" * 32, real.ca_sha256), TokenText("0123456789ab", real.secret,
                                                                                  real.ca_sha256)):
        with pytest.raises(TransportError, match=r"unknown enrolment token \(HTTP 403\)"):
            enrol(site.url, forged.text(), tmp_path / "cam-3")
    enrol(site.url, real.text(), tmp_path / "cam-3", serve_listen="127.0.0.1:0")  # the real one still works


def test_a_token_naming_another_ca_is_not_even_sent(site: Site, tmp_path: Path) -> None:
    real = TokenText.parse(registered(site, "cam-4"))
    impostor = TokenText(real.token_id, real.secret, "00" * 32)
    with pytest.raises(TransportError, match="not the one the token names"):
        enrol(site.url, impostor.text(), tmp_path / "cam-4")
    with site.workspace.db.reading() as session:
        assert session.get(EnrolmentToken, real.token_id).used_at is None  # the server never saw the token


def test_a_second_certificate_slipped_in_beside_the_ca_is_refused(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone in between serves the real CA (whose hash matches) followed by their own: trusting the whole
    bundle would let their certificate pass for the server's. The agent refuses it before sending the token."""
    import agent.enrol
    from server.tls import FleetCertificates, create_ca

    token = TokenText.parse(registered(site, "cam-10"))
    attacker = FleetCertificates(tmp_path / "attacker")
    create_ca(attacker, name="attacker CA")
    real_get = agent.enrol._get

    def in_between(url: str, context: ssl.SSLContext, data: bytes | None = None) -> bytes:
        served = real_get(url, context, data)
        return served + attacker.ca_cert.read_bytes() if url.endswith("/enrol/ca.pem") else served

    monkeypatch.setattr(agent.enrol, "_get", in_between)
    with pytest.raises(TransportError, match="sent 2 certificates as the fleet CA"):
        enrol(site.url, token.text(), tmp_path / "cam-10")
    with site.workspace.db.reading() as session:
        assert session.get(EnrolmentToken, token.token_id).used_at is None  # the token never left the device


def test_a_removed_devices_token_gets_nothing(site: Site, tmp_path: Path) -> None:
    token = registered(site, "cam-5")
    remove_device(site.workspace.db, "cam-5", actor="test")
    with pytest.raises(TransportError, match=r"has been removed \(HTTP 403\)"):
        enrol(site.url, token, tmp_path / "cam-5")


def test_two_devices_racing_with_one_token_one_wins(site: Site, tmp_path: Path) -> None:
    token = registered(site, "cam-6")
    outcomes: list[str] = []

    def attempt(i: int) -> None:
        try:
            enrol(site.url, token, tmp_path / f"racer-{i}")
            outcomes.append("enrolled")
        except TransportError as exc:
            outcomes.append(str(exc))

    racers = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert outcomes.count("enrolled") == 1, outcomes
    assert all("already used" in outcome for outcome in outcomes if outcome != "enrolled"), outcomes


def test_a_plain_http_server_address_and_a_malformed_token_are_user_errors(site: Site, tmp_path: Path) -> None:
    token = registered(site, "cam-7")
    with pytest.raises(UserInputError, match="https://"):
        enrol(site.url.replace("https://", "http://"), token, tmp_path / "cam-7")
    with pytest.raises(UserInputError, match="not an enrolment token"):
        enrol(site.url, "efe1.nope", tmp_path / "cam-7")


def test_a_malformed_request_is_a_400_and_uses_no_token(site: Site) -> None:
    token = TokenText.parse(registered(site, "cam-8"))
    context = ssl.create_default_context(cafile=str(site.layout.tls.ca_cert))
    for body in (b"not json", json.dumps({"v": 1, "token": token.text(), "csr": "not a csr"}).encode(),
                 json.dumps({"v": 1, "token": token.text(), "extra": 1}).encode(), b"x" * 20000, b"[" * 16000):
        request = urllib.request.Request(site.url + "/enrol", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, context=context, timeout=10)
        with caught.value as refused:
            assert refused.code == 400
            assert refused.headers["Content-Type"] == "application/problem+json"
    with site.workspace.db.reading() as session:
        assert session.get(EnrolmentToken, token.token_id).used_at is None


def test_tokens_are_stored_only_as_hashes(site: Site) -> None:
    token = TokenText.parse(registered(site, "cam-9"))
    with site.workspace.db.reading() as session:
        row = session.get(EnrolmentToken, token.token_id)
        assert token.secret not in (row.token_sha256 or "")
        assert row.expires_at.replace(tzinfo=timezone.utc) > datetime.now(timezone.utc)
    assert token.secret not in (site.workspace.data_dir.database.read_bytes().decode("latin-1"))
