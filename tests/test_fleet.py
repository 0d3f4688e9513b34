"""``petsage-grpc fleet`` over the wire: real servers on loopback addresses behind a real DNS server (dnsmasq).

The servers share one port on 127.0.0.2, 127.0.0.3, ... and [::1] (every
127.x address is loopback on Linux), as pods share a container port, so one
``NAME:PORT`` reaches them all.  The last part tests the pure logic in this
process: target forms, flag order, exit-code precedence, the bound on
concurrency, and the JSON and JUnit renderings.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import xmlschema
import yaml  # type: ignore[import-untyped, unused-ignore]  # PyYAML ships no types
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc.cli import output
from petsage_grpc.cli.fleet import checks, report, results, summary, targets
from petsage_grpc.cli.fleet.main import build_parser, split_arguments
from petsage_grpc.codes import ExitCode
from tests.certs import SERVER_NAME, make_certs
from tests.support import NOT_SERVING, PROCESS_TIMEOUT, ROOT, RPC_TIMEOUT, ServerProcess, Start, run_cli
from tests.support.deploy import container, load_manifests, resource
from tests.support.dns import DnsServer, start_dns
from tests.test_deploy import KUBERNETES_VERSIONS

SCHEMA = ROOT / "tests" / "data" / "junit-10.xsd"
#: What every healthy instance's SmokeTest says.
OK_MESSAGE = "PetSage services are running and logging is active."
#: The loopback address of each role in the tests (the healthy ones, 127.0.0.2, .3 and [::1], are started once).
HEALTHY, FULL_DISK, DRAINING, NOTHING = "127.0.0.2", "127.0.0.4", "127.0.0.5", "127.0.0.6"
STRICT, PROXY, NEWER = "127.0.0.7", "127.0.0.8", "127.0.0.9"
#: A server whose SmokeTest reports another version: the same server, its version changed before it starts.
NEWER_VERSION = "0.2.0-next"
NEWER_COMMAND = (sys.executable, "-c", f"import sys, petsage_grpc; petsage_grpc.__version__ = {NEWER_VERSION!r}; "
                                       "from petsage_grpc.cli import main; sys.exit(main(['serve', *sys.argv[1:]]))")


def fleet(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_cli("fleet", *args, timeout=timeout)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@dataclass
class Pool:
    """The module's healthy servers: two on IPv4 and one on [::1], all on ``port``."""

    port: int
    servers: list[ServerProcess]

    def at(self, host: str) -> str:
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    servers: list[ServerProcess] = []
    try:
        servers.append(ServerProcess(address=f"{HEALTHY}:0"))
        port = port_of(servers[0].address)
        # The port the first one got is free on every other loopback address: nothing else binds them.
        servers.append(ServerProcess(address=f"127.0.0.3:{port}"))
        servers.append(ServerProcess(address=f"[::1]:{port}"))
        yield Pool(port, servers)
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def dns_server() -> Iterator[Callable[..., DnsServer]]:
    """Start dnsmasq with the given records; every one is stopped (by its PID) after the test."""
    started: list[DnsServer] = []

    def start(**records: Any) -> DnsServer:
        server = start_dns(**records)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def nothing_listens(pool: Pool) -> Iterator[str]:
    """``NOTHING:port``, bound but never listening: connections are refused, and no one else can take it."""
    with socket.socket() as unused:
        unused.bind((NOTHING, pool.port))
        yield pool.at(NOTHING)


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(done.stdout)
    assert_shape(document)
    return document


