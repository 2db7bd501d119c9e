"""``edgefleet agent enrol``: turn a one-time token into this device's agent.toml.

1. Fetch the fleet CA from the server without trusting the connection, and keep
   it only if its SHA-256 is the one in the token (someone in between would
   have to forge a certificate whose hash the operator handed over out of band).
2. Make this device's key (it never leaves the device) and a CSR for it.
3. Over TLS verified by that CA: redeem the token, get the broker identity, the
   fleet's signed root of trust (checked against its own root keys) and a
   client certificate.
4. Write agent.toml (0600), the CA, root.json, the key (0600) and the
   certificate into the data directory, each atomically, the config last: a
   crash leaves either no config (enrol again with a new token) or a whole one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared import PROTOCOL_VERSION
from shared.agent_toml import AgentToml, BrokerIdentity
from shared.codec import decode, encode
from shared.enrolment import CA_PATH, ENROL_PATH, EnrolmentRequest, EnrolmentResponse, EnrolmentToken
from shared.errors import ConfigError, ProtocolError, TransportError, TrustError, UserInputError
from shared.files import atomic_write_bytes, write_private
from shared.root import root_from_json
from shared.serve_address import DEFAULT_SERVE_LISTEN

logger = logging.getLogger(__name__)

CONFIG_FILE = "agent.toml"
CA_FILE = "ca.pem"
KEY_FILE = "client-key.pem"
CERT_FILE = "client-cert.pem"
ROOT_FILE = "root.json"
TIMEOUT_S = 30.0
MAX_RESPONSE_BYTES = 256 * 1024


def _server_url(server: str) -> str:
    parts = urlsplit(server)
    if parts.scheme != "https" or not parts.hostname:
        raise UserInputError(f"--server must be the server's https:// address (the token travels to it), got "
                             f"{server!r}")
    return f"https://{parts.netloc}"


def _get(url: str, context: ssl.SSLContext, data: bytes | None = None) -> bytes:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as response:
            body: bytes = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        with exc:  # it holds the connection
            raise TransportError(f"the server refused: {_problem(exc)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise TransportError(f"cannot reach {url}: {reason}") from exc
    if len(body) > MAX_RESPONSE_BYTES:
        raise TransportError(f"{url} answered more than {MAX_RESPONSE_BYTES} bytes")
    return body


def _problem(exc: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(exc.read(8192)).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return f"{detail or exc.reason} (HTTP {exc.code})"


def fetch_pinned_ca(server: str, token: EnrolmentToken) -> bytes:
    """The fleet CA, if its SHA-256 (of the DER form) is the one the token names."""
    blind = ssl.create_default_context()
    blind.check_hostname, blind.verify_mode = False, ssl.CERT_NONE  # nothing is trusted until the hash matches
    try:
        certificates = x509.load_pem_x509_certificates(_get(server + CA_PATH, blind))
    except ValueError as exc:
        raise TransportError(f"{server} sent something that is not a certificate as the fleet CA") from exc
    # Exactly one: everything in what we keep is trusted from now on, and only the hashed one may be.
    if len(certificates) != 1:
        raise TransportError(f"{server} sent {len(certificates)} certificates as the fleet CA, not one: refusing "
                             "to enrol (someone in between?)")
    der = certificates[0].public_bytes(serialization.Encoding.DER)
    if hashlib.sha256(der).hexdigest() != token.ca_sha256:
        raise TransportError(f"the CA certificate {server} sent is not the one the token names: refusing to "
                             "enrol (a wrong --server, or someone in between)")
    return certificates[0].public_bytes(serialization.Encoding.PEM)  # rebuilt from the hashed bytes alone


def _key_and_csr(device_hint: str) -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_hint)]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def enrol(server: str, token_text: str, data_dir: Path, *, serve_listen: str = DEFAULT_SERVE_LISTEN) -> Path:
    """Enrol this device; returns the path of the agent.toml written."""
    token = EnrolmentToken.parse(token_text)
    base = _server_url(server)
    config_path = data_dir / CONFIG_FILE
    if config_path.exists():
        raise UserInputError(f"{config_path} already exists: this device is enrolled (remove the directory to enrol "
                             "it again, with a new token)")
    ca_pem = fetch_pinned_ca(base, token)
    verified = ssl.create_default_context(cadata=ca_pem.decode())
    key_pem, csr = _key_and_csr(f"enrolling-{token.token_id}")
    body = json.dumps(encode(EnrolmentRequest(v=PROTOCOL_VERSION, token=token.text(), csr=csr))).encode()
    answer = _get(base + ENROL_PATH, verified, body)
    try:
        granted = decode(EnrolmentResponse, json.loads(answer))
    except (ValueError, ProtocolError) as exc:
        raise TransportError(f"the server's enrolment answer is malformed: {exc}") from exc
    try:
        answered = [c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(
            granted.ca_pem.encode())]
    except ValueError:
        answered = []
    if answered != [ca_pem]:
        raise TransportError("the server answered with another CA than the one the token names")
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    atomic_write_bytes(data_dir / CA_FILE, ca_pem)
    broker = BrokerIdentity(granted.broker_url, username=granted.username, password=granted.password,
                            ca_file=CA_FILE if granted.broker_url.startswith("mqtts:") else "")
    if granted.cert_pem:
        write_private(data_dir / KEY_FILE, key_pem)
        atomic_write_bytes(data_dir / CERT_FILE, granted.cert_pem.encode())
        broker = BrokerIdentity(broker.url, broker.username, broker.password, broker.ca_file, CERT_FILE, KEY_FILE)
    try:
        root_from_json(granted.root.encode())  # signed by its own root keys, or nothing is written
    except (ProtocolError, TrustError) as exc:
        raise TransportError(f"the server's root of trust does not verify: {exc}") from exc
    write_private(data_dir / ROOT_FILE, granted.root.encode())
    text = AgentToml(
        device_id=granted.device_id, name=granted.name, profile=granted.profile, broker=broker,
        data_dir=str(data_dir / "data"), root_file=ROOT_FILE, serve_listen=serve_listen,
    ).render()
    write_private(config_path, text.encode())
    logger.info("enrolled as %s (%s), profile %s; broker %s", granted.name, granted.device_id, granted.profile,
                granted.broker_url)
    try:
        from agent.config import load_config

        load_config(config_path)  # what was written is what the agent will read
    except ConfigError as exc:
        raise ConfigError(f"enrolled, but the config written does not load: {exc}") from exc
    return config_path
