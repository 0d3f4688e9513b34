"""Checking the instances: one channel each, a bounded number at once, connections retried, a deadline on every call.

An attempt opens a channel and waits until it connects (READY) or its first
connection fails (TRANSIENT_FAILURE), within ``-connect-timeout``.  An
attempt without a connection is tried again, ``--retries`` times at most,
after a pause that doubles each time (0.2 s, 0.4 s, ... at most 2 s),
shortened at random by up to half so that many checkers never retry in step:
one dropped SYN must not fail a rollout.  Once connected nothing is retried:
NOT_SERVING, or an error status, is the server's answer, and a connection
lost mid-call may have reached it.  Every call's deadline is
``-rpc-timeout``, cut to what is left of the whole run's ``--timeout``; the
channel is closed when the instance is done.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from petsage_grpc.cli import dial
from petsage_grpc.cli.fleet.results import HealthReply, InstanceResult, Reply, SmokeReply
from petsage_grpc.cli.fleet.targets import Instance
from petsage_grpc.codes import go_name

if TYPE_CHECKING:
    import grpc

    from petsage_grpc.tls import ClientTLS

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

#: The pause before the first retry, and the longest pause.
FIRST_PAUSE, LONGEST_PAUSE = 0.2, 2.0
# One connection try per channel: grpc's own reconnection would try again within an attempt (hiding
# the attempt's outcome from the count), and a call made in TRANSIENT_FAILURE fails at once with the
# reason only while grpc waits out its backoff.  The next attempt gets a channel of its own.
_ONE_TRY_MS = 3_600_000
# The backstop after the run's deadline: every wait inside ends by then on its own, and a call's own
# DEADLINE_EXCEEDED (recorded) should win over the backstop's cancellation (which records nothing).
_BACKSTOP = 1.0
# How grpc names the address in a connection error: "ipv4:10.0.0.7:50051: ", "ipv6:%5B::1%5D:50051: ".
_GRPC_ADDRESS = re.compile(r"^ipv[46]:\S+: ")


@dataclass(frozen=True)
class Plan:
    """What to ask every instance, and how: the flags, read once."""

    services: tuple[str, ...]
    list_all: bool
    smoke: bool
    connect_timeout: float
    rpc_timeout: float
    retries: int
    user_agent: str
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    gzip: bool = False
    tls: ClientTLS | None = None
    tls_no_verify: bool = False
    credentials: grpc.ChannelCredentials | None = None  # made once from the -tls-* files (not with no-verify)


async def run_bounded(items: Sequence[_Item], work: Callable[[_Item], Awaitable[_Result]], limit: int,
                      deadline: float | None, late: Callable[[_Item], _Result]) -> list[_Result]:
    """``work`` on every item, at most ``limit`` at once, results in order.

    An item still waiting for its turn at ``deadline`` (the loop's clock;
    None: no deadline) is not started: ``late(item)`` stands for it.
    """
    gate = asyncio.Semaphore(limit)
    loop = asyncio.get_running_loop()

    async def one(item: _Item) -> _Result:
        try:
            async with asyncio.timeout_at(deadline):
                await gate.acquire()
        except TimeoutError:
            return late(item)
        try:
            # A free slot is taken without waiting, and so without the timeout's look at the clock.
            if deadline is not None and loop.time() >= deadline:
                return late(item)
            return await work(item)
        finally:
            gate.release()

    return list(await asyncio.gather(*(one(item) for item in items)))


def pause(retry: int, rng: random.Random) -> float:
    """Seconds to wait before retry number ``retry`` (0 first): doubling from 0.2 s to 2 s, less up to half."""
    return min(FIRST_PAUSE * 2.0**retry, LONGEST_PAUSE) * rng.uniform(0.5, 1.0)


class Checker:
    """Checks instances as ``plan`` says, all within ``deadline`` (the event loop's clock)."""

    def __init__(self, plan: Plan, deadline: float, timeout: float, concurrency: int) -> None:
        self.plan = plan
        self.deadline = deadline
        self.timeout = timeout  # --timeout, for messages
        self.rng = random.Random()
        # -tls-no-verify fetches each certificate with a blocking handshake: a thread for each instance
        # checked at once, not asyncio's default pool, which has fewer (a fetch queued there would
        # spend its -connect-timeout waiting for a thread).
        self._fetchers: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(concurrency, thread_name_prefix="tls-fetch") if plan.tls_no_verify else None)

    def close(self) -> None:
        """Let the certificate fetches end on their own (each within -connect-timeout); start no more."""
        if self._fetchers is not None:
            self._fetchers.shutdown(wait=False, cancel_futures=True)

    def late(self, instance: Instance) -> InstanceResult:
        """The result of an instance whose turn never came before the deadline."""
        return InstanceResult(instance, error=f"not checked: --timeout {dial.format_duration(self.timeout)} "
                                              "ran out before its turn")

    def time_left(self) -> float:
        """Seconds left before the run's deadline (negative once it has passed)."""
        return self.deadline - asyncio.get_running_loop().time()

    async def check(self, instance: Instance) -> InstanceResult:
        """Connect (retrying), ask, and close; never raises for anything the instance does."""
        result = InstanceResult(instance)
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout_at(self.deadline + _BACKSTOP):
                await self._attempts(instance, result)
        except TimeoutError:  # a step that outlived its own limit: never seen, but the run must end
            ran_out = f"--timeout {dial.format_duration(self.timeout)} ran out"
            result.error = f"{ran_out} during a call" if result.reached else f"no connection before {ran_out}"
            result.call_failed = result.reached  # a call cut short is a failed call, whatever the others said
        except Exception as exc:  # grpc's own failures outside a status (e.g. a refused call batch)
            # One instance's surprise is that instance's failed call, never the end of the run.
            result.error, result.call_failed = f"check failed: {type(exc).__name__}: {exc}", True
            result.reached = True
        result.elapsed_seconds = asyncio.get_running_loop().time() - started
        return result

    async def _attempts(self, instance: Instance, result: InstanceResult) -> None:
        for retry in range(self.plan.retries + 1):
            if self.time_left() <= 0:
                result.error = f"no connection before --timeout {dial.format_duration(self.timeout)} ran out"
                return
            result.attempts += 1
            reason = await self._attempt(instance, result)
            if reason is None:
                return
            result.error = reason
            wait = pause(retry, self.rng)
            if retry == self.plan.retries or wait >= self.time_left():
                return
            await asyncio.sleep(wait)

    async def _security(self, instance: Instance, timeout: float) -> tuple[Any, list[tuple[str, Any]]]:
        """The channel credentials (None: plaintext) and TLS options for ``instance``."""
        plan = self.plan
        if plan.tls is None:
            return None, []
        if plan.tls_no_verify:
            from petsage_grpc.tls import trust_presented_certificate

            # A blocking fetch of the certificate the instance presents: off the event loop.
            credentials, options = await asyncio.get_running_loop().run_in_executor(
                self._fetchers, trust_presented_certificate, instance.address, timeout, plan.tls, dial.FLAG_NAMES)
            return credentials, options
        # The name the certificate must carry: -tls-server-name, else the DNS name the instance was found under.
        name = plan.tls.server_name or instance.server_name
        return plan.credentials, [("grpc.ssl_target_name_override", name)] if name else []

    async def _attempt(self, instance: Instance, result: InstanceResult) -> str | None:
        """One connection and, once connected, every call; the reason when there was no connection."""
        import grpc

        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = max(0.0, min(self.plan.connect_timeout, self.time_left()))
        try:
            credentials, tls_options = await self._security(instance, budget)
        except TimeoutError as exc:
            return f"no TLS handshake within {dial.format_duration(budget)}: {exc}"
        options = [("grpc.primary_user_agent", self.plan.user_agent), ("grpc.use_local_subchannel_pool", 1),
                   ("grpc.initial_reconnect_backoff_ms", _ONE_TRY_MS), ("grpc.min_reconnect_backoff_ms", _ONE_TRY_MS),
                   ("grpc.max_reconnect_backoff_ms", _ONE_TRY_MS), *tls_options]
        compression = grpc.Compression.Gzip if self.plan.gzip else None
        channel = (grpc.aio.insecure_channel(instance.channel_target, options=options, compression=compression)
                   if credentials is None else
                   grpc.aio.secure_channel(instance.channel_target, credentials, options=options,
                                           compression=compression))
        try:
            connected = await _connect(channel, budget - (loop.time() - started))
            if connected is None:
                return f"no connection within {dial.format_duration(budget)}"
            connect_seconds = loop.time() - started
            reason = await _Calls(self, channel, result, connected).run()
            if reason is None:
                result.connect_seconds, result.latency_seconds = connect_seconds, loop.time() - started
            return reason
        finally:
            await channel.close()


