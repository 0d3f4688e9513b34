"""The servers under test: started as a user starts them, pinned to a core, watched and always stopped.

Each server runs in a child process under ``taskset`` (which execs it, so the
child's PID is the server's), in a session of its own so that a Ctrl-C in the
terminal reaches the harness, whose ``finally`` stops it.  Its stdout goes to
a file, read for the ``serving on HOST:PORT`` line: port 0 everywhere.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.calls import READINESS, SERVING, check_status

ROOT = Path(__file__).resolve().parent.parent
SERVING_LINE = re.compile(rb"serving on (\S+:\d+)")
#: How long a server gets to say it serves, and to answer SERVING after that.
START_TIMEOUT = 30.0
#: How long a signalled server gets to exit before it is killed.
STOP_TIMEOUT = 30.0
#: Deadline of each readiness poll while a server starts.
POLL_TIMEOUT = 1.0
#: Pause between reads of a starting server's stdout: small against a start of about 100 ms.
POLL_INTERVAL = 0.001


@dataclass(frozen=True)
class Kind:
    """A server the benchmark can start: its key in the results, its label and its command."""

    key: str
    label: str
    argv: tuple[str, ...]


#: The project's server with default settings, as a user starts it.
PROJECT = Kind("project", "petsage-grpc", (sys.executable, "-m", "petsage_grpc", "serve", "--address", "127.0.0.1:0"))
#: The stock grpcio server of bench/baseline.py.
BASELINE = Kind("baseline", "stock sync", (sys.executable, "-m", "bench.baseline", "--address", "127.0.0.1:0"))
#: Our health service on grpcio's sync server, bench/prototype.py: the design question's other answer.
PROTOTYPE = Kind("prototype", "sync prototype",
                 (sys.executable, "-m", "bench.prototype", "--address", "127.0.0.1:0"))


def server_env() -> dict[str, str]:
    """Our environment without PETSAGE_GRPC_* variables: the benchmarked server runs on defaults."""
    return {name: value for name, value in os.environ.items() if not name.startswith("PETSAGE_GRPC_")}


def serve_flags() -> str:
    """The text of ``petsage-grpc serve --help`` (to learn which flags this version has)."""
    done = subprocess.run([*PROJECT.argv[:4], "--help"], capture_output=True, text=True, cwd=ROOT,
                          env=server_env(), timeout=60, check=False)
    return done.stdout


class Server:
    """One running server: its address, how long it took to answer SERVING, and its memory."""

    def __init__(self, kind: Kind, cpus: str, workdir: Path, extra: tuple[str, ...] = ()) -> None:
        self.kind = kind
        name = f"{kind.key}-{time.monotonic_ns()}"
        self.stdout, self.stderr = workdir / f"{name}.out", workdir / f"{name}.err"
        self.address = ""
        self.start_seconds = 0.0
        spawned = time.monotonic()
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                ["taskset", "-c", cpus, *kind.argv, *extra], stdout=out, stderr=err, cwd=ROOT,
                env=server_env(), start_new_session=True,
            )
        try:
            self.address = self._wait_for_serving_line(spawned)
            self._wait_for_readiness(spawned)
            self.start_seconds = time.monotonic() - spawned
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def _wait_for_serving_line(self, spawned: float) -> str:
        while time.monotonic() - spawned < START_TIMEOUT:
            match = SERVING_LINE.search(self.stdout.read_bytes())
            if match:
                return match[1].decode()
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind.label} exited {self.process.returncode} before serving; "
                                   f"its stderr ends:\n{self.stderr_tail()}")
            time.sleep(POLL_INTERVAL)
        raise RuntimeError(f"{self.kind.label} did not log 'serving on' within {START_TIMEOUT}s")

    def _wait_for_readiness(self, spawned: float) -> None:
        # A new connection per poll: a failed one would back off for a second.
        while check_status(self.address, READINESS, POLL_TIMEOUT) != SERVING:
            if time.monotonic() - spawned > START_TIMEOUT or self.process.poll() is not None:
                raise RuntimeError(f"{self.kind.label} never answered readiness SERVING")
            time.sleep(POLL_INTERVAL)

    def stderr_tail(self, lines: int = 5) -> str:
        """The last lines the server wrote on stderr."""
        return "\n".join(self.stderr.read_text(errors="replace").splitlines()[-lines:])

    def log_lines(self, word: str) -> list[str]:
        """The lines of the server's stdout that contain ``word``."""
        with self.stdout.open(errors="replace") as lines:
            return [line.rstrip("\n") for line in lines if word in line]

    def rss_mib(self) -> float:
        """Resident memory now (VmRSS), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to the server."""
        os.kill(self.pid, signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Wait for the server to exit; its exit code, or None if it still runs."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int | None:
        """SIGTERM the server if it runs, SIGKILL it if it does not exit in time; its exit code."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            if self.wait() is None:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        return self.process.returncode
