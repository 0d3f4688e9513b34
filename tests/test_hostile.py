"""Hostile callers over the wire, each attack bounded in time and count, on loopback: requests that never
complete, silent sockets, slot hogs, persistent callers at shutdown."""

from __future__ import annotations

import asyncio
import json
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from petsage_grpc.health.servicer import DEFAULT_MAX_UNKNOWN
from tests.programs.raw_grpc import NO_STATUS, incomplete_calls, leave_before_the_answer
from tests.programs.watch_crowd import watching
from tests.support import RPC_TIMEOUT, SERVING, LineLog, ServerProcess, Start, child, proc_status, reaped
from tests.support.deploy import (
    MEMORY,
    container,
    container_settings,
    documented_probes,
    image_env,
    kubelet_probe,
    on_free_ports,
    quantity,
)

#: grpc-status codes as numbers on the wire.
OK, CANCELLED, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL = "0", "1", "3", "4", "8", "13"
#: The image's environment (the Dockerfile's ENV): among others, two malloc arenas, not one per grpc thread.
IMAGE_ENV = image_env()
#: What a call grpc holds costs the server while it is held, measured: about 25 KiB.
CALL_KIB = 25
#: Request bodies that never make a whole message, as the attack sent them.
INCOMPLETE = {
    "empty body": (b"", True),
    "prefix promising 100 bytes, then 10": (b"\x00\x00\x00\x00\x64" + b"x" * 10, True),
    "compressed flag 2": (b"\x02\x00\x00\x00\x02\x0a\x00", True),
    "compressed flag 7": (b"\x07\x00\x00\x00\x02\x0a\x00", True),
    "compressed flag 0x80": (b"\x80\x00\x00\x00\x02\x0a\x00", True),
    "half a prefix, stream left open": (b"\x00\x00", False),
}


def address_of(server: ServerProcess) -> tuple[str, int]:
    host, port = server.address.rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize("body", INCOMPLETE, ids=list(INCOMPLETE))
def test_a_call_whose_request_never_completes_gets_an_error_status_promptly(start_server: Start, body: str) -> None:
    server = start_server("--request-timeout", "1")
    data, end_stream = INCOMPLETE[body]

    statuses = asyncio.run(incomplete_calls(*address_of(server), 50, data, end_stream=end_stream, seconds=3))

    assert NO_STATUS not in statuses and "closed" not in statuses
    # Each is answered as the bytes deserve: no message (INVALID_ARGUMENT), no message in time
    # (DEADLINE_EXCEEDED), or what grpc core itself says of a flag it cannot read.
    assert set(statuses) <= {INVALID_ARGUMENT, DEADLINE_EXCEEDED, INTERNAL, OK}, Counter(statuses)
    assert server.health("liveness") == SERVING