def by_address(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {instance["address"]: instance for instance in document["instances"]}


# --- the JSON document, as the README documents it -------------------------------------------------------

OPTIONAL_STR = (str, type(None))
OPTIONAL_FLOAT = (float, type(None))
TARGET_KEYS = {"target": str, "kind": str, "instances": list, "problem": OPTIONAL_STR, "error": OPTIONAL_STR}
INSTANCE_KEYS = {
    "address": str, "host": str, "port": int, "targets": list, "outcome": str, "error": OPTIONAL_STR, "attempts": int,
    "connect_seconds": OPTIONAL_FLOAT, "latency_seconds": OPTIONAL_FLOAT, "elapsed_seconds": float,
    "instance_id": OPTIONAL_STR, "version": OPTIONAL_STR, "health": list, "smoke": (dict, type(None)),
}
HEALTH_KEYS = {"service": str, "status": OPTIONAL_STR, "code": OPTIONAL_STR, "error": OPTIONAL_STR,
               "rpc_seconds": OPTIONAL_FLOAT}
SMOKE_KEYS = {"status": OPTIONAL_STR, "message": OPTIONAL_STR, "code": OPTIONAL_STR, "error": OPTIONAL_STR,
              "rpc_seconds": OPTIONAL_FLOAT, "failing_checks": list}
FAILING_CHECK_KEYS = {"name": str, "status": str, "detail": str, "critical": bool}
SUMMARY_KEYS = {"instances": int, "serving": int, "not_serving": int, "rpc_failed": int, "unreachable": int,
                "reached": int, "min_instances": int, "versions": dict, "exit_code": int, "elapsed_seconds": float}


def assert_keys(value: Any, keys: dict[str, Any], where: str) -> None:
    assert isinstance(value, dict) and set(value) == set(keys), (where, value)
    for key, kind in keys.items():
        assert isinstance(value[key], kind), (where, key, value[key])


def assert_shape(document: dict[str, Any]) -> None:
    """Every key of the documented shape, and nothing else, with its documented type."""
    assert set(document) == {"targets", "instances", "summary"}
    for target in document["targets"]:
        assert_keys(target, TARGET_KEYS, "target")
        assert target["kind"] in ("dns", "srv", "address")
        assert target["problem"] in (None, "no_instances", "dns_failed", "too_many")
    for instance in document["instances"]:
        assert_keys(instance, INSTANCE_KEYS, "instance")
        assert instance["outcome"] in ("serving", "not_serving", "rpc_failed", "unreachable")
        for reply in instance["health"]:
            assert_keys(reply, HEALTH_KEYS, "health")
        if instance["smoke"] is not None:
            assert_keys(instance["smoke"], SMOKE_KEYS, "smoke")
            for check in instance["smoke"]["failing_checks"]:
                assert_keys(check, FAILING_CHECK_KEYS, "failing check")
    assert_keys(document["summary"], SUMMARY_KEYS, "summary")
    assert all(isinstance(k, str) and isinstance(n, int) for k, n in document["summary"]["versions"].items())


def junit_cases(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The JUnit file, validated against the schema CI systems read: the suite, and its test cases by name."""
    schema = xmlschema.XMLSchema(SCHEMA)
    schema.validate(path)
    suite: dict[str, Any] = schema.to_dict(path)  # type: ignore[assignment]  # a dict for an element
    cases = {}
    for case in suite.get("testcase", []):
        outcomes = {key: value for key, value in case.items() if key in ("failure", "error")}
        assert all(len(value) == 1 for value in outcomes.values()), case  # one failure or error, at most
        cases[case["@name"]] = case | {key: value[0] for key, value in outcomes.items()}
    return suite, cases


# --- over the wire: real servers, real DNS ---------------------------------------------------------------


def test_every_instance_behind_a_name_passes_with_a_row_each(pool: Pool, dns_server: Callable[..., DnsServer]) -> None:
    dns = dns_server(hosts={"api.fleet.test": [HEALTHY, "127.0.0.3", "::1"]})

    done = fleet(f"api.fleet.test:{pool.port}", "--smoke", "--dns-server", dns.address)

    assert (done.returncode, done.stderr) == (0, "")
    header, *rows, blank, last = done.stdout.splitlines()
    assert header.split() == ["ADDRESS", "INSTANCE", "VERSION", '""', "SMOKE", "LATENCY", "RESULT"]
    assert sorted(row.split()[0] for row in rows) == sorted(pool.at(h) for h in (HEALTHY, "127.0.0.3", "::1"))
    assert all(row.split()[2:5] == ["0.1.0", "SERVING", "STATUS_OK"] and row.endswith("SERVING") for row in rows)
    assert len({row.split()[1] for row in rows}) == 3  # three processes, three instance ids
    assert (blank, last) == ("", "3 instances: 3 SERVING, 0 NOT_SERVING, 0 RPC failed, 0 unreachable")


def test_srv_records_give_hosts_and_ports_and_each_instance_is_checked_once(
        pool: Pool, dns_server: Callable[..., DnsServer]) -> None:
    dns = dns_server(hosts={"s2.fleet.test": [HEALTHY], "s3.fleet.test": ["127.0.0.3", "::1"]},
                     srv={"_grpc._tcp.api.fleet.test": [("s2.fleet.test", pool.port), ("s3.fleet.test", pool.port)]})

    done = fleet("srv:_grpc._tcp.api.fleet.test", f"s2.fleet.test:{pool.port},{pool.at(HEALTHY)}", "--json",
                 "--dns-server", dns.address, "-service", "readiness", "-service", "liveness")

    assert (done.returncode, done.stderr) == (0, "")
    document = as_json(done)
    instances = by_address(document)
    assert sorted(instances) == sorted(pool.at(h) for h in (HEALTHY, "127.0.0.3", "::1"))
    assert instances[pool.at(HEALTHY)]["targets"] == [
        "srv:_grpc._tcp.api.fleet.test", f"s2.fleet.test:{pool.port}", pool.at(HEALTHY)]
    assert [target["kind"] for target in document["targets"]] == ["srv", "dns", "address"]
    for instance in instances.values():
        assert [(r["service"], r["status"]) for r in instance["health"]] == [
            ("readiness", "SERVING"), ("liveness", "SERVING")]
        assert (instance["outcome"], instance["attempts"], instance["smoke"]) == ("serving", 1, None)
    assert document["summary"] | {"elapsed_seconds": 0.0} == {
        "instances": 3, "serving": 3, "not_serving": 0, "rpc_failed": 0, "unreachable": 0, "reached": 3,
        "min_instances": 0, "versions": {}, "exit_code": 0, "elapsed_seconds": 0.0}


def test_a_mixed_fleet_reports_each_instance_and_exits_with_the_earliest_failure(
        pool: Pool, start_server: Start, nothing_listens: str, dns_server: Callable[..., DnsServer],
        tmp_path: Path) -> None:
    """Healthy, a full disk (its SmokeTest fails), and nothing listening: exit 2, which outranks 4."""
    full = start_server("--log-file", "/dev/full", address=pool.at(FULL_DISK))
    dns = dns_server(hosts={"api.fleet.test": [HEALTHY, FULL_DISK, NOTHING]})
    junit = tmp_path / "fleet.xml"

    done = fleet(f"api.fleet.test:{pool.port}", "--smoke", "--json", "--junit", str(junit), "--dns-server",
                 dns.address, "--retries", "2", "-connect-timeout", "2s")

    assert done.returncode == ExitCode.CONNECTION
    instances = by_address(as_json(done))
    healthy, disk, nothing = instances[pool.at(HEALTHY)], instances[full.address], instances[nothing_listens]
    assert (healthy["outcome"], healthy["smoke"]["status"], healthy["smoke"]["message"]) == (
        "serving", "STATUS_OK", OK_MESSAGE)
    assert (disk["outcome"], disk["health"][0]["status"], disk["smoke"]["status"]) == (
        "not_serving", "NOT_SERVING", "STATUS_FAILING")
    [failing] = disk["smoke"]["failing_checks"]
    assert (failing["name"], failing["critical"]) == ("logging", True)
    assert "No space left on device" in failing["detail"]
    # Refused three times (two retries), and nothing asked of it.
    assert (nothing["outcome"], nothing["attempts"], nothing["health"], nothing["smoke"]) == (
        "unreachable", 3, [], None)
    assert "Connection refused" in nothing["error"]
    assert done.stderr.splitlines() == [
        f'petsage-grpc fleet: {full.address}: health "": NOT_SERVING; '
        "SmokeTest STATUS_FAILING: PetSage services are failing: logging.",
        f"petsage-grpc fleet: {nothing_listens}: unreachable after 3 attempt(s): {nothing['error']}",
    ]
    suite, cases = junit_cases(junit)
    assert (suite["@tests"], suite["@failures"], suite["@errors"]) == ("7", "2", "2")
    assert set(cases) == {f"resolve api.fleet.test:{pool.port}", *(
        f'{address} {check}' for address in instances for check in ('health ""', "SmokeTest"))}
    assert cases[f"{full.address} SmokeTest"]["failure"]["@type"] == "STATUS_FAILING"
    assert cases[f'{nothing_listens} health ""']["error"]["@type"] == "unreachable"
    assert "failure" not in cases[f"{pool.at(HEALTHY)} SmokeTest"]


class FlakyProxy:
    """A TCP proxy on ``host`` to ``upstream`` that closes its first connection at once and forwards the others."""

    def __init__(self, host: str, upstream: str) -> None:
        self.upstream = (upstream.rsplit(":", 1)[0], port_of(upstream))
        self.listener = socket.create_server((host, 0))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.accepted = 0
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            self.accepted += 1
            if self.accepted == 1:
                client.close()  # before the HTTP/2 handshake: the client sees the connection fail
                continue
            server = socket.create_connection(self.upstream, timeout=RPC_TIMEOUT)
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()


def test_a_connection_dropped_once_is_retried_and_the_instance_passes(pool: Pool) -> None:
    """One lost connection (a dropped SYN, a reset) must not fail a rollout."""
    with FlakyProxy(PROXY, pool.at(HEALTHY)) as proxy:
        done = fleet(proxy.address, "--json", "--retries", "1")

    assert (done.returncode, done.stderr) == (0, "")
    [instance] = as_json(done)["instances"]
    assert (instance["outcome"], instance["attempts"], instance["error"]) == ("serving", 2, None)
    assert proxy.accepted == 2


def test_a_draining_instance_is_not_serving_at_once_and_never_retried(
        pool: Pool, start_server: Start) -> None:
    draining = start_server("--drain", "60", address=pool.at(DRAINING))
    draining.signal(signal.SIGTERM)
    draining.wait_for_health("readiness", NOT_SERVING)

    done = fleet(pool.at(HEALTHY), draining.address, "-service", "readiness", "-service", "liveness", "--smoke",
                 "--json")

    assert done.returncode == ExitCode.UNHEALTHY
    instance = by_address(as_json(done))[draining.address]
    assert (instance["outcome"], instance["attempts"]) == ("not_serving", 1)
    assert [(r["service"], r["status"]) for r in instance["health"]] == [
        ("readiness", "NOT_SERVING"), ("liveness", "SERVING")]  # liveness stays SERVING while draining
    assert instance["smoke"]["status"] == "STATUS_FAILING"
    assert [check["name"] for check in instance["smoke"]["failing_checks"]] == ["shutdown"]


def test_unavailable_unless_serving_is_a_failed_call_never_retried_and_list_still_tells(
        pool: Pool, start_server: Start) -> None:
    """With the opt-in for load balancers, Check answers UNAVAILABLE: the server answered, so no retry."""
    strict = start_server("--drain", "60", "--unavailable-unless-serving", address=pool.at(STRICT))
    strict.signal(signal.SIGTERM)
    strict.wait_for_health("readiness", NOT_SERVING)

    checked = fleet(strict.address, "-service", "readiness", "--json", "--retries", "3")
    listed = fleet(strict.address, "--all", "--json")

    assert checked.returncode == ExitCode.RPC_FAILED
    [instance] = as_json(checked)["instances"]
    assert (instance["outcome"], instance["attempts"]) == ("rpc_failed", 1)
    assert instance["health"] == [{"service": "readiness", "status": None, "code": "Unavailable", "rpc_seconds":
                                   instance["health"][0]["rpc_seconds"],
                                   "error": "Unavailable: service 'readiness' is NOT_SERVING"}]
    assert listed.returncode == ExitCode.UNHEALTHY
    [instance] = as_json(listed)["instances"]
    assert {r["service"]: r["status"] for r in instance["health"]} == {
        "": "NOT_SERVING", "liveness": "SERVING", "petsage.smoke.v1.SmokeTestService": "NOT_SERVING",
        "readiness": "NOT_SERVING"}


def test_instances_on_different_versions_warn_of_a_rollout_in_progress(pool: Pool, start_server: Start) -> None:
    newer = start_server(address=pool.at(NEWER), command=NEWER_COMMAND)

    done = fleet(pool.at(HEALTHY), newer.address, "--smoke")

    assert done.returncode == 0  # a warning, not a failure: a rollout may rightly be under way
    assert done.stderr.splitlines() == [
        f"petsage-grpc fleet: warning: instances answer with different versions (0.1.0 on 1, {NEWER_VERSION} on 1): "
        "a rollout may still be in progress"]
    assert {line.split()[0]: line.split()[2] for line in done.stdout.splitlines()[1:3]} == {
        pool.at(HEALTHY): "0.1.0", newer.address: NEWER_VERSION}


@pytest.mark.parametrize(("target", "reason"), [
    ("missing.fleet.test:50051", "no such name in DNS: missing.fleet.test"),
    ("empty.fleet.test:50051", "empty.fleet.test has no A or AAAA records"),
    ("srv:_grpc._tcp.missing.fleet.test", "no such name in DNS: _grpc._tcp.missing.fleet.test"),
])
def test_a_name_that_resolves_to_nothing_is_one_line_and_exit_5(
        dns_server: Callable[..., DnsServer], target: str, reason: str) -> None:
    dns = dns_server(txt=["empty.fleet.test"])

    done = fleet(target, "--dns-server", dns.address, "--json")

    assert (done.returncode, done.stderr.splitlines()) == (
        ExitCode.NO_INSTANCES, [f"petsage-grpc fleet: {target}: {reason}"])
    document = as_json(done)
    assert document["targets"] == [{"target": target, "kind": "srv" if target.startswith("srv:") else "dns",
                                    "instances": [], "problem": "no_instances", "error": f"{target}: {reason}"}]
    assert document["instances"] == []


def test_one_empty_name_fails_the_run_though_another_passes(
        pool: Pool, dns_server: Callable[..., DnsServer]) -> None:
    dns = dns_server(hosts={"api.fleet.test": [HEALTHY]})

    done = fleet(f"api.fleet.test:{pool.port}", "typo.fleet.test:1", "--dns-server", dns.address)

    assert done.returncode == ExitCode.NO_INSTANCES
    assert done.stderr.splitlines() == ["petsage-grpc fleet: typo.fleet.test:1: no such name in DNS: typo.fleet.test"]
    assert done.stdout.splitlines()[-1] == "1 instance: 1 SERVING, 0 NOT_SERVING, 0 RPC failed, 0 unreachable"


def test_a_dns_server_that_never_answers_is_one_line_and_exit_2() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never read: queries go unanswered
        silent.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        done = fleet("api.fleet.test:50051", "--dns-server", server, "--dns-timeout", "300ms")

    assert (done.returncode, done.stderr.splitlines()) == (ExitCode.CONNECTION, [
        f"petsage-grpc fleet: api.fleet.test:50051: no answer from {server} for api.fleet.test within 0.3s"])


def test_the_run_deadline_bounds_the_lookups_that_queue_for_the_resolver() -> None:
    """As found in review: each query had its own limit, but lookups waiting for a query slot had none.

    40 names ask 80 queries of a server that never answers, 16 at a time: past --timeout, the
    lookups still queued end as one line each saying so, instead of the run taking 5 rounds.
    """
    names = [f"host{number}.fleet.test:50051" for number in range(40)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        done = fleet(*names, "--dns-server", server, "--dns-timeout", "1s", "--timeout", "1s")

    assert done.returncode == ExitCode.CONNECTION
    lines = done.stderr.splitlines()
    assert len(lines) == len(names), lines
    assert "petsage-grpc fleet: host39.fleet.test:50051: --timeout 1s ran out while looking it up" in lines


def test_a_name_with_more_addresses_than_max_instances_is_refused_and_none_is_checked(
        dns_server: Callable[..., DnsServer]) -> None:
    dns = dns_server(hosts={"big.fleet.test": [f"127.0.0.{last}" for last in range(10, 15)]})

    done = fleet("big.fleet.test:1", "--dns-server", dns.address, "--max-instances", "4", "--json")

    assert (done.returncode, done.stderr.splitlines()) == (ExitCode.USAGE, [
        "petsage-grpc fleet: big.fleet.test:1: 5 addresses, more than --max-instances 4"])
    document = as_json(done)
    assert document["instances"] == [] and document["targets"][0]["problem"] == "too_many"


def test_a_dns_server_that_refuses_is_one_line_and_exit_2(dns_server: Callable[..., DnsServer]) -> None:
    dns = dns_server()  # serves fleet.test only, and refuses any other name (it has no upstream)

    done = fleet("api.example:50051", "--dns-server", dns.address)

    assert done.returncode == ExitCode.CONNECTION
    assert done.stderr.splitlines() == [f"petsage-grpc fleet: api.example:50051: no DNS server could answer for "
                                        f"api.example ({dns.address} answered REFUSED)"]


def test_min_instances_fails_with_5_when_fewer_answer(pool: Pool, nothing_listens: str,
                                                      dns_server: Callable[..., DnsServer]) -> None:
    dns = dns_server(hosts={"api.fleet.test": [HEALTHY, "127.0.0.3", NOTHING]})
    target = f"api.fleet.test:{pool.port}"

    enough = fleet(target, "--dns-server", dns.address, "--min-instances", "2", "--retries", "0")
    short = fleet(target, "--dns-server", dns.address, "--min-instances", "3", "--retries", "0")
    two = fleet(pool.at(HEALTHY), pool.at("127.0.0.3"), "--min-instances", "2")

    assert enough.returncode == ExitCode.CONNECTION  # two answered, as asked; the third is unreachable
    assert short.returncode == ExitCode.NO_INSTANCES  # too few outranks unreachable
    assert short.stderr.splitlines()[0] == "petsage-grpc fleet: 2 of 3 instance(s) answered, fewer than " \
                                           "--min-instances 3"
    assert (two.returncode, two.stderr) == (0, "")


def test_a_probe_style_addr_is_one_more_target_and_a_junit_file_that_cannot_be_written_is_one_line(
        pool: Pool) -> None:
    done = fleet("-addr", pool.at(HEALTHY), pool.at("127.0.0.3"), "--junit", "/dev/full")

    assert done.returncode == 0  # the checks' outcome, wherever the report goes
    assert done.stdout.splitlines()[-1] == "2 instances: 2 SERVING, 0 NOT_SERVING, 0 RPC failed, 0 unreachable"
    assert done.stderr.splitlines() == [
        "petsage-grpc fleet: cannot write --junit '/dev/full': No space left on device"]


def test_help_is_plain_text_with_the_exit_codes_and_their_order() -> None:
    done = fleet("--help")
    text = " ".join(done.stdout.split())

    assert (done.returncode, done.stderr) == (0, "")
    assert not re.search(r"``|:class:|:func:|:mod:", text)
    assert ("exit codes (when several apply, the first of this list): 1 bad arguments, or a target gave more than "
            "--max-instances 2 a DNS server") in text
    assert "--concurrency N instances checked at once [default 16]" in text


@pytest.mark.parametrize(("args", "message"), [
    ([], "no target given: expected NAME:PORT, srv:NAME or IP:PORT"),
    # As found in review: grpc refused the value on every call with a traceback of its own, exit 1, no table.
    (["127.0.0.1:1", "-rpc-header", "x: caf\u00e9"],
     "invalid RPC header 'x: caf\u00e9': a value must be printable ASCII (a key ending in -bin carries any bytes)"),
    (["nohost"], "invalid target 'nohost': expected NAME:PORT, srv:NAME or IP:PORT"),
    (["::1:50051"], "invalid target '::1:50051': expected NAME:PORT, srv:NAME or IP:PORT (an IPv6 address goes in "
                    "brackets: [::1]:50051)"),
    (["127.0.0.1:0"], "invalid target '127.0.0.1:0': the port should be in 1..65535"),
    (["srv:"], "invalid target 'srv:': expected srv:NAME, e.g. srv:_grpc._tcp.petsage-grpc-headless"),
    (["unix:/run/x.sock"], "invalid target 'unix:/run/x.sock': a unix socket is one server; probe or smoke check it"),
    (["a.test:1,"], "empty target (a stray comma?)"),
    (["a.test:1", "--concurrency", "0"], "argument --concurrency: should be in 1..1024 (specified: 0)"),
    (["a.test:1", "--retries", "x"], "argument --retries: expected a whole number, got 'x'"),
    (["a.test:1", "--all", "-service", "readiness"], "cannot specify -service with --all (--all checks every service)"),
    (["a.test:1", "--dns-server", "dns.local"], "invalid --dns-server 'dns.local': expected IP or IP:PORT, "
                                                "e.g. 10.96.0.10:53"),
    (["a.test:1", "--timeout", "-1s"], "--timeout must be greater than zero (specified: -1s)"),
    (["a.test:1", "-tls-ca-cert", "ca.pem"], "specified -tls-ca-cert without specifying -tls"),
    (["a.test:1", "--junit", "/no/such/folder/x.xml"], "cannot write --junit '/no/such/folder/x.xml': "
                                                       "no such directory: '/no/such/folder'"),
    (["a.test:1", "--bogus"], "flag provided but not defined: --bogus"),
    (["a.test:1", "-servic", "x"], "flag provided but not defined: -servic"),
    (["a.test:1", "-rpc-timeout"], "flag needs an argument: -rpc-timeout"),
])
def test_bad_arguments_are_one_line_and_exit_1(args: list[str], message: str) -> None:
    done = fleet(*args)

    assert (done.returncode, done.stderr.splitlines(), done.stdout) == (
        1, [f"petsage-grpc fleet: error: {message}"], "")


def test_tls_expects_the_name_an_instance_was_found_under(start_server: Start, tmp_path: Path,
                                                          dns_server: Callable[..., DnsServer]) -> None:
    certs = make_certs(tmp_path)
    server = start_server("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key))
    port = port_of(server.address)
    dns = dns_server(hosts={SERVER_NAME: ["127.0.0.1"], "other.fleet.test": ["127.0.0.1"]})
    tls = ["-tls", "-tls-ca-cert", str(certs.ca), "--dns-server", dns.address, "--retries", "0"]

    named = fleet(f"{SERVER_NAME}:{port}", *tls)  # the certificate names petsage.test
    literal = fleet(server.address, *tls)  # ... and 127.0.0.1
    other = fleet(f"other.fleet.test:{port}", *tls)  # ... but not other.fleet.test
    overridden = fleet(f"other.fleet.test:{port}", *tls, "-tls-server-name", SERVER_NAME)
    unverified = fleet(f"other.fleet.test:{port}", "-tls", "-tls-no-verify", "--dns-server", dns.address)

    assert [done.returncode for done in (named, literal, other, overridden, unverified)] == [0, 0, 2, 0, 0]
    assert other.stderr.startswith(f"petsage-grpc fleet: {server.address}: unreachable after 1 attempt(s): ")


# --- 50 instances, at most --concurrency at once ---------------------------------------------------------


@dataclass
class Gate:
    """Holds every call until ``width`` are in flight at once, then lets all through; records the peak."""

    width: int
    in_flight: int = 0
    peak: int = 0
    calls: int = 0
    opened: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def enter(self) -> bool:
        """Count a call in, wait for the gate; False if it never opened."""
        with self.changed:
            self.in_flight += 1
            self.calls += 1
            self.peak = max(self.peak, self.in_flight)
            self.opened = self.opened or self.in_flight >= self.width
            self.changed.notify_all()  # the calls waiting here, and a test waiting for a call to arrive
            return self.changed.wait_for(lambda: self.opened, PROCESS_TIMEOUT)

    def leave(self) -> None:
        with self.changed:
            self.in_flight -= 1


@pytest.fixture
def gated_health() -> Iterator[tuple[Gate, list[int]]]:
    """A health server on 127.0.0.20-29, five ports each, whose Check waits at a :class:`Gate` of 7."""
    gate = Gate(width=7)

    class Health(health_pb2_grpc.HealthServicer):
        def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
                  ) -> health_pb2.HealthCheckResponse:
            try:
                if not gate.enter():
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "fewer calls than the gate's width came")
                return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
            finally:
                gate.leave()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    ports = [server.add_insecure_port("127.0.0.20:0") for _ in range(5)]
    for host in range(21, 30):
        for port in ports:
            assert server.add_insecure_port(f"127.0.0.{host}:{port}") == port
    server.start()
    yield gate, ports
    with gate.changed:
        gate.opened = True
        gate.changed.notify_all()
    server.stop(None)


def test_fifty_instances_finish_within_the_deadline_never_more_than_concurrency_at_once(
        gated_health: tuple[Gate, list[int]], dns_server: Callable[..., DnsServer]) -> None:
    """The gate opens only once 7 calls wait together: the run finishing proves 7 ran at once, the peak no more."""
    gate, ports = gated_health
    hosts = {f"h{n}.fleet.test": [f"127.0.0.{n}"] for n in range(20, 30)}
    dns = dns_server(hosts=hosts, srv={"_grpc._tcp.many.fleet.test": [(h, p) for h in hosts for p in ports]})

    done = fleet("srv:_grpc._tcp.many.fleet.test", f"h20.fleet.test:{ports[0]}", f"127.0.0.29:{ports[-1]}", "--json",
                 "--concurrency", str(gate.width), "--timeout", "60s", "-rpc-timeout", "30s",
                 "--dns-server", dns.address)

    assert (done.returncode, done.stderr) == (0, "")
    document = as_json(done)
    assert document["summary"]["instances"] == document["summary"]["serving"] == 50 == gate.calls
    assert all(instance["attempts"] == 1 for instance in document["instances"])
    assert by_address(document)[f"127.0.0.20:{ports[0]}"]["targets"] == [
        "srv:_grpc._tcp.many.fleet.test", f"h20.fleet.test:{ports[0]}"]
    assert gate.peak == gate.width


# --- SIGTERM ---------------------------------------------------------------------------------------------


def test_sigterm_stops_the_run_at_once_with_one_line(
        gated_health: tuple[Gate, list[int]]) -> None:
    gate, ports = gated_health
    process = subprocess.Popen([sys.executable, "-m", "petsage_grpc", "fleet", f"127.0.0.20:{ports[0]}",
                                "-rpc-timeout", "60s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT)
    try:
        with gate.changed:  # the one call waits at the gate (width 7) until the channel closes
            assert gate.changed.wait_for(lambda: gate.in_flight == 1, PROCESS_TIMEOUT)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(RPC_TIMEOUT)

    assert (process.returncode, stdout, stderr) == (
        128 + signal.SIGTERM, "", "petsage-grpc fleet: stopped by SIGTERM: nothing reported\n")


# --- in this process: the pure logic ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("api.ns.svc:50051", targets.Target("api.ns.svc:50051", "dns", name="api.ns.svc", port=50051)),
    ("api.ns.svc.:50051", targets.Target("api.ns.svc.:50051", "dns", name="api.ns.svc.", port=50051)),
    ("petsage-grpc-headless:50051", targets.Target("petsage-grpc-headless:50051", "dns",
                                                   name="petsage-grpc-headless", port=50051)),
    ("srv:_grpc._tcp.api", targets.Target("srv:_grpc._tcp.api", "srv", name="_grpc._tcp.api")),
    ("10.0.0.7:50051", targets.Target("10.0.0.7:50051", "address", port=50051, host="10.0.0.7")),
    ("[fd00::7]:50051", targets.Target("[fd00::7]:50051", "address", port=50051, host="fd00::7")),
])
def test_target_forms(text: str, expected: targets.Target) -> None:
    assert targets.parse_target(text) == expected


def test_targets_may_be_listed_and_repeats_are_dropped() -> None:
    parsed = targets.parse_targets(["10.0.0.7:1,10.0.0.8:1", "10.0.0.7:1", " a.test:2 "])
    assert [target.text for target in parsed] == ["10.0.0.7:1", "10.0.0.8:1", "a.test:2"]


@pytest.mark.parametrize("text", ["a..b:1", "-a.test:1", "a.test:99999", "[a.test]:1", "a b:1", "srv:a..b"])
def test_malformed_targets_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"invalid target {text!r}")):
        targets.parse_target(text)


def test_instances_are_deduplicated_by_address_keeping_every_target_that_named_them() -> None:
    first, second = targets.Resolution(targets.parse_target("a.test:1")), targets.Resolution(
        targets.parse_target("srv:b.test"))
    first.found = [("10.0.0.7", 1, "a.test"), ("fd00::7", 1, "a.test")]
    second.found = [("10.0.0.7", 1, "x.b.test"), ("10.0.0.7", 2, "x.b.test")]

    found = targets.instances([first, second])

    assert [(i.address, i.targets, i.server_name) for i in found] == [
        ("10.0.0.7:1", ("a.test:1", "srv:b.test"), "a.test"), ("[fd00::7]:1", ("a.test:1",), "a.test"),
        ("10.0.0.7:2", ("srv:b.test",), "x.b.test")]
    assert [i.channel_target for i in found] == ["ipv4:10.0.0.7:1", "ipv6:[fd00::7]:1", "ipv4:10.0.0.7:2"]


@pytest.mark.parametrize(("argv", "flags", "positional"), [
    (["srv:a", "--smoke", "-service", "readiness"], ["--smoke", "-service=readiness"], ["srv:a"]),
    (["-tls", "srv:a", "-connect-timeout", "1s", "b.test:1"], ["-tls", "-connect-timeout=1s"], ["srv:a", "b.test:1"]),
    (["-service", "", "a.test:1"], ["-service="], ["a.test:1"]),
    (["--json", "--", "a.test:1", "--smoke"], ["--json"], ["a.test:1", "--smoke"]),
])
def test_flags_may_stand_before_between_or_after_the_targets(
        argv: list[str], flags: list[str], positional: list[str]) -> None:
    assert split_arguments(build_parser(), argv) == (flags, positional)


def resolution(problem: str | None = None) -> targets.Resolution:
    return targets.Resolution(targets.parse_target("a.test:1"), problem=problem, error=problem and "a.test:1: why")


@pytest.mark.parametrize(("problems", "outcomes", "minimum", "code"), [
    ([None], ["serving", "serving"], 0, ExitCode.OK),
    ([None], ["serving", "not_serving"], 0, ExitCode.UNHEALTHY),
    ([None], ["not_serving", "rpc_failed"], 0, ExitCode.RPC_FAILED),
    ([None], ["not_serving", "rpc_failed", "unreachable"], 0, ExitCode.CONNECTION),
    ([None], ["serving", "unreachable"], 2, ExitCode.NO_INSTANCES),
    ([None], ["serving", "unreachable"], 1, ExitCode.CONNECTION),
    ([None, "no_instances"], ["unreachable"], 0, ExitCode.NO_INSTANCES),
    (["dns_failed", "no_instances"], ["serving"], 5, ExitCode.CONNECTION),
    ([None], [], 0, ExitCode.OK),  # an empty fleet reaches here only with a target's problem
])
def test_exit_code_precedence(problems: list[str | None], outcomes: list[str], minimum: int, code: ExitCode) -> None:
    assert summary.exit_code([resolution(p) for p in problems], outcomes, minimum) is code


def test_at_most_the_limit_run_at_once_and_the_rest_wait_their_turn() -> None:
    async def scenario() -> tuple[list[int], list[int], list[str]]:
        started: list[int] = []
        release = asyncio.Event()
        limit_reached = asyncio.Event()

        async def work(item: int) -> int:
            started.append(item)
            if len(started) == 3:
                limit_reached.set()
            await release.wait()
            return item * 10

        loop = asyncio.get_running_loop()
        run = asyncio.ensure_future(checks.run_bounded(list(range(8)), work, 3, loop.time() + 60, lambda i: -i))
        await limit_reached.wait()
        for _ in range(10):  # every task had its turn to start, had the bound let it
            await asyncio.sleep(0)
        seen = list(started)
        release.set()
        outputs = await run
        late = await checks.run_bounded([1, 2], work, 1, loop.time() - 1, lambda i: -i)  # the deadline has passed
        return seen, outputs, [str(x) for x in late]

    seen, outputs, late = asyncio.run(scenario())

    assert seen == [0, 1, 2]
    assert outputs == [i * 10 for i in range(8)]
    assert late == ["-1", "-2"]


def test_retry_pauses_double_to_a_bound_and_are_jittered_down_by_half_at_most() -> None:
    rng = random.Random(7)
    for retry, full in enumerate([0.2, 0.4, 0.8, 1.6, 2.0, 2.0]):
        pauses = [checks.pause(retry, rng) for _ in range(200)]
        assert full / 2 <= min(pauses) and max(pauses) <= full


def synthetic_results() -> tuple[list[targets.Resolution], list[results.InstanceResult], checks.Plan]:
    plan = checks.Plan(services=("", "readiness"), list_all=False, smoke=True, connect_timeout=1, rpc_timeout=1,
                       retries=2, user_agent="test")
    good, bad, gone, odd = (targets.Instance(f"10.0.0.{n}", 1, ("a.test:1",), "a.test") for n in range(1, 5))
    smoke_ok = results.SmokeReply(status="STATUS_OK", message=OK_MESSAGE, rpc_seconds=0.002, instance_id="pod-1",
                                 version="0.1.0")
    answered = [
        results.InstanceResult(good, attempts=1, reached=True, connect_seconds=0.001, latency_seconds=0.004,
                              health=[results.HealthReply(status="SERVING", rpc_seconds=0.001, service=s)
                                      for s in plan.services], smoke=smoke_ok),
        results.InstanceResult(bad, attempts=1, reached=True, health=[
            results.HealthReply(status="NOT_SERVING", rpc_seconds=0.001, service=""),
            results.HealthReply(code="NotFound", error="NotFound: unknown service", rpc_seconds=0.001,
                               service="readiness")],
            smoke=results.SmokeReply(status="STATUS_FAILING", message="failing: logging.", instance_id="pod-2",
                                    version="0.2.0", failing_checks=[
                                        {"name": "logging", "status": "STATUS_FAILING", "detail": "disk\x00full",
                                         "critical": True}])),
        results.InstanceResult(gone, attempts=3, error="Connection refused"),
        results.InstanceResult(odd, error="not checked: --timeout 1s ran out before its turn"),
    ]
    return [resolution(), resolution("no_instances")], answered, plan


def test_junit_rendering_is_valid_and_counts_failures_and_errors(tmp_path: Path) -> None:
    resolutions, answered, plan = synthetic_results()
    counted = summary.summarize(resolutions, answered, 3)
    path = tmp_path / "report.xml"
    path.write_bytes(report.junit(resolutions, answered, plan, counted,
                                  datetime(2026, 1, 2, 3, 4, 5), 1.23456))

    suite, cases = junit_cases(path)

    assert (suite["@tests"], suite["@failures"], suite["@errors"], suite["@time"]) == ("15", "4", "7", "1.235")
    assert cases['10.0.0.2:1 health "readiness"']["error"]["@message"] == "NotFound: unknown service"
    assert "\N{REPLACEMENT CHARACTER}" in cases["10.0.0.2:1 SmokeTest"]["failure"]["@message"]  # no NUL in XML
    assert cases['10.0.0.4:1 health ""']["error"]["@message"] == (
        "unreachable: not checked: --timeout 1s ran out before its turn")
    assert cases["at least 3 instance(s) answer"]["failure"]["@message"] == "2 of 4 answered"


def test_json_rendering_has_the_documented_shape_and_counts() -> None:
    resolutions, answered, _ = synthetic_results()
    counted = summary.summarize(resolutions, answered, 0)

    document = json.loads(json.dumps(report.document(resolutions, answered, counted, 0.5)))

    assert_shape(document)
    assert [i["outcome"] for i in document["instances"]] == ["serving", "rpc_failed", "unreachable", "unreachable"]
    assert document["summary"] == {"instances": 4, "serving": 1, "not_serving": 0, "rpc_failed": 1, "unreachable": 2,
                                   "reached": 2, "min_instances": 0, "versions": {"0.1.0": 1, "0.2.0": 1},
                                   "exit_code": 5, "elapsed_seconds": 0.5}


def readme_job() -> dict[str, Any]:
    """The Job of the README's "In Kubernetes, after a rollout"."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    jobs = [doc for block in blocks for doc in [yaml.safe_load(block)] if isinstance(doc, dict)
            and doc.get("kind") == "Job"]
    assert len(jobs) == 1, "expected one Job in the README"
    return dict(jobs[0])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_readmes_job_is_valid_for_kubernetes(version: str) -> None:
    kubernetes_validate.validate(readme_job(), version, strict=True)


def test_the_readmes_job_runs_fleet_against_the_headless_service_with_the_deployments_image() -> None:
    (job_container,) = readme_job()["spec"]["template"]["spec"]["containers"]
    assert job_container["image"] == container()["image"]
    assert job_container["command"] == ["petsage-grpc", "fleet"]
    # Kubernetes expands $(NAMESPACE) from the env the Job sets; the flags are fleet's own.
    assert [v["name"] for v in job_container["env"]] == ["NAMESPACE"]
    args = [arg.replace("$(NAMESPACE)", "prod") for arg in job_container["args"]]
    parser = build_parser()
    flags, given = split_arguments(parser, args)
    parsed = parser.parse_args([*flags, *given])
    headless = next(doc for _, doc in load_manifests()
                    if doc["kind"] == "Service" and doc["spec"].get("clusterIP") == "None")
    port_name = headless["spec"]["ports"][0]["name"]
    assert [targets.parse_target(t) for t in parsed.targets] == [
        targets.parse_target(f"srv:_{port_name}._tcp.{headless['metadata']['name']}.prod.svc.cluster.local")]
    replicas = resource("Deployment")["spec"]["replicas"]
    assert parsed.smoke and parsed.min_instances == replicas


def test_what_a_server_says_is_printed_on_one_line_with_its_control_characters_escaped() -> None:
    # A SmokeTest message, an error's details, a name from List: never a second line, never a terminal escape.
    assert output.printable("ok") == "ok"
    assert output.printable("bad\nsecond line\x1b[31m red\t") == "bad\\nsecond line\\x1b[31m red\\t"
    assert output.printable("caf\u00e9 \u2713") == "caf\u00e9 \u2713"  # printable letters stay as they are
