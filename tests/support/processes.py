"""Real processes for the tests: a ``petsage-grpc serve`` on a loopback port the OS chose, and child clients."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc

#: Deadline of every client call in the tests.
RPC_TIMEOUT = 5.0
#: How long a server gets to start or stop.
PROCESS_TIMEOUT = 15.0
SERVING_LINE = re.compile(r"serving on (\S+:\d+)")
HTTP_LINE = re.compile(r"HTTP health on (https?://\S+:\d+)")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def tool(name: str) -> str:
    """The path of a command installed by ``pip install -e '.[test]'`` (fails if absent)."""
    beside_python = Path(sysconfig.get_path("scripts")) / name
    path = str(beside_python) if beside_python.exists() else shutil.which(name)
    assert path is not None, f"{name} is missing: pip install -e '.[test]' installs it"
    return path


class LineLog:
    """Lines read from a stream by a background thread, awaitable by pattern."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._closed = stream is None
        if stream is not None:
            threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def mark(self) -> int:
        """How many lines have been read: pass it as ``wait_for(start=...)`` to skip them."""
        with self._changed:
            return len(self.lines)

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = PROCESS_TIMEOUT, start: int = 0
    ) -> re.Match[str]:
        """Block until a line (from line ``start`` on) matches ``pattern``; fail the test after ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._closed and seen == len(self.lines)):
                    raise AssertionError(f"no line matching {regex.pattern!r} in:\n" + self.text())
                self._changed.wait(remaining)

    def text(self) -> str:
        """Everything read so far."""
        with self._changed:
            return "\n".join(self.lines)


def wait_for_file_line(path: Path, pattern: str, timeout: float = PROCESS_TIMEOUT) -> re.Match[str]:
    """Poll a log file until a line matches (for servers whose stdout is not ours)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            match = regex.search(path.read_text())
            if match:
                return match
        time.sleep(0.02)
    raise AssertionError(f"no line matching {pattern!r} in {path}")


#: The repository root: the working directory of every child process, so ``tests.*`` imports.
ROOT = Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"


class ServerProcess:
    """``python -m petsage_grpc serve`` (or another ``command``) in a child process."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        stdout: int | None = subprocess.PIPE,
        address: str = "127.0.0.1:0",
        preexec_fn: Callable[[], Any] | None = None,
        wait: bool = True,
        command: Sequence[str] = (sys.executable, "-m", "petsage_grpc", "serve"),
    ) -> None:
        command = list(command)
        if address:
            command += ["--address", address]
        self.process = subprocess.Popen(
            [*command, *args], stdout=stdout, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, cwd=ROOT,
        )
        self.stdout = LineLog(self.process.stdout if stdout == subprocess.PIPE else None)
        self.stderr = LineLog(self.process.stderr)
        self.address = ""
        self.http_base: str | None = None  # found in the output by http_url, or set by whoever reads it
        self._channels: list[grpc.Channel] = []
        if wait and stdout == subprocess.PIPE:
            try:
                self.address = self.stdout.wait_for(SERVING_LINE)[1]
            except BaseException:
                self.stop()  # a server that never said it serves must not outlive the test
                raise

    @property
    def http_url(self) -> str:
        """``http://HOST:PORT`` of the server's HTTP listener (started with ``--http-address``)."""
        if self.http_base is None:
            self.http_base = self.stdout.wait_for(HTTP_LINE)[1]
        return self.http_base

    def http(self, path: str, method: str = "GET", headers: dict[str, str] | None = None,
             timeout: float = RPC_TIMEOUT) -> HttpAnswer:
        """One HTTP request to the server's HTTP listener, on a connection of its own."""
        return http_request(self.http_url + path, method, headers, timeout)

    def channel(self) -> grpc.Channel:
        """A new channel to the server, closed when the server is stopped."""
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def smoke(self, timeout: float = RPC_TIMEOUT) -> smoke_pb2.SmokeTestResponse:
        """Call SmokeTest once."""
        stub = smoke_pb2_grpc.SmokeTestServiceStub(self.channel())
        response: smoke_pb2.SmokeTestResponse = stub.SmokeTest(smoke_pb2.SmokeTestRequest(), timeout=timeout)
        return response

    def health(self, service: str, timeout: float = RPC_TIMEOUT) -> int:
        """Call Health/Check for ``service`` and return its status."""
        stub = health_pb2_grpc.HealthStub(self.channel())
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        return status

    def wait_for_health(self, service: str, status: int, timeout: float = PROCESS_TIMEOUT) -> None:
        """Watch ``service`` until it reports ``status`` (an event, not a poll)."""
        stub = health_pb2_grpc.HealthStub(self.channel())
        stream = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        seen = []
        try:
            for answer in stream:
                seen.append(answer.status)
                if answer.status == status:
                    return
        except grpc.RpcError as exc:
            raise AssertionError(f"{service!r} never reached {status}; saw {seen}: {exc}") from exc
        finally:
            stream.cancel()
        raise AssertionError(f"Watch of {service!r} ended; saw {seen}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to the server."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = PROCESS_TIMEOUT) -> int:
        """Wait for the process to exit and return its exit code."""
        return self.process.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM the server if it still runs; kill it if it does not exit in time."""
        for channel in self._channels:
            channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(PROCESS_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PROCESS_TIMEOUT)
        return self.process.returncode


def proc_status(pid: int, field: str) -> int:
    """An integer field of /proc/PID/status (``Threads``, or ``VmRSS`` in KiB)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
    assert match, text
    return int(match[1])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            stdout: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m petsage_grpc ARGS`` to completion and capture its output (stdout: to ``stdout`` if given)."""
    return subprocess.run(
        [sys.executable, "-m", "petsage_grpc", *args], stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, timeout=timeout, check=False,
    )


#: The ``start_server`` fixture: starts a server process with flags and keyword options.
Start = Callable[..., "ServerProcess"]


def child(module: str, *args: str) -> subprocess.Popen[bytes]:
    """``python -m MODULE ARGS`` (a program of tests/programs) as a child process, its output piped to us."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )


@contextmanager
def reaped(processes: list[subprocess.Popen[bytes]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Kill (by its own PID) and wait for every child process in ``processes`` on the way out."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(RPC_TIMEOUT)


@dataclass(frozen=True)
class HttpAnswer:
    """An HTTP answer: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body, parsed as JSON."""
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """The body, as UTF-8 text."""
        return self.body.decode()


def http_request(url: str, method: str = "GET", headers: dict[str, str] | None = None,
                 timeout: float = RPC_TIMEOUT, context: ssl.SSLContext | None = None) -> HttpAnswer:
    """One request with Python's own HTTP client, on a new connection; redirects are not followed."""
    parts = urllib.parse.urlsplit(url)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers or {})
        answer = connection.getresponse()
        return HttpAnswer(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
    finally:
        connection.close()
