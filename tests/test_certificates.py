"""TLS certificates replaced on disk, unusable, or about to expire: over the wire, gRPC and HTTPS."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from tests.certs import Certs, issue_server_certificate, make_certs
from tests.support import RPC_TIMEOUT, SERVING, ServerProcess, Start, http_request

INTERVAL = "0.2"


def presented_serial(port: int, ca: Path) -> int:
    """The serial number of the certificate a new TLS handshake with ``port`` is given."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as connection:
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def tls_server(start_server: Start, certs: Certs, *args: str) -> ServerProcess:
    return start_server("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                        "--check-interval", INTERVAL, "--http-address", "127.0.0.1:0", *args)


def secure_channel(server: ServerProcess, certs: Certs) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    return grpc.secure_channel(server.address, credentials, options=(("grpc.ssl_target_name_override", "localhost"),
                                                                     ("grpc.use_local_subchannel_pool", 1)))


def check(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=RPC_TIMEOUT).status)


def test_a_certificate_replaced_on_disk_is_served_to_new_connections_without_a_restart(
    start_server: Start, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    server = tls_server(start_server, certs)
    grpc_port, http_port = port_of(server.address), port_of(server.http_url)
    old = presented_serial(grpc_port, certs.ca)
    kept = secure_channel(server, certs)
    assert check(kept) == SERVING

    new = issue_server_certificate(certs, certs.server_cert, certs.server_key)
    server.stdout.wait_for(f"TLS certificate reloaded: serial {new:x}")

    assert presented_serial(grpc_port, certs.ca) == new  # gRPC, on a new connection
    assert presented_serial(http_port, certs.ca) == new  # HTTPS too
    assert old != new
    assert check(kept) == SERVING  # the connection made before keeps working
    with secure_channel(server, certs) as fresh:
        assert check(fresh) == SERVING
    kept.close()


def test_unusable_files_keep_the_previous_certificate_in_use_and_are_logged(
    start_server: Start, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    server = tls_server(start_server, certs)
    serial = presented_serial(port_of(server.address), certs.ca)

    certs.server_cert.write_text("not a certificate\n")
    server.stdout.wait_for("the TLS files changed but cannot be used, still serving the previous certificate "
                           f"\\(serial {serial:x}\\): --tls-cert .* is not a PEM certificate file")

    assert presented_serial(port_of(server.address), certs.ca) == serial
    assert presented_serial(port_of(server.http_url), certs.ca) == serial
    with secure_channel(server, certs) as channel:
        assert check(channel) == SERVING


def test_a_certificate_near_its_expiry_is_warned_of_and_degrades_the_smoke_test_only(
    start_server: Start, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path)
    issue_server_certificate(certs, certs.server_cert, certs.server_key, days=3)
    server = tls_server(start_server, certs, "--tls-expiry-warning", "7", "--metrics")

    server.stdout.wait_for(r"the TLS certificate \(serial \w+\) expires in 3\.0 days, at ")
    with secure_channel(server, certs) as channel:
        assert check(channel) == SERVING  # readiness does not follow it
        answer = smoke_pb2_grpc.SmokeTestServiceStub(channel).SmokeTest(smoke_pb2.SmokeTestRequest(),
                                                                          timeout=RPC_TIMEOUT)
    assert answer.status == smoke_pb2.STATUS_DEGRADED
    [certificate] = [c for c in answer.checks if c.name == "tls_certificate"]
    assert certificate.status == smoke_pb2.STATUS_FAILING and "expires in 3.0 days" in certificate.detail
    metrics = http_request(server.http_url + "/metrics", context=ssl.create_default_context(cafile=str(certs.ca)))
    expiry = next(line for line in metrics.text.splitlines()
                  if line.startswith("petsage_tls_certificate_expiry_timestamp_seconds "))
    assert abs(float(expiry.split()[1]) - (time.time() + 3 * 86400)) < 3600


def test_an_expired_certificate_is_logged_at_start(start_server: Start, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    issue_server_certificate(certs, certs.server_cert, certs.server_key, days=-1)
    server = tls_server(start_server, certs)

    server.stdout.wait_for(r"the TLS certificate \(serial \w+\) expired at ")
    server.stdout.wait_for(r"check tls_certificate is failing: \(serial \w+\) expired at ")


def _plaintext_client(port: int) -> None:
    """One connection that speaks HTTP/2 in clear to a TLS port, until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(9))
        while raw.recv(4096):
            pass


def test_failed_handshakes_reach_the_log_pipeline_as_json_bounded_and_counted(
        start_server: Start, tmp_path: Path) -> None:
    """grpc core printed one raw stderr line per failed handshake: not JSON, not in --log-file, not counted."""
    certs = make_certs(tmp_path)
    log = tmp_path / "server.log"
    server = tls_server(start_server, certs, "--tls-client-ca", str(certs.ca), "--log-format", "json",
                        "--log-file", str(log), "--metrics")
    plaintext = 25
    for _ in range(plaintext):
        _plaintext_client(port_of(server.address))
    no_certificate = secure_channel(server, certs)  # mTLS: the server wants a certificate this client lacks
    try:
        check(no_certificate)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    no_certificate.close()
    context = ssl.create_default_context(cafile=str(certs.ca))
    deadline = time.monotonic() + RPC_TIMEOUT
    while True:  # the lines are read back on a thread of the server's: wait until all are counted
        metrics = http_request(server.http_url + "/metrics", context=context).text
        if f'petsage_tls_handshake_failures_total{{reason="WRONG_VERSION_NUMBER"}} {plaintext}.0' in metrics:
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    assert 'petsage_tls_handshake_failures_total{reason="PEER_DID_NOT_RETURN_A_CERTIFICATE"}' in metrics
    server.signal()
    assert server.wait() == 0

    assert server.stderr.text() == ""  # nothing bypasses the pipeline
    for text in (server.stdout.text(), log.read_text()):
        records = [json.loads(line) for line in text.splitlines()]  # every line is JSON
        grpc_records = [r for r in records if r["logger"] == "grpc"]
        plaintext_records = [r for r in grpc_records if "WRONG_VERSION_NUMBER" in r["message"]]
        # Logged once, then counted: the flood of 25 is two records, whatever its size.
        assert len(plaintext_records) == 2, plaintext_records
        first, summary = plaintext_records
        assert (first["level"], first["tls_reason"]) == ("INFO", "WRONG_VERSION_NUMBER")
        assert first["source"].startswith("ssl_transport_security.cc:")
        assert "plaintext to this TLS port" in first["message"]
        assert summary["message"].startswith(f"repeated {plaintext - 1} more time(s) before exit: Handshake failed")
        assert any(r.get("tls_reason") == "PEER_DID_NOT_RETURN_A_CERTIFICATE" for r in grpc_records)
