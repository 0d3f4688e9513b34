"""Loading TLS material (PEM files) into gRPC credentials, for servers and clients.

Every file is read and checked here, before any socket is opened, so a bad
file stops the program with one line naming the setting, the file and the
reason (:class:`TLSError`)::

    cannot read --tls-cert '/x.pem': No such file or directory
    --tls-key '/k.pem' does not match --tls-cert '/c.pem'

grpc itself would only fail later, at the first handshake, with a log line
from its C core and a generic connection error.  The checks use the standard
library's :mod:`ssl` (the same OpenSSL rules), so they need no extra package.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

_CERTIFICATE_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"
_HOST_PORT = re.compile(r"^(?:dns:(?:///)?)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^\s:\[\]/]+)):(?P<port>\d{1,5})$")
#: Pause between attempts to fetch the server's certificate.
_RETRY_PAUSE = 0.1


class TLSError(ValueError):
    """A TLS file cannot be used; the message names the setting, the file and why."""


def _read(label: str, path: str) -> bytes:
    """The bytes of ``path``, or a :class:`TLSError` saying why they cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise TLSError(f"cannot read {label} {path!r}: {exc.strerror or exc}") from None


def load_certificates(label: str, path: str) -> bytes:
    """The PEM certificates in ``path``, checked to parse (a chain or a CA bundle); ``label`` names the setting."""
    data = _read(label, path)
    if _CERTIFICATE_MARK not in data:
        raise TLSError(f"{label} {path!r} is not a PEM certificate file (no BEGIN CERTIFICATE block)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError) as exc:
        raise TLSError(f"{label} {path!r} is not a valid PEM certificate file: {_reason(exc)}") from None
    return data


def _key_pair(cert_label: str, cert_path: str, key_label: str, key_path: str) -> tuple[bytes, bytes]:
    """The certificate chain and private key, checked to be PEM and to belong together."""
    chain = load_certificates(cert_label, cert_path)
    key = _read(key_label, key_path)
    if _KEY_MARK not in key:
        raise TLSError(f"{key_label} {key_path!r} is not a PEM private key (no BEGIN PRIVATE KEY block)")
    if b"ENCRYPTED" in key:
        raise TLSError(f"{key_label} {key_path!r} is encrypted; give an unencrypted private key")
    try:
        # OpenSSL compares the key with the first certificate of the chain.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TLSError(f"{key_label} {key_path!r} does not match {cert_label} {cert_path!r}") from None
        raise TLSError(f"{key_label} {key_path!r} is not a valid PEM private key: {_reason(exc)}") from None
    except OSError as exc:  # the file changed between the two reads
        raise TLSError(f"cannot read {key_label} {key_path!r}: {exc.strerror or exc}") from None
    return chain, key


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not ASCII text"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc)


def load_key_pair(cert: str, key: str) -> tuple[bytes, bytes]:
    """The PEM certificate chain and key of ``--tls-cert`` and ``--tls-key``, checked to belong together."""
    return _key_pair("--tls-cert", cert, "--tls-key", key)


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """Server credentials from PEM files; with ``client_ca``, clients must present a certificate it signed.

    ``cert`` is the server's certificate chain (leaf first), ``key`` its
    unencrypted private key.  Raises :class:`TLSError` naming the flag
    (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``) and the file.
    """
    import grpc

    chain, private_key = _key_pair("--tls-cert", cert, "--tls-key", key)
    roots = None if client_ca is None else load_certificates("--tls-client-ca", client_ca)
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


@dataclass(frozen=True)
class ClientTLS:
    """How a client speaks TLS: whom it trusts, who it is, and the name it expects.

    ``ca_cert``: PEM file of the certificates that may sign the server's
    certificate (default: grpc's bundled public roots).  ``client_cert`` and
    ``client_key``: the client's own certificate chain and key, for servers
    that require mTLS; both or neither.  ``server_name``: the name the
    server's certificate must carry, when it differs from the address's host.
    """

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            given, missing = ("client_cert", "client_key") if self.client_key is None else ("client_key", "client_cert")
            raise TLSError(f"{given} given without {missing}")

    def credentials(self, names: Mapping[str, str] | None = None) -> grpc.ChannelCredentials:
        """Load the files into channel credentials; :class:`TLSError` if one is unusable.

        ``names`` maps a field (``"ca_cert"``) to the name errors should use
        for it, e.g. the command-line flag ``-tls-ca-cert``.
        """
        label = self._labels(names)
        roots = None if self.ca_cert is None else load_certificates(label["ca_cert"], self.ca_cert)
        return self._credentials(roots, label)

    def _labels(self, names: Mapping[str, str] | None) -> dict[str, str]:
        return {field.name: field.name for field in fields(self)} | dict(names or {})

    def _identity(self, label: Mapping[str, str]) -> tuple[bytes | None, bytes | None]:
        """The client's certificate chain and key, or ``(None, None)`` without mTLS."""
        if self.client_cert is None or self.client_key is None:
            return None, None
        return _key_pair(label["client_cert"], self.client_cert, label["client_key"], self.client_key)

    def _credentials(self, roots: bytes | None, label: Mapping[str, str]) -> grpc.ChannelCredentials:
        import grpc

        chain, key = self._identity(label)
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)

    def ssl_context(self, names: Mapping[str, str] | None = None, *, verify: bool = True) -> ssl.SSLContext:
        """The standard library's client context for these files (checked first, as :meth:`credentials` does).

        Without ``verify``, any certificate the server presents is accepted
        (INSECURE, as grpc_health_probe's ``-tls-no-verify``).  The server's
        name is the caller's to pass to the handshake.
        """
        label = self._labels(names)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self.ca_cert is not None:
            context.load_verify_locations(cadata=load_certificates(label["ca_cert"], self.ca_cert).decode("ascii"))
        else:
            context.load_default_certs()
        self._identity(label)  # checked: readable, PEM, the key matching the certificate
        if self.client_cert is not None and self.client_key is not None:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options that go with the credentials (the expected server name)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def trust_presented_certificate(
    address: str, timeout: float, tls: ClientTLS, names: Mapping[str, str] | None = None
) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    """Credentials trusting exactly the certificate the server at ``address`` presents now (INSECURE).

    grpc cannot skip certificate verification, so this fetches the server's
    certificate with the standard library, then trusts it as a root and
    expects a name it carries.  A certificate outside its validity period is
    still refused.  Raises :class:`TimeoutError` if no TLS handshake succeeds
    within ``timeout`` seconds, :class:`TLSError` for an address that is not
    ``HOST:PORT`` or an unusable client certificate.
    """
    match = _HOST_PORT.match(address)
    if match is None:
        raise TLSError(f"cannot skip verification for {address!r}: expected a HOST:PORT address")
    host, port = match["v6"] or match["host"], int(match["port"])
    chain, key = tls._identity(tls._labels(names))  # bad client files fail before any connection
    deadline = time.monotonic() + timeout
    while True:
        try:
            leaf = _presented_certificate(host, port, deadline - time.monotonic())
            name = _certificate_name(host, port, leaf, deadline - time.monotonic())
            break
        except (OSError, ValueError) as exc:  # refused, reset, handshake failed, or time is up
            if time.monotonic() + _RETRY_PAUSE >= deadline:
                raise TimeoutError(str(exc)) from None
            time.sleep(_RETRY_PAUSE)
    import grpc

    root = ssl.DER_cert_to_PEM_cert(leaf).encode("ascii")
    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)
    return credentials, [("grpc.ssl_target_name_override", name)]


def _handshake(host: str, port: int, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    if timeout <= 0:
        raise TimeoutError("no time left")
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise


def _presented_certificate(host: str, port: int, timeout: float) -> bytes:
    """The DER certificate the server presents, unverified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with _handshake(host, port, context, timeout) as connection:
        leaf = connection.getpeercert(binary_form=True)
    if leaf is None:
        raise ValueError("the server presented no certificate")
    return leaf


def _certificate_name(host: str, port: int, leaf: bytes, timeout: float) -> str:
    """A name ``leaf`` is valid for; the standard library decodes a certificate only once it is trusted."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf is its own trust anchor
    context.load_verify_locations(cadata=leaf)
    with _handshake(host, port, context, timeout) as connection:
        decoded: dict[str, Any] = dict(connection.getpeercert() or {})
    alternatives = [value for kind, value in decoded.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    common = [value for rdn in decoded.get("subject", ()) for key, value in rdn if key == "commonName"]
    for name in (*alternatives, *common):
        return str(name).replace("*", "x", 1)  # any name a wildcard covers will do
    raise ValueError("the server's certificate names no host")
