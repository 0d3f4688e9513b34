"""Throwaway TLS material made at run time: a CA, a server and a client certificate it signed, and a stranger CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: The name the server certificate carries besides localhost and 127.0.0.1.
SERVER_NAME = "petsage.test"


@dataclass(frozen=True)
class Certs:
    """Paths of PEM files in one directory."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here
    other_key: Path  # a key that belongs to no certificate here
    ca_key: Path  # the CA's own key, to issue more server certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
                 *, ca: bool, names: list[x509.GeneralName] | None = None, days: float = 30) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # An expired certificate (days < 0) was valid for a day before it expired.
        .not_valid_before(min(now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days - 1)))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, certificate: x509.Certificate | None = None,
           key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    if certificate is not None:
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


def make_certs(directory: Path) -> Certs:
    """Write a fresh set of certificates and keys into ``directory``."""
    ca_key, server_key, client_key, other_key = _key(), _key(), _key(), _key()
    ca = _certificate("PetSage test CA", ca_key, "PetSage test CA", ca_key, ca=True)
    server_names: list[x509.GeneralName] = [
        x509.DNSName(SERVER_NAME), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = _certificate("server", server_key, "PetSage test CA", ca_key, ca=False, names=server_names)
    client = _certificate("client", client_key, "PetSage test CA", ca_key, ca=False)
    other_ca = _certificate("stranger CA", other_key, "stranger CA", other_key, ca=True)
    return Certs(
        ca=_write(directory / "ca.pem", ca),
        server_cert=_write(directory / "server.pem", server),
        server_key=_write(directory / "server.key", key=server_key),
        client_cert=_write(directory / "client.pem", client),
        client_key=_write(directory / "client.key", key=client_key),
        other_ca=_write(directory / "other-ca.pem", other_ca),
        other_key=_write(directory / "other.key", key=other_key),
        ca_key=_write(directory / "ca.key", key=ca_key),
    )


def issue_server_certificate(certs: Certs, cert_path: Path, key_path: Path, *, days: float = 30) -> int:
    """Write a new server certificate (and key) signed by ``certs``' CA, valid ``days``; return its serial."""
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    server_key = _key()
    names: list[x509.GeneralName] = [
        x509.DNSName(SERVER_NAME), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = _certificate("server", server_key, "PetSage test CA", ca_key, ca=False, names=names, days=days)
    _write(key_path, key=server_key)
    _write(cert_path, server)
    return server.serial_number
