"""A service embedding the PetSage server as the README shows, with checks a test steers.

``python -m tests.programs.embedded_app --control DIR [serve flags]`` serves like
``petsage-grpc serve`` plus these checks, each steered by the file DIR/<name>
(re-read on every run, every 0.1 s):

- ``database`` (critical, async) and ``cache`` (non-critical, async): the
  file says ``ok``, ``raise <message>``, ``hang`` (await for ever: the check
  times out), ``block <seconds>`` (sleep on the event loop itself, the
  classic blocking call in async code that stalls the whole server),
  ``cancelled`` (await a task something else cancelled), ``number``
  (return 42 instead of a str) or ``leak`` (pass, but leave behind on every
  run a task that never finishes, holding a new 1 MiB buffer: each run adds
  one pending task and 1 MiB of memory).
- ``wrapped`` (non-critical): the same commands, through a plain lambda that
  returns the coroutine (``lambda: ping()``).
- ``legacy`` (non-critical, a plain function, so it runs on a thread): ``ok``,
  ``raise <message>`` or ``hang`` (never returns).
- ``publisher`` (non-critical): publishes a SERVING status for every name
  listed in DIR/publish, one per line (names no servicer owns).

A missing file means ``ok``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

from petsage_grpc import settings
from petsage_grpc.health import Check, CheckFailed
from petsage_grpc.server import PetSageServer, run

#: How often the steered checks run, and how long each may take.
INTERVAL = 0.1
TIMEOUT = 0.5
#: What ``leak`` leaves behind on each run.
LEAK_BYTES = 1 << 20
#: Kept for good: asyncio itself holds pending tasks only weakly.
_leaked: list[asyncio.Task[None]] = []


def _command(control: Path, name: str) -> tuple[str, str]:
    try:
        text = (control / name).read_text().strip()
    except FileNotFoundError:
        text = "ok"
    verb, _, rest = text.partition(" ")
    return verb, rest


async def _hold(buffer: bytes) -> None:
    """Keep ``buffer`` alive for ever (``leak``)."""
    await asyncio.Event().wait()


def _async_check(control: Path, name: str) -> Check:
    async def steered() -> str:
        verb, rest = _command(control, name)
        if verb == "raise":
            raise CheckFailed(rest)
        if verb == "hang":
            await asyncio.Event().wait()
        if verb == "block":
            (control / name).write_text("ok")  # block once, not on every run
            time.sleep(float(rest))
        if verb == "cancelled":
            other = asyncio.ensure_future(asyncio.sleep(10))
            other.cancel()
            await other
        if verb == "number":
            return 42  # type: ignore[return-value]
        if verb == "leak":
            _leaked.append(asyncio.ensure_future(_hold(b"\x01" * LEAK_BYTES)))
        return f"{name} answers"

    if name == "wrapped":
        return Check(name, lambda: steered(), interval=INTERVAL, timeout=TIMEOUT, critical=False)
    return Check(name, steered, interval=INTERVAL, timeout=TIMEOUT, critical=name == "database")


def _sync_check(control: Path, name: str) -> Check:
    def steered() -> str:
        verb, rest = _command(control, name)
        if verb == "raise":
            raise RuntimeError(rest)
        if verb == "hang":
            threading.Event().wait()
        return f"{name} answers"

    return Check(name, steered, interval=INTERVAL, timeout=TIMEOUT, critical=False)


def build(control: Path, serve_settings: settings.ServeSettings) -> PetSageServer:
    """The server with the steered checks added."""
    server = PetSageServer(serve_settings)
    for name in ("database", "cache", "wrapped"):
        server.add_check(_async_check(control, name))
    server.add_check(_sync_check(control, "legacy"))
    published: set[str] = set()

    async def publish_listed() -> str:
        path = control / "publish"
        names = path.read_text().split() if path.exists() else []
        for name in names:
            if name not in published:
                server.publish(name, serving=True, reason="listed in the control file")
                published.add(name)
        return f"{len(published)} name(s) published"

    server.add_check(Check("publisher", publish_listed, interval=INTERVAL, timeout=TIMEOUT, critical=False))
    return server


def main(argv: list[str]) -> int:
    """Parse ``--control`` and the serve flags, then run until a signal."""
    parser = argparse.ArgumentParser(prog="embedded_app")
    parser.add_argument("--control", type=Path, required=True)
    settings.add_arguments(parser)
    args = parser.parse_args(argv)
    return run(build(args.control, settings.resolve(args, os.environ)), prog="embedded_app")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
