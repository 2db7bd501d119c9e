"""The fleet's private certificate authority (``cryptography``), made by ``edgefleet init``.

One CA signs the broker's (and the HTTPS API's) server certificate, naming the
hosts and IP addresses devices reach it by, and, for mTLS, each device's client
certificate from a CSR whose key never leaves the device. Agents pin the CA, so
no public CA is involved and nobody else can present a certificate the fleet
trusts. Keys are ECDSA P-256: every TLS stack on a Pi or a Jetson speaks it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import ConfigError, UserInputError
from shared.files import write_private

CA_DAYS = 3650
SERVER_DAYS = 825  # what browsers and most TLS stacks accept for a leaf
CLIENT_DAYS = 825
ORGANISATION = "edgefleet"


@dataclass(frozen=True)
class FleetCertificates:
    """Where a data directory keeps its CA and the server certificate it signed (``DATA_DIR/broker/tls``)."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    def exists(self) -> bool:
        return all(p.exists() for p in (self.ca_cert, self.ca_key, self.server_cert, self.server_key))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses as the certificate lists them; a bad name is the user's error."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:@" for c in host):
                raise UserInputError(f"not a host name or IP address for the certificate: {host!r}") from None
            names.append(x509.DNSName(host))
    return names


def create_ca(files: FleetCertificates, *, name: str = "edgefleet fleet CA") -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    files.directory.mkdir(parents=True, exist_ok=True)
    write_private(files.ca_key, _key_pem(key))
    files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(files: FleetCertificates) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the fleet CA from {files.directory}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{files.ca_key} is not the fleet CA's EC key")
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
    *, days: int, usage: list[x509.ObjectIdentifier], names: list[x509.GeneralName],
) -> x509.Certificate:
    ca_cert, ca_key = ca
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(public_key).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def create_server_certificate(files: FleetCertificates, hosts: list[str]) -> None:
    """The broker's (and HTTPS API's) certificate for ``hosts``, signed by the CA; replaces an earlier one."""
    names = subject_alternative_names(hosts)
    if not names:
        raise UserInputError("the server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(_load_ca(files), _name(hosts[0]), key.public_key(), days=SERVER_DAYS,
                 # client auth too: the server presents it to the broker when client certificates are on
                 usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], names=names)
    write_private(files.server_key, _key_pem(key))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_hosts(files: FleetCertificates) -> list[str]:
    """The host names and addresses the current server certificate names."""
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]


def sign_client_csr(files: FleetCertificates, csr_pem: bytes, common_name: str) -> bytes:
    """A client certificate for ``common_name`` (the device's broker username) over the CSR's key.

    The CSR only proves possession of the key: whatever subject it asks for, the certificate names
    ``common_name``, so a device cannot obtain another's identity by asking for it."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise UserInputError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise UserInputError("the certificate signing request's signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.key_size < 256:
        raise UserInputError("the certificate signing request must carry an EC key of at least 256 bits")
    cert = _leaf(_load_ca(files), _name(common_name), public_key, days=CLIENT_DAYS,
                 usage=[ExtendedKeyUsageOID.CLIENT_AUTH], names=[])
    return cert.public_bytes(serialization.Encoding.PEM)


def certificate_sha256(pem: bytes) -> str:
    """The SHA-256 of a certificate's DER form, hex: what an enrolment token pins."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from exc
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def create_client_certificate(files: FleetCertificates, common_name: str) -> tuple[bytes, bytes]:
    """A key and a client certificate for ``common_name``, both made here: for ``device register``, which
    writes a whole config; enrolment instead signs a CSR so the key never leaves the device."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(_load_ca(files), _name(common_name), key.public_key(), days=CLIENT_DAYS,
                 usage=[ExtendedKeyUsageOID.CLIENT_AUTH], names=[])
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