async def _connect(channel: grpc.aio.Channel, timeout: float) -> bool | None:
    """Wait until ``channel`` connects (True) or its connection fails (False); None after ``timeout``."""
    import grpc

    ready, failed = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            state = channel.get_state(try_to_connect=True)
            while state not in (ready, failed):
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return None
    return state is ready


class _Calls:
    """The calls of one connected attempt, in order: health (Check each name, or List), then SmokeTest."""

    def __init__(self, checker: Checker, channel: grpc.aio.Channel, result: InstanceResult, connected: bool) -> None:
        self.checker, self.channel, self.result = checker, channel, result
        self.connected = connected  # False: the connection failed; the first call says why

    async def _call(self, method: Any, request: Any) -> tuple[Any, Reply]:
        """One call within its deadline: the answer (None if it failed) and the reply's timing and failure."""
        import grpc

        loop = asyncio.get_running_loop()
        timeout = min(self.checker.plan.rpc_timeout, self.checker.time_left())
        if timeout <= 0:
            return None, Reply(code="DeadlineExceeded", error="DeadlineExceeded: no time left within --timeout",
                               rpc_seconds=0.0)
        started = loop.time()
        try:
            answer = await method(request, timeout=timeout, metadata=self.checker.plan.metadata)
        except grpc.aio.AioRpcError as exc:
            code: grpc.StatusCode = exc.code()
            details = (f"no answer within {dial.format_duration(timeout)}"
                       if code == grpc.StatusCode.DEADLINE_EXCEEDED else exc.details() or "")
            return None, Reply(code=go_name(code), error=f"{go_name(code)}: {details}",
                               rpc_seconds=loop.time() - started)
        return answer, Reply(rpc_seconds=loop.time() - started)

    def _unreached(self, reply: Reply) -> str | None:
        """After a failed connection, the first call fails at once with grpc's reason: that reason."""
        if self.connected:
            return None
        if reply.code == "Unavailable" and reply.error is not None:
            reason = dial.connection_error(reply.error.removeprefix("Unavailable: "))
            # "ipv4:10.0.0.7:50051: Connection refused": every line that shows the reason names the address.
            return _GRPC_ADDRESS.sub("", reason)
        self.connected = True  # grpc reconnected after all, and the server answered
        return None

    async def run(self) -> str | None:
        """Every call; the connection's failure reason if there was none, else None (answers in the result)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        plan, result = self.checker.plan, self.result
        health = health_pb2_grpc.HealthStub(self.channel)
        result.health, result.smoke, result.call_failed = [], None, False
        if plan.list_all:
            answer, reply = await self._call(health.List, health_pb2.HealthListRequest())
            if (reason := self._unreached(reply)) is not None:
                return reason
            result.reached = True
            if answer is None:
                result.call_failed, result.error = True, f"health List failed: {reply.error}"
            else:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name
                result.health = [HealthReply(status=name(entry.status), rpc_seconds=reply.rpc_seconds, service=service)
                                 for service, entry in sorted(answer.statuses.items())]
                result.error = None if result.health else "health List named no services"
        else:
            for service in plan.services:
                answer, reply = await self._call(health.Check, health_pb2.HealthCheckRequest(service=service))
                if (reason := self._unreached(reply)) is not None:
                    return reason
                result.reached = True
                status = None if answer is None else health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                result.health.append(HealthReply(status=status, code=reply.code, error=reply.error,
                                                 rpc_seconds=reply.rpc_seconds, service=service))
            result.error = None
        if plan.smoke:
            result.smoke = await self._smoke()
        return None

    async def _smoke(self) -> SmokeReply:
        from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc

        stub = smoke_pb2_grpc.SmokeTestServiceStub(self.channel)
        answer, reply = await self._call(stub.SmokeTest, smoke_pb2.SmokeTestRequest())
        smoke = SmokeReply(code=reply.code, error=reply.error, rpc_seconds=reply.rpc_seconds)
        if answer is not None:
            smoke.status, smoke.message = smoke_pb2.Status.Name(answer.status), answer.message
            if answer.HasField("server"):  # absent from a server run with --smoke-details status
                smoke.instance_id, smoke.version = answer.server.instance_id, answer.server.version
            smoke.failing_checks = [
                {"name": check.name, "status": smoke_pb2.Status.Name(check.status), "detail": check.detail,
                 "critical": check.critical}
                for check in answer.checks if check.status != smoke_pb2.STATUS_OK
            ]
        return smoke