def test_calls_waiting_for_their_request_are_counted_cut_at_the_cap_and_freed(
    start_server: Start, record_property: Callable[[str, object], None]
) -> None:
    """Three rounds of 4,000 calls that never send their message, against a cap of 500 waiting calls.

    Before, no such call was ever answered or freed: every round added its
    calls' memory for good.
    """
    server = start_server("--request-timeout", "20", "--max-incomplete-requests", "500", "--http-address",
                          "127.0.0.1:0", "--metrics", env=IMAGE_ENV)
    started = proc_status(server.process.pid, "VmRSS")

    async def round_of_attack() -> tuple[Counter[str], dict[str, float], int]:
        flood = asyncio.gather(*(incomplete_calls(*address_of(server), 200, b"", end_stream=False, seconds=4)
                                 for _ in range(20)))
        while (gauges := scrape(server))["petsage_requests_waiting"] < 500:
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(server.health, "liveness") == SERVING  # while every slot is taken
        statuses = Counter(status for connection in await flood for status in connection)
        return statuses, gauges, proc_status(server.process.pid, "VmRSS")

    rss = []
    for _ in range(3):
        statuses, gauges, after = asyncio.run(round_of_attack())
        rss.append(after)
        assert gauges["petsage_requests_waiting"] == 500
        assert gauges["petsage_calls_in_flight"] >= 500  # each is counted as a call in flight
        # Every call past the cap ended the oldest waiting one (the liveness Check took a slot too);
        # the last 500 were still waiting when the client gave up after 4 s.
        assert statuses[RESOURCE_EXHAUSTED] >= 3500 and statuses[NO_STATUS] <= 500, statuses
    growth = [(value - started) / 1024 for value in rss]
    record_property("terminal_summary", f"incomplete requests: 3 rounds of 4,000 calls held against a cap of 500; "
                                        f"RSS +{growth[0]:.1f}, +{growth[1]:.1f}, +{growth[2]:.1f} MiB")
    # What grpc holds for one burst (about 25 KiB a call), not three: before, every held call stayed.
    assert growth[2] < 4000 * CALL_KIB / 1024 * 1.5
    deadline = time.monotonic() + RPC_TIMEOUT
    while scrape(server)["petsage_requests_waiting"]:  # the calls of the clients that left end with them
        assert time.monotonic() < deadline
        time.sleep(0.05)


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every sample without labels, scraped at once."""
    samples = {}
    for line in server.http("/metrics", timeout=RPC_TIMEOUT).text.splitlines():
        name, _, value = line.partition(" ")
        if not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def test_the_deployment_keeps_floods_of_incomplete_calls_inside_its_memory_limit(
    start_server: Start, record_property: Callable[[str, object], None]
) -> None:
    """The attack as reported: 14 connections x 1,000 calls that never send their message, three times over.

    Before, with the manifest's flags, the first round took the server to
    318 MB, past the Deployment's 256 MiB limit, and the calls were never freed.
    """
    spec = container()
    limit_mib = quantity(spec["resources"]["limits"]["memory"], MEMORY) / 2**20
    server = start_server(*on_free_ports(spec["args"]), address="", env=IMAGE_ENV)
    peak = 0

    async def attack() -> Counter[str]:
        nonlocal peak
        flood = asyncio.gather(*(incomplete_calls(*address_of(server), 1000, b"", end_stream=False, seconds=4)
                                 for _ in range(14)))
        while not flood.done():
            peak = max(peak, proc_status(server.process.pid, "VmRSS"))
            await asyncio.sleep(0.05)
        return Counter(status for connection in await flood for status in connection)

    rounds = [asyncio.run(attack()) for _ in range(3)]
    record_property("terminal_summary", f"incomplete requests, manifest flags: 3 rounds of 14 x 1,000 calls; peak "
                                        f"RSS {peak / 1024:.0f} MiB against a limit of {limit_mib:.0f} MiB; "
                                        f"last round {dict(rounds[-1])}")
    assert peak / 1024 < limit_mib
    for statuses in rounds:
        # Answered: evicted at the cap (RESOURCE_EXHAUSTED), or cancelled by grpc's own full queue; the
        # newest 500 still waiting when the client left.
        assert set(statuses) <= {RESOURCE_EXHAUSTED, CANCELLED, NO_STATUS} and statuses[NO_STATUS] <= 500, statuses
    assert server.health("liveness") == SERVING


def hold_silent_sockets(host: str, port: int, count: int, seconds: float) -> tuple[int, int]:
    """Keep ``count`` sockets open to ``host:port`` that send nothing, reopening each one the server closes.

    Returns how many sockets were opened, and how many of them the server closed.
    """
    opened = closed = 0
    end = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:  # epoll: select() stops at 1,024 descriptors
        try:
            while time.monotonic() < end:
                while len(selector.get_map()) < count:
                    try:
                        new = socket.create_connection((host, port), timeout=1)
                    except OSError:
                        break
                    selector.register(new, selectors.EVENT_READ, new)
                    opened += 1
                for key, _ in selector.select(0.2):
                    sock: socket.socket = key.data
                    try:
                        gone = sock.recv(4096, socket.MSG_DONTWAIT) == b""  # the server's SETTINGS, or its close
                    except BlockingIOError:
                        gone = False
                    except OSError:
                        gone = True
                    if gone:
                        closed += 1
                        selector.unregister(sock)
                        sock.close()
        finally:
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                key.data.close()
    return opened, closed


def test_silent_sockets_are_closed_after_the_handshake_timeout(start_server: Start) -> None:
    server = start_server("--handshake-timeout", "1")
    host, port = address_of(server)
    started = time.monotonic()

    with socket.create_connection((host, port), timeout=10) as silent:
        while silent.recv(4096):  # the server's SETTINGS, then EOF
            pass

    assert 1 <= time.monotonic() - started < 3  # grpc's own default is a minute and more


def test_silent_sockets_at_the_connection_cap_cannot_lock_the_deployments_probes_out(
    start_server: Start, record_property: Callable[[str, object], None]
) -> None:
    """The attack as reported: silent sockets past the gRPC connection cap, reopened as the server closes them.

    Before, with the manifest's flags and its native gRPC probes, 10 of 10
    consecutive liveness probes failed, which restarts a healthy pod.
    """
    spec = container()
    cap = container_settings().max_connections
    server = start_server(*on_free_ports(spec["args"]), address="", env=IMAGE_ENV)
    held: list[tuple[int, int]] = []
    flood = threading.Thread(target=lambda: held.append(hold_silent_sockets(*address_of(server), cap + 100, 12)))
    flood.start()
    try:
        while connections(server) < cap:  # the gRPC port is full
            time.sleep(0.1)
        probes, grpc_variant = [], []
        for _ in range(10):
            probes.append(kubelet_probe(server, spec["livenessProbe"]))
            grpc_variant.append(kubelet_probe(server, documented_probes("grpc")["livenessProbe"]))
            time.sleep(0.5)  # the probe period, shortened
    finally:
        flood.join()
    opened, closed = held[0]
    record_property("terminal_summary", f"silent sockets, manifest flags: {opened} opened, {closed} closed by the "
                                        f"server; liveness probes passed: manifest (HTTP) {sum(probes)}/10, "
                                        f"native gRPC variant {sum(grpc_variant)}/10")
    assert probes == [True] * 10
    assert closed > 0  # the handshake timeout closes them: the attacker must keep reopening
    server.stdout.wait_for(r"check grpc_connections is failing: \d+ of 1000 gRPC connections open: at the cap")


def connections(server: ServerProcess) -> float:
    """``petsage_grpc_connections``, scraped."""
    return scrape(server)["petsage_grpc_connections"]


#: A channel that checks health on the client side, as a client behind a load balancing policy does.
HEALTH_CHECKED = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                             "healthCheckConfig": {"serviceName": "readiness"}})


def test_one_caller_holding_every_watch_slot_cannot_keep_a_health_checking_channel_out(
    start_server: Start,
) -> None:
    """The attack as reported: 100 Watch streams on one connection against --max-watchers 100.

    Before, a channel with client-side health checking then failed 5 of 5
    calls with UNAVAILABLE "health check call failed".
    """
    server = start_server("--max-watchers", "100", "--http-address", "127.0.0.1:0", "--metrics")

    async def scenario() -> tuple[list[int], list[int], list[grpc.StatusCode]]:
        async with watching(server.address, "readiness", 100) as hog:
            options = (("grpc.service_config", HEALTH_CHECKED), ("grpc.use_local_subchannel_pool", 1))
            async with grpc.aio.insecure_channel(server.address, options=options) as channel:
                smoke = smoke_pb2_grpc.SmokeTestServiceStub(channel)
                answers = [(await smoke.SmokeTest(smoke_pb2.SmokeTestRequest(), timeout=RPC_TIMEOUT)).status
                           for _ in range(5)]
            ended = [call for call in hog.calls if call.done()]
            return answers, hog.first, [await call.code() for call in ended]

    answers, first, ended = asyncio.run(scenario())
    assert first == [SERVING] * 100
    assert answers == [smoke_pb2.STATUS_OK] * 5
    assert ended == [grpc.StatusCode.RESOURCE_EXHAUSTED]  # the hog gave one slot up
    assert 'petsage_watch_refused_total{reason="evicted"} 1.0' in server.http("/metrics").text
    server.stdout.wait_for(r"Watch streams of peer ipv4:127\.0\.0\.1 turned away: its streams give way")


def test_watches_on_names_with_no_status_cannot_take_the_slots_of_known_ones(start_server: Start) -> None:
    server = start_server("--max-watchers", "1000")

    async def scenario() -> tuple[grpc.StatusCode, str, int]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            unknown = [stub.Watch(health_pb2.HealthCheckRequest(service=f"nope-{n}"), timeout=RPC_TIMEOUT)
                       for n in range(DEFAULT_MAX_UNKNOWN)]
            for call in unknown:
                assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            refused = stub.Watch(health_pb2.HealthCheckRequest(service="nope-more"), timeout=RPC_TIMEOUT)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await refused.read()
            known = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=RPC_TIMEOUT)
            status = (await known.read()).status
            for call in [*unknown, known]:
                call.cancel()
            return caught.value.code(), caught.value.details() or "", status

    assert asyncio.run(scenario()) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"too many watchers of unknown services (limit {DEFAULT_MAX_UNKNOWN})",
                                       SERVING)


def test_a_caller_that_leaves_before_its_answer_is_logged_as_cancelled_in_one_line(start_server: Start) -> None:
    """The report: grpc logged a multi-line ExecuteBatchError traceback, and the access log said OK."""
    server = start_server("--http-address", "127.0.0.1:0", "--metrics")

    for number in range(5):
        leave_before_the_answer(*address_of(server), "/petsage.smoke.v1.SmokeTestService/SmokeTest", f"leaver-{number}")
    records = [server.stdout.wait_for(rf"SmokeTest (\w+) .*user_agent=\"leaver-{n}\"")[1] for n in range(5)]

    assert records == ["CANCELLED"] * 5
    metrics = server.http("/metrics").text
    assert ('grpc_server_handled_total{grpc_code="Canceled",grpc_method="SmokeTest",grpc_service='
            '"petsage.smoke.v1.SmokeTestService",grpc_type="unary"} 5.0') in metrics
    server.signal()
    assert server.wait() == 0
    output = server.stdout.text() + server.stderr.text()
    assert "Traceback" not in output and "ExecuteBatchError" not in output


#: Shutdowns with callers that never give up: before, 41 calls ended CANCELLED over 10 of them.
SHUTDOWNS = 5


def test_callers_that_never_give_up_see_no_cancelled_call_at_shutdown(
    start_server: Start, record_property: Callable[[str, object], None]
) -> None:
    """The report: 50 callers over 5 channels, calling again 20 ms after each refusal, through a SIGTERM.

    grpcio's stop() answers CANCELLED to calls it still holds (grpc/grpc#41785);
    the server holds every caller's next call in the last moments instead.
    """
    total: Counter[str] = Counter()
    for _ in range(SHUTDOWNS):
        server = start_server("--grace", "1", "--no-access-log")
        with reaped([child("tests.programs.persistent", server.address, "6")]) as (callers,):
            output = LineLog(callers.stdout)
            output.wait_for("^calling$")
            server.signal()
            assert server.wait() == 0, server.stderr.text()
            total.update(json.loads(output.wait_for(r"^\{").string))
            assert callers.wait(RPC_TIMEOUT + 10) == 0
        server.stdout.wait_for(r"\d+ call\(s\) held until the listener stopped, then answered")
    record_property("terminal_summary", f"persistent callers through {SHUTDOWNS} shutdowns: {dict(total)}")
    assert total["CANCELLED"] == 0
    assert set(total) <= {"OK", "UNAVAILABLE"}, total
