"""``petsage-grpc probe`` against real servers: grpc_health_probe's exit codes and stderr lines, and ours."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import PROCESS_TIMEOUT, ROOT, LineLog, ServerProcess, Start, run_cli

NOT_FOUND = "error: health rpc failed: rpc error: code = NotFound desc = unknown service"


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("probe", *args)


@dataclass
class StandIn:
    """A health server whose Check records its callers and can be held (a situation ours never creates)."""

    address: str = ""
    metadata: list[dict[str, str]] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    state = StandIn()

    class Health(health_pb2_grpc.HealthServicer):
        def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
                  ) -> health_pb2.HealthCheckResponse:
            state.metadata.append({key: value for key, value in context.invocation_metadata()})
            if request.service == "held":
                state.entered.set()
                state.release.wait(PROCESS_TIMEOUT)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    state.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield state
    state.release.set()
    server.stop(None)


@pytest.mark.parametrize("args", [
    [], ["-service", ""], ["-service=readiness"], ["--service", "liveness"],
    ["-service", "petsage.smoke.v1.SmokeTestService"], ["-tls=false", "-v=false", "-gzip"],
])
def test_serving_exits_0_with_one_status_line(server: ServerProcess, args: list[str]) -> None:
    done = probe("-addr", server.address, *args)

    assert (done.returncode, done.stderr, done.stdout) == (0, "status: SERVING\n", "")


def test_double_dash_and_equals_spellings_work(server: ServerProcess) -> None:
    done = probe(f"--addr={server.address}", "--connect-timeout=2s", "--rpc-timeout", "1500ms")

    assert (done.returncode, done.stderr) == (0, "status: SERVING\n")


def test_unknown_service_exits_3_as_grpc_health_probe(server: ServerProcess) -> None:
    done = probe("-addr", server.address, "-service", "nope")

    assert (done.returncode, done.stderr.splitlines()) == (3, [NOT_FOUND])


def test_not_serving_exits_4(start_server: Start) -> None:
    server = start_server("--log-file", "/dev/full")  # logging fails, so readiness is NOT_SERVING

    done = probe("-addr", server.address, "-service", "readiness")

    assert (done.returncode, done.stderr.splitlines()) == (4, ['service unhealthy (responded with "NOT_SERVING")'])


def test_nothing_listening_exits_2_after_the_connect_timeout(refused_address: str) -> None:
    done = probe("-addr", refused_address, "-connect-timeout", "300ms")

    assert done.returncode == 2
    assert done.stderr.splitlines() == [f'timeout: failed to connect service "{refused_address}" within 300ms']


def test_server_without_health_exits_3(bare_server: str) -> None:
    done = probe("-addr", bare_server)

    assert done.returncode == 3
    [line] = done.stderr.splitlines()
    assert line.startswith("error: this server does not implement the grpc health protocol (grpc.health.v1.Health): ")


def test_rpc_deadline_exits_3(stand_in: StandIn) -> None:
    done = probe("-addr", stand_in.address, "-service", "held", "-rpc-timeout", "200ms")

    assert (done.returncode, done.stderr.splitlines()) == (3, ["timeout: health rpc did not complete within 200ms"])


def test_user_agent_and_headers_reach_the_server(stand_in: StandIn) -> None:
    done = probe("-addr", stand_in.address, "-user-agent", "kubelet-exec", "-rpc-header", "X-Tenant: pets",
                 "-rpc-header=x-trace:  abc")

    assert done.returncode == 0, done.stderr
    [seen] = stand_in.metadata
    assert seen["user-agent"].startswith("kubelet-exec ")
    assert (seen["x-tenant"], seen["x-trace"]) == ("pets", "abc")


def test_default_user_agent_is_grpc_health_probe(stand_in: StandIn) -> None:
    assert probe("-addr", stand_in.address).returncode == 0

    assert stand_in.metadata[0]["user-agent"].startswith("grpc_health_probe ")


@pytest.mark.parametrize(("args", "message"), [
    ([], "-addr not specified"),
    (["-connect-timeout", "0s"], "-connect-timeout must be greater than zero (specified: 0s)"),
    (["-rpc-timeout=-1.5s"], "-rpc-timeout must be greater than zero (specified: -1.5s)"),
    (["-tls-no-verify"], "specified -tls-no-verify without specifying -tls"),
    (["-tls-ca-cert", "ca.pem"], "specified -tls-ca-cert without specifying -tls"),
    (["-tls-client-cert", "c.pem", "-tls-client-key", "k.pem"], "specified -tls-client-cert without specifying -tls"),
    (["-tls-server-name", "x"], "specified -tls-server-name without specifying -tls"),
    (["-tls", "-tls-client-cert", "c.pem"], "specified -tls-client-cert without specifying -tls-client-key"),
    (["-tls", "-tls-client-key", "k.pem"], "specified -tls-client-key without specifying -tls-client-cert"),
    (["-tls", "-tls-no-verify", "-tls-ca-cert", "ca.pem"],
     "cannot specify -tls-ca-cert with -tls-no-verify (CA cert would not be used)"),
    (["-tls", "-tls-no-verify", "-tls-server-name", "x"],
     "cannot specify -tls-server-name with -tls-no-verify (server name would not be used)"),
    (["--all", "-service", "x"], "cannot specify -service with --all (--all checks every service)"),
    (["-connect-timeout", "2x"],
     "argument -connect-timeout/--connect-timeout: invalid duration '2x' (expected e.g. 250ms, 1.5s, 1m or 2)"),
    (["-tls=maybe"], "argument -tls/--tls: invalid boolean 'maybe' (expected true or false)"),
    (["-rpc-header", "no colon"], "argument -rpc-header/--rpc-header: invalid RPC header, expected 'key: value', "
                                  "got 'no colon'"),
    (["-bogus"], "flag provided but not defined: -bogus"),  # Go's words
])
def test_bad_arguments_exit_1_with_one_line(refused_address: str, args: list[str], message: str) -> None:
    address = [] if not args else ["-addr", refused_address]

    done = probe(*address, *args)

    assert (done.returncode, done.stderr.splitlines(), done.stdout) == (1, [f"error: {message}"], "")


def test_version_prints_ours_and_exits_0() -> None:
    done = probe("-version")

    assert (done.returncode, done.stdout) == (0, "petsage-grpc probe 0.1.0\n")


def test_verbose_logs_each_step(server: ServerProcess) -> None:
    done = probe("-addr", server.address, "-v")

    lines = done.stderr.splitlines()
    assert done.returncode == 0
    assert lines[:4] == ["parsed options:", f"> addr={server.address} conn_timeout=1s rpc_timeout=1s", "> tls=false",
                         "establishing connection"]
    assert lines[4].startswith("connection established (took ")
    assert lines[5].startswith("time elapsed: connect=")
    assert lines[6:] == ["status: SERVING"]


def test_several_services_must_all_be_serving(server: ServerProcess) -> None:
    done = probe("-addr", server.address, "-service", "readiness", "-service", "nope", "-service", "liveness")

    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        'service "readiness": status: SERVING', f'service "nope": {NOT_FOUND}', 'service "liveness": status: SERVING',
    ]


def test_all_checks_every_listed_service(start_server: Start) -> None:
    server = start_server("--log-file", "/dev/full")

    done = probe("-addr", server.address, "--all")

    assert done.returncode == 4
    assert done.stderr.splitlines() == [
        'service "": service unhealthy (responded with "NOT_SERVING")',
        'service "liveness": status: SERVING',
        'service "petsage.smoke.v1.SmokeTestService": service unhealthy (responded with "NOT_SERVING")',
        'service "readiness": service unhealthy (responded with "NOT_SERVING")',
    ]


def test_json_reports_every_service_and_the_timings(server: ServerProcess) -> None:
    done = probe("-addr", server.address, "-service", "readiness", "-service", "nope", "--json")

    report = json.loads(done.stdout)
    assert done.returncode == report["exit_code"] == 3
    assert (report["address"], report["attempts"], report["error"]) == (server.address, 1, None)
    assert 0 < report["connect_seconds"] < report["elapsed_seconds"]
    assert [(s["service"], s["status"], s["exit_code"], s["error"]) for s in report["services"]] == [
        ("readiness", "SERVING", 0, None), ("nope", None, 3, NOT_FOUND),
    ]
    assert all(s["rpc_seconds"] > 0 for s in report["services"])


def test_json_on_connection_failure(refused_address: str) -> None:
    done = probe("-addr", refused_address, "-connect-timeout", "100ms", "--json")

    report = json.loads(done.stdout)
    assert (done.returncode, report["exit_code"], report["services"]) == (2, 2, [])
    assert report["error"] == f'timeout: failed to connect service "{refused_address}" within 100ms'


class ProbeProcess:
    """A probe running in the background, its stderr readable line by line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "petsage_grpc", "probe", *args], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr = LineLog(self.process.stderr)

    def wait(self) -> int:
        code = self.process.wait(PROCESS_TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


@pytest.fixture
def start_probe() -> Iterator[Callable[..., ProbeProcess]]:
    started: list[ProbeProcess] = []

    def start(*args: str) -> ProbeProcess:
        started.append(ProbeProcess(*args))
        return started[-1]

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
        running.wait()


def free_port() -> int:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        port: int = spare.getsockname()[1]
    return port


def test_wait_retries_until_the_server_serves(start_server: Start, start_probe: Callable[..., ProbeProcess]) -> None:
    address = f"127.0.0.1:{free_port()}"
    waiting = start_probe("-addr", address, "-connect-timeout", "200ms", "--wait", "30s", "-v")
    waiting.stderr.wait_for(r"^attempt 1: timeout: failed to connect")

    start_server(address=address)

    assert waiting.wait() == 0
    assert waiting.stderr.lines[-1] == "status: SERVING"


def test_wait_gives_up_when_time_runs_out(refused_address: str) -> None:
    done = probe("-addr", refused_address, "-connect-timeout", "100ms", "--wait", "600ms", "--json")

    report = json.loads(done.stdout)
    assert done.returncode == 2
    assert report["attempts"] >= 3
    assert 0.6 <= report["elapsed_seconds"] < 0.6 + 1.0  # at most one more attempt's time past the wait
    # As reported, the line said only "within 100ms" after 0.7 s of attempts.
    [line] = done.stderr.splitlines()
    assert re.fullmatch(rf'timeout: failed to connect service "{re.escape(refused_address)}" within 100ms '
                        rf'\(gave up after {report["attempts"]} attempt\(s\) in [\d.]+m?s of --wait 600ms\)',
                        line), line


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_waiting_ends_it_cleanly(refused_address: str, start_probe: Callable[..., ProbeProcess],
                                              signum: int) -> None:
    waiting = start_probe("-addr", refused_address, "-connect-timeout", "200ms", "--wait", "60s", "-v")
    waiting.stderr.wait_for(r"^attempt 1: ")

    waiting.process.send_signal(signum)

    assert waiting.wait() == 2
    assert "cancellation received" in waiting.stderr.lines
    assert not any("Traceback" in line for line in waiting.stderr.lines)


def test_signal_during_the_rpc_cancels_it(stand_in: StandIn, start_probe: Callable[..., ProbeProcess]) -> None:
    running = start_probe("-addr", stand_in.address, "-service", "held", "-rpc-timeout", "60s")
    assert stand_in.entered.wait(PROCESS_TIMEOUT)

    running.process.send_signal(signal.SIGTERM)

    assert running.wait() == 3
    assert running.stderr.lines == [
        "cancellation received", "error: health rpc failed: rpc error: code = Canceled desc = context canceled",
    ]


def test_readme_documents_every_probe_flag() -> None:
    from petsage_grpc.cli.probe.main import build_parser

    section = (ROOT / "README.md").read_text().split("## `petsage-grpc probe`")[1].split("\n## ")[0]
    flags = re.findall(r"\[(-{1,2}[a-z][\w-]*)", build_parser().format_usage())

    assert len(flags) > 15
    assert [flag for flag in flags if flag != "-h" and f"`{flag}" not in section] == []


def test_the_probe_reaches_servers_on_a_unix_socket_and_on_ipv6(start_server: Start, tmp_path_factory:
                                                               pytest.TempPathFactory) -> None:
    """``unix:PATH`` is the one address rule of serve, smoke and probe alike."""
    path = tmp_path_factory.mktemp("sock") / "pets.sock"
    on_unix = start_server(address=f"unix:{path}", wait=False)
    on_unix.stdout.wait_for(f"serving on unix:{re.escape(str(path))}$")
    on_ipv6 = start_server(address="[::1]:0")

    for address in (f"unix:{path}", f"unix://{path}", on_ipv6.address):
        done = probe("-addr", address, "-service", "readiness")
        assert (done.returncode, done.stderr) == (0, "status: SERVING\n"), address
    smoke = run_cli("smoke", "--address", f"unix:{path}")
    assert smoke.returncode == 0, smoke.stderr
