"""A PetSage gRPC server, ours or a service's own: what it serves, and its lifecycle.

Lifecycle: bind (failing fast on a taken port), run every check once, publish
statuses, serve.  On the first SIGTERM/SIGINT: every status but liveness goes
NOT_SERVING; the server keeps serving for ``drain`` seconds, so probes and
client-side watchers see it; then open Watch streams end with UNAVAILABLE,
new calls are refused with UNAVAILABLE (health checks excepted: they keep
answering), in-flight calls get ``grace`` seconds, callers the same grace to
stop arriving; then stop and exit 0.  A second signal ends the process at once
(:mod:`petsage_grpc.server.process`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from petsage_grpc.health.checks import Check
from petsage_grpc.health.statuses import LIVENESS, SERVING
from petsage_grpc.logs.pipeline import LogPipeline
from petsage_grpc.server.binding import check_bindable
from petsage_grpc.server.running import Register, Running, Servicer
from petsage_grpc.server.smoke import new_instance_id
from petsage_grpc.settings import ServeSettings, SettingError

if TYPE_CHECKING:
    from petsage_grpc.server.certificates import ServerCertificate

_LOGGER = logging.getLogger(__package__)
#: Before grpcio's stop(), how long no call may have arrived (see Gate.wait_quiet).
QUIET_PERIOD = 0.2
#: The grace handed to grpcio's stop() once our own waiting is over.
STOP_GRACE = 0.5
#: How long new calls are held before grpcio's stop(): longer than a persistent caller's pause
#: between calls, so that each has a call held (one in flight) when stop() runs.
HOLD = 0.2


class PetSageServer:
    """A gRPC server with the PetSage health model: checks, health, smoke test, drain.

    Add servicers and checks, then run it with :func:`petsage_grpc.server.run`
    (or ``await start()`` and ``await shutdown()`` under your own loop).  Each
    added servicer's service gets a health status: SERVING while the checks
    it names pass (or, by default, while the server is ready), NOT_SERVING
    from the first signal on.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.instance_id = new_instance_id()
        self.address: str | None = None  # the bound address, once started
        self.http_address: str | None = None  # the bound HTTP address, once started (with --http-address)
        self._checks: list[Check] = []
        self._servicers: list[Servicer] = []
        self._running: Running | None = None

    def add_check(self, check: Check) -> None:
        """Run ``check`` in the background; a failing critical check turns readiness NOT_SERVING."""
        self._require_not_started()
        self._checks.append(check)

    def add_servicer(self, register: Register, servicer: object, *, checks: Sequence[str] | None = None) -> None:
        """Serve ``servicer``, registered by its generated ``add_<Service>Servicer_to_server``.

        Its calls are refused with UNAVAILABLE once shutdown begins, and
        waited for.  Its health status follows ``checks`` (SERVING while all
        of them pass) or, when ``checks`` is None, readiness.
        """
        self._require_not_started()
        self._servicers.append(Servicer(register, servicer, None if checks is None else tuple(checks)))

    def publish(self, service: str, serving: bool, reason: str = "") -> None:
        """Set the status of a name no servicer or check owns (event loop thread, after start)."""
        self._started().publish(service, serving, reason)

    @functools.cached_property
    def certificate(self) -> ServerCertificate | None:
        """The TLS certificate the settings name (None: plaintext), loaded on first use, once.

        Raises :class:`~petsage_grpc.settings.SettingError` naming an unusable file.
        """
        settings = self.settings
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        from petsage_grpc import tls  # only TLS servers pay for importing ssl and cryptography
        from petsage_grpc.server.certificates import ServerCertificate

        try:
            return ServerCertificate(settings.tls_cert, settings.tls_key, settings.tls_client_ca,
                                     settings.tls_expiry_warning)
        except tls.TLSError as exc:
            raise SettingError(str(exc)) from None

    def _require_not_started(self) -> None:
        if self._running is not None:
            raise RuntimeError("add servicers and checks before the server starts")

    def _started(self) -> Running:
        if self._running is None:
            raise RuntimeError("the server has not started")
        return self._running

    async def start(self, pipeline: LogPipeline, *, address: str | None = None, http_address: str | None = None,
                    share_port: bool = False) -> str:
        """Bind, run every check once, publish statuses and start serving.

        ``address`` and ``http_address`` replace the settings' addresses;
        with ``share_port`` the ports are shared with other processes on
        purpose (SO_REUSEPORT, as ``--workers`` does) instead of checked to
        be free.  Both listeners are bound before either serves: a port that
        cannot be had stops the start.  Returns the gRPC address actually
        bound (port 0 replaced by the chosen port), as :attr:`address`; the
        HTTP one is :attr:`http_address`.
        """
        self._require_not_started()
        settings = self.settings
        address = settings.address if address is None else address
        http_address = settings.http_address if http_address is None else http_address
        certificate = self.certificate
        if not share_port:
            check_bindable(address)
            if http_address is not None:
                check_bindable(http_address, "HTTP ")
        running = self._running = Running(settings, pipeline, instance_id=self.instance_id, checks=self._checks,
                                          servicers=self._servicers, share_port=share_port, certificate=certificate)
        self.address = running.listen(address, None if certificate is None else certificate.credentials())
        if running.http is not None and http_address is not None:
            tls = None if certificate is None else certificate.ssl_context()
            self.http_address = await running.http.start(http_address, tls=tls, share_port=share_port)
        # Liveness depends on nothing outside the process; the watchdog owns it from now on.
        running.health.set(LIVENESS, SERVING, "process started")
        running.watchdog.start()
        await running.runner.start()
        await running.server.start()
        if running.http is not None:
            await running.http.start_serving()
        return self.address

    async def shutdown(self) -> None:
        """Drain and stop as described in the module docstring, logging each step's timing."""
        running = self._started()
        drain, grace = self.settings.drain, self.settings.grace
        started = time.monotonic()
        running.health.drain()
        _LOGGER.info("draining: statuses NOT_SERVING (liveness excepted); still serving for %gs", drain)
        if drain:
            await asyncio.sleep(drain)
            _LOGGER.info("drain over after %.3fs", time.monotonic() - started)
        gate = running.gate
        watchers = running.health.watchers
        running.health.end_watches()
        gate.close()
        closed = time.monotonic()
        _LOGGER.info("%d Watch stream(s) ended, new calls refused; waiting up to %gs for %d call(s) in flight",
                     watchers, grace, gate.in_flight)
        if await gate.wait_idle(grace):  # timed from here: the drain is no part of the grace
            _LOGGER.info("in-flight calls finished %.3fs after new calls were refused", time.monotonic() - closed)
        else:
            _LOGGER.warning("grace period of %gs over; cancelling %d call(s)", grace, gate.in_flight)
        remaining = max(0.0, grace - (time.monotonic() - closed))
        if not await gate.wait_quiet(QUIET_PERIOD, remaining):
            _LOGGER.warning("calls still arriving at the end of the grace period; stopping anyway")
        _LOGGER.info("%d call(s) refused with UNAVAILABLE during shutdown", gate.refused)
        # Every tracked call is done; what grpcio still runs is an untracked
        # stream (reflection) or a call that arrived this instant.
        # Callers still calling get their next call held, unanswered: once each has one, nothing of
        # theirs waits inside grpc, whose stop() would answer it CANCELLED (grpc/grpc#41785).
        gate.hold()
        await asyncio.sleep(HOLD)
        last = min(STOP_GRACE, max(0.0, grace - (time.monotonic() - closed)))
        stopping = asyncio.gather(running.server.stop(last),
                                  *([] if running.http is None else [running.http.close(last)]))
        await asyncio.sleep(0)  # stop() sends GOAWAY: the held callers' next calls go elsewhere
        gate.release()
        await stopping
        if gate.held:
            _LOGGER.info("%d call(s) held until the listener stopped, then answered", gate.held)
        await running.runner.stop()
        await running.watchdog.stop()
        if running.observer.unlogged_probe_calls:
            _LOGGER.info("%d probe call(s) answered and left out of the access log",
                         running.observer.unlogged_probe_calls)
        _LOGGER.info("stopped after %.3fs", time.monotonic() - started)
