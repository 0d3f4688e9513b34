"""The server's TLS certificate: loaded once, reloaded when its files change, watched for expiry.

gRPC uses grpcio's dynamic server credentials: grpc asks
:meth:`ServerCertificate.fetch` at each new handshake, which hands over the
newest good certificate once.  The HTTP listener's ``ssl`` context gets the
same certificate.  The non-critical ``tls_certificate`` check looks at the
files every check interval: changed files that are usable replace the pair
in use (connections already open keep theirs; new handshakes get the new
one), unusable ones are logged once and the previous pair stays in use.  The
check fails (SmokeTest DEGRADED, readiness stays SERVING) while the
certificate expires within ``warning_days``, and its expiry is a metric.

Reading a certificate's dates takes the ``cryptography`` package, imported
here only, so a plaintext server never pays for it.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc

from petsage_grpc import tls
from petsage_grpc.health.checks import Check, CheckFailed

_LOGGER = logging.getLogger(__package__)
#: The check's name.
CERTIFICATE_CHECK = "tls_certificate"


@dataclass(frozen=True)
class _Pair:
    """One loaded certificate chain with its key and client CA, and what the leaf says of itself."""

    chain: bytes
    key: bytes
    roots: bytes | None
    not_after: datetime
    serial: int


def _stamp(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced or rewritten: its inode, size and modification time."""
    stamps = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


class ServerCertificate:
    """The certificate, key and client CA of ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``.

    Raises :class:`~petsage_grpc.tls.TLSError` naming an unusable file when
    created (so the server stops before it binds); later failures are logged.
    """

    def __init__(self, cert: str, key: str, client_ca: str | None, warning_days: float) -> None:
        self._paths = (cert, key) + (() if client_ca is None else (client_ca,))
        self._client_ca = client_ca
        self._warning = timedelta(days=warning_days)
        self._lock = threading.Lock()  # grpc fetches on its own threads; the check runs on another
        self._stamp = _stamp(self._paths)
        self.pair = self._load()
        self._generation = 1
        self._fetched = 1
        self._contexts: list[ssl.SSLContext] = []
        left = self.pair.not_after - datetime.now(UTC)
        if left < self._warning:
            _LOGGER.warning("the TLS certificate %s", self._expiry_text(left))

    def _load(self) -> _Pair:
        from cryptography import x509

        cert, key = self._paths[:2]
        chain, private_key = tls.load_key_pair(cert, key)
        roots = None if self._client_ca is None else tls.load_certificates("--tls-client-ca", self._client_ca)
        leaf = x509.load_pem_x509_certificate(chain)
        return _Pair(chain, private_key, roots, leaf.not_valid_after_utc, leaf.serial_number)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.pair.key, self.pair.chain)], self.pair.roots)

    def credentials(self) -> grpc.ServerCredentials:
        """GRPC server credentials that pick up every reload (client certificates required with a client CA)."""
        return grpc.dynamic_ssl_server_credentials(self._configuration(), self.fetch,
                                                   require_client_authentication=self._client_ca is not None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """For grpc, at a new handshake: the newest certificate once, then None (keep it)."""
        with self._lock:
            if self._fetched == self._generation:
                return None
            self._fetched = self._generation
            return self._configuration()

    def ssl_context(self) -> ssl.SSLContext:
        """An ``ssl`` server context for the HTTP side, kept up to date with every reload.

        It asks no client certificate, even with a client CA: the kubelet,
        load balancers and uptime checkers that call the HTTP side present none.
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.set_alpn_protocols(["http/1.1"])
        self._contexts.append(context)
        self._install(context)
        return context

    def _install(self, context: ssl.SSLContext) -> None:
        cert, key = self._paths[:2]
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:  # replaced again since it was checked: keep the previous pair
            _LOGGER.warning("the HTTP side keeps its previous TLS certificate: %s", exc)

    def reload(self) -> bool:
        """Load the files again if they changed; True when a new pair is in use."""
        stamp = _stamp(self._paths)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            pair = self._load()
        except tls.TLSError as exc:
            _LOGGER.warning("the TLS files changed but cannot be used, still serving the previous certificate "
                            "(serial %x): %s", self.pair.serial, exc)
            return False
        with self._lock:
            self.pair = pair
            self._generation += 1
        for context in self._contexts:
            self._install(context)
        _LOGGER.info("TLS certificate reloaded: serial %x, valid until %s", pair.serial,
                     pair.not_after.isoformat().replace("+00:00", "Z"))
        return True

    def _expiry_text(self, left: timedelta) -> str:
        until = self.pair.not_after.isoformat().replace("+00:00", "Z")
        if left <= timedelta(0):
            return f"(serial {self.pair.serial:x}) expired at {until}"
        return f"(serial {self.pair.serial:x}) expires in {left.total_seconds() / 86400:.1f} days, at {until}"

    def check(self, interval: float) -> Check:
        """The non-critical ``tls_certificate`` check: reload on change, fail within the warning window."""

        def look() -> str:
            self.reload()
            left = self.pair.not_after - datetime.now(UTC)
            if left < self._warning:
                raise CheckFailed(self._expiry_text(left))
            return self._expiry_text(left)

        return Check(CERTIFICATE_CHECK, look, interval=interval, timeout=5.0, critical=False)
