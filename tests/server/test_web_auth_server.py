"""API authentication on real sockets: an ``edgefleet server`` process listening beyond loopback, the
``WebServer`` on loopback with and without ``--auth``, and HTTPS with a CA-signed certificate."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.api_tokens import Scope, create_token
from server.broker import free_port
from server.setup import Workspace, init_data_dir
from server.web import WebServer
from server.web.server import TlsFiles
from shared.errors import ConfigError
from tests.server.test_cli_errors import assert_ok, assert_user_error, run

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
ACTOR = "operator test@host"


def request(port: int, method: str, path: str, token: str | None = None,
            context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:port (redirects are not followed)."""
    connection: http.client.HTTPConnection = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context) if context
        else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    try:
        connection.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    assert "api-token" in assert_ok(run("init", "--data-dir", root, "--release-key", "online"))
    return root


@contextmanager
def server_process(data_dir: Path, broker_url: str, *args: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "--log-level", "debug", "server", "--data-dir", str(data_dir),
         "--broker", broker_url, "--http", f"0.0.0.0:{port}", *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if request(port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /healthz"
            time.sleep(0.1)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_server_beyond_loopback_refuses_without_a_token_and_answers_with_one(data_dir: Path,
                                                                                mosquitto: object) -> None:
    admin = (data_dir / "api-token").read_text().strip()
    with server_process(data_dir, mosquitto.url) as (port, proc):  # type: ignore[attr-defined]
        status, headers, body = request(port, "GET", "/api/v1/devices")
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert json.loads(body)["type"] == "urn:edgefleet:problem:unauthorized"
        assert request(port, "GET", "/api/v1/devices", "eft_000000000000_" + "A" * 43)[0] == 401
        status, _, body = request(port, "GET", "/api/v1/devices", admin)
        assert status == 200 and json.loads(body) == []
        status, headers, _ = request(port, "GET", "/")
        assert status == 303 and headers["location"] == "/login?next=/"
        assert request(port, "GET", "/", admin)[0] == 200
        assert request(port, "GET", "/openapi.json")[0] == 401 and request(port, "GET", "/openapi.json", admin)[0] == 200
        assert request(port, "GET", "/metrics")[0] == 401 and request(port, "GET", "/metrics", admin)[0] == 200
        assert request(port, "POST", "/api/v1/rollouts/r-unknown/pause", admin)[0] == 404
        # a token created while the server runs works at once; its revocation too
        reader = assert_ok(run("token", "create", "reader", "--scope", "read", "--data-dir", data_dir)).strip()
        assert request(port, "GET", "/api/v1/rollouts", reader)[0] == 200
        assert request(port, "POST", "/api/v1/rollouts/r-unknown/pause", reader)[0] == 403
        assert_ok(run("token", "revoke", "reader", "--data-dir", data_dir))
        assert request(port, "GET", "/api/v1/rollouts", reader)[0] == 401
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert f"dashboard http://0.0.0.0:{port}/ (API token needed" in output
    assert "GET /api/v1/devices" in output  # the access log is on at debug level ...
    assert admin not in output and admin.split("_", 2)[2] not in output and reader.split("_", 2)[2] not in output
    assert "Traceback" not in output


def test_no_auth_beyond_loopback_is_refused(data_dir: Path) -> None:
    result = run("server", "--data-dir", data_dir, "--http", "0.0.0.0:0", "--no-auth")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "refusing to serve the API and dashboard on 0.0.0.0 without authentication" in result.stderr
    result = run("server", "--data-dir", data_dir, "--http", "127.0.0.1:0", "--http-cert", "cert.pem")
    assert result.exit_code == 2 and "--http-cert and --http-key go together" in result.stderr
    result = run("server", "--data-dir", data_dir, "--http", "off", "--auth")
    assert result.exit_code == 2 and "need --http HOST:PORT" in result.stderr


# -- WebServer on loopback ---------------------------------------------------------------------------------


@pytest.fixture
def workspace_with_tokens(tmp_path: Path) -> Iterator[tuple[Workspace, str, str]]:
    workspace = init_data_dir(tmp_path / "data")
    read = create_token(workspace.db, "viewer", Scope.READ, actor=ACTOR).token
    metrics = create_token(workspace.db, "prom", Scope.METRICS, actor=ACTOR).token
    yield workspace, read, metrics
    workspace.db.close()


@contextmanager
def serving(web: WebServer) -> Iterator[WebServer]:
    web.start()
    try:
        yield web
    finally:
        web.stop()


def test_loopback_without_auth_stays_open(workspace_with_tokens: tuple[Workspace, str, str]) -> None:
    workspace, _, _ = workspace_with_tokens
    with serving(WebServer(workspace.db, "127.0.0.1", 0)) as web:
        assert not web.auth_required and web.url.startswith("http://127.0.0.1:")
        for path in ("/api/v1/devices", "/", "/metrics", "/openapi.json", "/healthz"):
            assert request(web.port, "GET", path)[0] == 200, path
        assert request(web.port, "POST", "/api/v1/rollouts/r-unknown/pause")[0] == 401  # writes never open


def test_auth_forces_tokens_on_loopback(workspace_with_tokens: tuple[Workspace, str, str]) -> None:
    workspace, read, metrics = workspace_with_tokens
    with serving(WebServer(workspace.db, "127.0.0.1", 0, auth=True)) as web:
        assert web.auth_required
        assert request(web.port, "GET", "/api/v1/devices")[0] == 401
        assert request(web.port, "GET", "/api/v1/devices", read)[0] == 200
        assert request(web.port, "GET", "/metrics", read)[0] == 403
        assert request(web.port, "GET", "/metrics", metrics)[0] == 200
        assert request(web.port, "GET", "/healthz")[0] == 200


# -- HTTPS ------------------------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 it signed: (ca.pem, server.pem, server.key)."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("edgefleet server")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def test_https_serves_the_api_with_the_given_certificate(tmp_path: Path,
                                                         workspace_with_tokens: tuple[Workspace, str, str]) -> None:
    workspace, read, _ = workspace_with_tokens
    ca, cert, key = write_ca_and_server_cert(tmp_path)
    trusting = ssl.create_default_context(cafile=str(ca))
    with serving(WebServer(workspace.db, "127.0.0.1", 0, auth=True, tls=TlsFiles(cert, key))) as web:
        assert web.url == f"https://127.0.0.1:{web.port}/"
        assert request(web.port, "GET", "/api/v1/devices", context=trusting)[0] == 401
        status, _, body = request(web.port, "GET", "/api/v1/devices", read, context=trusting)
        assert status == 200 and json.loads(body) == []
        # the login cookie is Secure over TLS
        connection = http.client.HTTPSConnection("127.0.0.1", web.port, timeout=10, context=trusting)
        try:
            connection.request("POST", "/login", body=f"token={read}&next=/",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
            response = connection.getresponse()
            cookie = response.getheader("set-cookie") or ""
            assert response.status == 303 and "Secure" in cookie and "HttpOnly" in cookie
        finally:
            connection.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the CA
            request(web.port, "GET", "/healthz", context=ssl.create_default_context())
        # TLS 1.2 at least (read from the server's context: this machine's OpenSSL would not offer 1.1 anyway)
        assert web._server.config.ssl.minimum_version is ssl.TLSVersion.TLSv1_2


def test_a_bad_certificate_or_key_is_a_clear_error(tmp_path: Path, data_dir: Path) -> None:
    _, cert, key = write_ca_and_server_cert(tmp_path)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    workspace = init_data_dir(data_dir)
    try:
        for bad_cert, bad_key in ((tmp_path / "missing.pem", key), (cert, other_key), (key, cert)):
            with pytest.raises(ConfigError, match="cannot serve HTTPS with --http-cert"):
                WebServer(workspace.db, "127.0.0.1", 0, tls=TlsFiles(bad_cert, bad_key))
    finally:
        workspace.db.close()
    assert_user_error(run("server", "--data-dir", data_dir, "--http", "127.0.0.1:0", "--http-cert", cert,
                          "--http-key", other_key), "cannot serve HTTPS")
