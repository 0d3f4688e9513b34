"""TLS and mTLS: PEM files checked with one clear line each, and real handshakes with serve, probe, smoke and Client."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from petsage_grpc.client import Client, ClientError, ClientTLS, ServingStatus
from petsage_grpc.tls import TLSError, server_credentials
from tests.certs import SERVER_NAME, Certs, make_certs
from tests.support import ServerProcess, Start, run_cli


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_missing_file_names_the_flag_the_file_and_the_reason(tmp_path: Path, certs: Certs) -> None:
    missing = tmp_path / "x.pem"

    with pytest.raises(TLSError) as raised:
        server_credentials(str(missing), str(certs.server_key), None)

    assert str(raised.value) == f"cannot read --tls-cert '{missing}': No such file or directory"


@pytest.mark.parametrize(("cert", "key", "client_ca", "message"), [
    ("server_key", "server_key", None,
     "--tls-cert '{server_key}' is not a PEM certificate file (no BEGIN CERTIFICATE block)"),
    ("server_cert", "server_cert", None,
     "--tls-key '{server_cert}' is not a PEM private key (no BEGIN PRIVATE KEY block)"),
    ("server_cert", "other_key", None, "--tls-key '{other_key}' does not match --tls-cert '{server_cert}'"),
    ("server_cert", "server_key", "client_key", "--tls-client-ca '{client_key}' is not a PEM certificate file "
                                                "(no BEGIN CERTIFICATE block)"),
])
def test_unusable_files_are_one_clear_line(certs: Certs, cert: str, key: str, client_ca: str | None,
                                           message: str) -> None:
    paths = {name: str(getattr(certs, name)) for name in ("server_cert", "server_key", "other_key", "client_key")}

    with pytest.raises(TLSError) as raised:
        server_credentials(paths[cert], paths[key], None if client_ca is None else paths[client_ca])

    assert str(raised.value) == message.format(**paths)


def test_damaged_certificate_and_directory_are_refused(tmp_path: Path, certs: Certs) -> None:
    damaged = tmp_path / "damaged.pem"
    damaged.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")

    with pytest.raises(TLSError) as damaged_raised:
        server_credentials(str(damaged), str(certs.server_key), None)
    assert str(damaged_raised.value).startswith(f"--tls-cert '{damaged}' is not a valid PEM certificate file: ")
    with pytest.raises(TLSError) as raised:
        server_credentials(str(certs.server_cert), str(certs.server_key), str(tmp_path))
    assert str(raised.value) == f"cannot read --tls-client-ca '{tmp_path}': Is a directory"


def test_encrypted_key_is_refused(tmp_path: Path, certs: Certs) -> None:
    key = serialization.load_pem_private_key(certs.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))

    with pytest.raises(TLSError) as raised:
        server_credentials(str(certs.server_cert), str(encrypted), None)

    assert str(raised.value) == f"--tls-key '{encrypted}' is encrypted; give an unencrypted private key"


def test_client_settings_are_checked_before_any_connection(tmp_path: Path, certs: Certs) -> None:
    with pytest.raises(TLSError) as unpaired:
        ClientTLS(client_cert=str(certs.client_cert))
    assert str(unpaired.value) == "client_cert given without client_key"
    with pytest.raises(TLSError) as raised:
        Client("localhost:1", tls=ClientTLS(ca_cert=str(tmp_path / "ca.pem")))
    assert str(raised.value) == f"cannot read ca_cert '{tmp_path / 'ca.pem'}': No such file or directory"


@pytest.mark.parametrize(("key", "message"), [
    ("missing", "cannot read --tls-key '{missing}': No such file or directory"),
    ("other_key", "--tls-key '{other_key}' does not match --tls-cert '{server_cert}'"),
])
def test_serve_refuses_bad_files_before_binding(tmp_path: Path, certs: Certs, key: str, message: str) -> None:
    paths = {"missing": str(tmp_path / "missing.key"), "other_key": str(certs.other_key),
             "server_cert": str(certs.server_cert)}

    done = run_cli("serve", "--address", "127.0.0.1:0", "--tls-cert", paths["server_cert"], "--tls-key", paths[key])

    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.endswith(message.format(**paths))
    assert "serving on" not in done.stdout


def tls_server(start_server: Start, certs: Certs, *, mtls: bool = False) -> ServerProcess:
    client_ca = ["--tls-client-ca", str(certs.ca)] if mtls else []
    return start_server("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), *client_ca)


def probe(server: ServerProcess, *args: str) -> tuple[int, list[str]]:
    done = run_cli("probe", "-addr", server.address, "-connect-timeout", "500ms", *args)
    return done.returncode, done.stderr.splitlines()


def test_right_ca_succeeds_for_client_probe_and_smoke(start_server: Start, certs: Certs) -> None:
    server = tls_server(start_server, certs)

    with Client(server.address, tls=ClientTLS(ca_cert=str(certs.ca))) as client:
        assert client.check("readiness") is ServingStatus.SERVING
        assert client.smoke().ok
    assert probe(server, "-tls", "-tls-ca-cert", str(certs.ca)) == (0, ["status: SERVING"])
    assert probe(server, "-tls", "-tls-ca-cert", str(certs.ca), "-tls-server-name", SERVER_NAME) == (
        0, ["status: SERVING"])
    assert probe(server, "-tls", "-tls-no-verify") == (0, ["status: SERVING"])
    smoke = run_cli("smoke", "--address", server.address, "-tls", "-tls-ca-cert", str(certs.ca))
    assert (smoke.returncode, smoke.stderr) == (0, "")


def test_plaintext_client_is_refused_by_a_tls_server(start_server: Start, certs: Certs) -> None:
    server = tls_server(start_server, certs)
    refused = [f'timeout: failed to connect service "{server.address}" within 500ms']

    with Client(server.address) as client, pytest.raises(ClientError) as raised:
        client.check(timeout=2)

    assert raised.value.code is grpc.StatusCode.UNAVAILABLE
    assert probe(server) == (2, refused)


def test_wrong_ca_or_name_is_refused_with_only_the_probe_line(start_server: Start, certs: Certs) -> None:
    server = tls_server(start_server, certs)
    refused = [f'timeout: failed to connect service "{server.address}" within 500ms']

    with Client(server.address, tls=ClientTLS(ca_cert=str(certs.other_ca))) as client, \
            pytest.raises(ClientError) as raised:
        client.check(timeout=2)

    assert raised.value.code is grpc.StatusCode.UNAVAILABLE
    assert probe(server, "-tls", "-tls-ca-cert", str(certs.other_ca)) == (2, refused)
    assert probe(server, "-tls", "-tls-ca-cert", str(certs.ca), "-tls-server-name", "wrong.test") == (2, refused)
    smoke = run_cli("smoke", "--address", server.address, "--connect-timeout", "0.5", "-tls",
                    "-tls-ca-cert", str(certs.other_ca))
    # At once, with the reason: the handshake failed.
    [line] = smoke.stderr.splitlines()
    assert smoke.returncode == 2 and line.startswith(f"petsage-grpc smoke: cannot connect to {server.address}: ")
    assert "CERTIFICATE_VERIFY_FAILED" in line


def test_mtls_requires_a_client_certificate(start_server: Start, certs: Certs) -> None:
    server = tls_server(start_server, certs, mtls=True)
    without = ClientTLS(ca_cert=str(certs.ca))
    with_cert = ClientTLS(ca_cert=str(certs.ca), client_cert=str(certs.client_cert), client_key=str(certs.client_key))
    identity = ["-tls-client-cert", str(certs.client_cert), "-tls-client-key", str(certs.client_key)]

    with Client(server.address, tls=without) as anonymous, pytest.raises(ClientError) as raised:
        anonymous.check(timeout=2)
    with Client(server.address, tls=with_cert) as client:
        status = client.check("readiness")

    assert raised.value.code is grpc.StatusCode.UNAVAILABLE
    assert status is ServingStatus.SERVING
    assert probe(server, "-tls", "-tls-ca-cert", str(certs.ca))[0] == 2
    assert probe(server, "-tls", "-tls-ca-cert", str(certs.ca), *identity) == (0, ["status: SERVING"])
    smoke = run_cli("smoke", "--address", server.address, "-tls", "-tls-ca-cert", str(certs.ca), *identity)
    assert smoke.returncode == 0, smoke.stderr


def test_probe_reports_unusable_tls_files_as_bad_arguments(start_server: Start, tmp_path: Path, certs: Certs) -> None:
    server = tls_server(start_server, certs)

    assert probe(server, "-tls", "-tls-ca-cert", str(tmp_path / "ca.pem")) == (
        1, [f"error: cannot read -tls-ca-cert '{tmp_path / 'ca.pem'}': No such file or directory"])
    assert probe(server, "-tls", "-tls-client-cert", str(certs.client_cert), "-tls-client-key",
                 str(certs.other_key)) == (
        1, [f"error: -tls-client-key '{certs.other_key}' does not match -tls-client-cert '{certs.client_cert}'"])
