"""Running a server as the whole process: logging, the event loop, signals, workers, exit code.

:func:`run` is what ``petsage-grpc serve`` does with its settings, and what a
service embedding the server calls from its own ``main``.  It is the only
place that configures logging and installs signal handlers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from petsage_grpc import __version__, logs, workers
from petsage_grpc.binding import BindError
from petsage_grpc.config import EXIT_BAD_SETTING, SettingError
from petsage_grpc.server import PetSageServer, load_credentials
from petsage_grpc.sinks import FileSink, Sink, StdoutSink

_LOGGER = logging.getLogger(__name__)
#: Exit code of :func:`run` when it cannot listen on its address.
EXIT_CANNOT_LISTEN = 2


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


async def serve(server: PetSageServer, pipeline: logs.LogPipeline) -> int:
    """Run ``server`` until a signal (or, in a worker, its supervisor's exit); return the exit code."""
    loop = asyncio.get_running_loop()
    _LOGGER.info("petsage-grpc %s starting (instance %s, logging to %s)",
                 __version__, server.instance_id, ", ".join(s.name for s in pipeline.sinks))
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        # Called by the loop (add_signal_handler), not in signal context: logging is safe.
        if stopping.is_set():
            logs.stderr_line(f"petsage-grpc: second {signal.Signals(signum).name}: exiting at once")
            os._exit(128 + signum)
        _LOGGER.info("received %s: shutting down (drain %gs, grace %gs)",
                     signal.Signals(signum).name, server.settings.drain, server.settings.grace)
        stopping.set()

    def on_orphaned(fd: int) -> None:
        loop.remove_reader(fd)
        if not stopping.is_set():
            _LOGGER.warning("the supervising process has gone: shutting down")
            stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if server.worker is not None:
        loop.add_reader(server.worker.lifeline_fd, on_orphaned, server.worker.lifeline_fd)
    try:
        await server.start(pipeline)
        await stopping.wait()
        await server.shutdown()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def run(server: PetSageServer, *, prog: str = "petsage-grpc serve") -> int:
    """Run ``server`` as the whole program and return its exit code.

    Sets up logging from the server's settings (stdout, plus ``log_file``),
    serves until SIGTERM/SIGINT (with ``workers`` > 1, supervises that many
    server processes instead), and turns a log file or TLS file it cannot use
    (:data:`~petsage_grpc.config.EXIT_BAD_SETTING`) or an address it cannot
    listen on (:data:`EXIT_CANNOT_LISTEN`) into one line on stderr, prefixed
    ``prog``.
    """
    settings = server.settings
    pipeline: logs.LogPipeline | None = None
    try:
        if settings.tls_cert is not None:
            load_credentials(settings)  # here too, so that bad files stop a supervisor before any worker starts
        sinks: list[Sink] = [StdoutSink()]
        if settings.log_file is not None:
            try:
                sinks.append(FileSink(settings.log_file))
            except OSError as exc:
                raise SettingError(f"cannot open --log-file {settings.log_file!r}: {exc.strerror}") from None
        pipeline = logs.configure(sinks, settings.log_format, settings.log_level)
        if settings.workers > 1 and server.worker is None:
            return workers.supervise(settings.address, settings.workers)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(serve(server, pipeline))
    except SettingError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    except BindError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    finally:
        if pipeline is not None:
            pipeline.close()
