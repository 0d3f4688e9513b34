"""Running a server as the whole process: logging, the event loop, signals, workers, exit code.

:func:`run` is what ``petsage-grpc serve`` does with its settings, and what a
service embedding the server calls from its own ``main``.  It is the only
place that configures logging and installs signal handlers, and the one
place that decides whether this process supervises workers, is one of them,
or serves alone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

from petsage_grpc import __version__
from petsage_grpc.codes import ExitCode
from petsage_grpc.logs.pipeline import LogPipeline
from petsage_grpc.logs.setup import configure
from petsage_grpc.logs.sinks import FileSink, Sink, StdoutSink
from petsage_grpc.logs.stderr import StderrCapture, stderr_line
from petsage_grpc.server.binding import BindError
from petsage_grpc.server.grpc_output import install as install_grpc_output
from petsage_grpc.server.lifecycle import PetSageServer
from petsage_grpc.server.supervisor import supervise
from petsage_grpc.server.workers import BEAT, HEARTBEAT_INTERVAL, READY, Worker, current_worker
from petsage_grpc.settings import SettingError, unknown_variables

_LOGGER = logging.getLogger(__package__)
#: The garbage collector's thresholds in a server process.  With Python's own (700, 10, 10), full
#: collections, which walk every live object, ran during a Watch fan-out to 10,000 streams and
#: doubled its time.  Rare full collections cure that; young collections stay small, since a
#: pause in one is a pause of every call: with (50_000, 20, 20) a Check probe's p99 under SmokeTest
#: load went from 6 ms to 60 ms.  Side by side (bench sessions, 2 rounds): these gave probe p99
#: 6-9 ms and fan-out p99 486-556 ms, against 6-10 ms and 975-1,066 ms with Python's own.
GC_THRESHOLDS = (5_000, 10, 100)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop where uvloop is installed, else asyncio's own.

    uvloop answers about a fifth more health checks per second on one core;
    every behaviour the server relies on is the same on both.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def serve(server: PetSageServer, pipeline: LogPipeline, worker: Worker | None = None) -> int:
    """Run ``server`` until a signal (or, as ``worker``, its supervisor's exit); return the exit code."""
    loop = asyncio.get_running_loop()
    _LOGGER.info("petsage-grpc %s starting (instance %s, logging to %s)",
                 __version__, server.instance_id, ", ".join(s.name for s in pipeline.sinks))
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        # Called by the loop (add_signal_handler), not in signal context: logging is safe.
        if stopping.is_set():
            stderr_line(f"petsage-grpc: second {signal.Signals(signum).name}: exiting at once")
            os._exit(128 + signum)
        _LOGGER.info("received %s: shutting down (drain %gs, grace %gs)",
                     signal.Signals(signum).name, server.settings.drain, server.settings.grace)
        stopping.set()

    def on_hangup() -> None:
        pipeline.reopen()  # done by the writer before it writes the line below
        files = pipeline.files
        _LOGGER.info("received SIGHUP: %s", f"reopened {', '.join(files)}" if files
                     else "no log file to reopen (logging to stdout only)")

    def on_orphaned(fd: int) -> None:
        loop.remove_reader(fd)
        if not stopping.is_set():
            _LOGGER.warning("the supervising process has gone: shutting down")
            stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if worker is not None:
        loop.add_reader(worker.lifeline_fd, on_orphaned, worker.lifeline_fd)
    try:
        if worker is None:
            address = await server.start(pipeline)
        else:  # the ports its supervisor reserved, shared with the other workers
            address = await server.start(pipeline, address=worker.address, http_address=worker.http_address,
                                         share_port=True)
        if server.http_address is not None:
            scheme = "http" if server.settings.tls_cert is None else "https"
            _LOGGER.info("HTTP health on %s://%s%s", scheme, server.http_address,
                         " (metrics at /metrics)" if server.settings.metrics else "")
        # What start-up made lives as long as the process: out of every later collection's walk.
        # Collected first, so that no garbage of start-up is frozen with it for good.
        gc.collect()
        gc.freeze()
        if worker is None:
            _LOGGER.info("serving on %s", address)
        else:
            _LOGGER.info("ready on %s", address)
            worker.report(READY)
            _beat(loop, worker)
        await stopping.wait()
        await server.shutdown()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        _reopen_on_hangup(pipeline)  # remove_signal_handler restored SIGHUP's default: death
    return 0


def _reopen_on_hangup(pipeline: LogPipeline) -> None:
    """Until the loop handles it, SIGHUP only asks the log files to be reopened (never ends the process)."""
    signal.signal(signal.SIGHUP, lambda signum, frame: pipeline.reopen())


def _beat(loop: asyncio.AbstractEventLoop, worker: Worker) -> None:
    """Tell the supervisor, from the event loop, that this worker is alive; again every HEARTBEAT_INTERVAL."""
    worker.report(BEAT)
    loop.call_later(HEARTBEAT_INTERVAL, _beat, loop, worker)


def run(server: PetSageServer, *, prog: str = "petsage-grpc serve") -> int:
    """Run ``server`` as the whole program and return its exit code.

    Sets up logging from the server's settings (stdout, plus ``log_file``;
    SIGHUP reopens the file, and never ends the process), reads what the
    process writes on stderr back into the log (grpc core's own lines), serves
    until SIGTERM/SIGINT (with ``workers`` > 1, supervises that many server
    processes instead, each of which runs this again), warns of misspelt
    ``PETSAGE_GRPC_*`` variables, and turns a
    log file or TLS file it cannot use (:attr:`ExitCode.USAGE`) or an
    address it cannot listen on (:attr:`ExitCode.CONNECTION`) into one line
    on stderr, prefixed ``prog``.
    """
    settings = server.settings
    worker = current_worker()
    pipeline: LogPipeline | None = None
    try:
        sinks: list[Sink] = [StdoutSink()]
        if settings.log_file is not None:
            try:
                sinks.append(FileSink(settings.log_file))
            except OSError as exc:
                raise SettingError(f"cannot open --log-file {settings.log_file!r}: {exc.strerror}") from None
        gc.set_threshold(*GC_THRESHOLDS)
        pipeline = configure(sinks, settings.log_format, settings.log_level,
                             None if worker is None else worker.name)
        _reopen_on_hangup(pipeline)
        if worker is None:  # said once, by the process the user started (a worker's own variables are known)
            for warning in unknown_variables(os.environ):
                _LOGGER.warning("%s", warning)
        install_grpc_output()
        # grpc core's own lines (on descriptor 2) go through the pipeline too, until the pipeline closes;
        # the errors below are printed once the real stderr is back.
        with StderrCapture():
            _ = server.certificate  # loaded now (and logged): bad files stop a supervisor before any worker starts
            if settings.workers > 1 and worker is None:
                return supervise(settings.address, settings.workers, settings.http_address, pipeline)
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                return runner.run(serve(server, pipeline, worker))
    except SettingError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except BindError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return ExitCode.CONNECTION
    finally:
        if pipeline is not None:
            pipeline.close()
