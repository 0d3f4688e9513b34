"""A real DNS server for the tests: dnsmasq in the foreground on a free loopback port, answering the records given.

dnsmasq comes from Debian's dnsmasq-base (``/usr/sbin/dnsmasq``).  It reads
no configuration file, no /etc/hosts and no upstream servers: every name
under ``.test`` that the test did not give is NXDOMAIN, any other REFUSED.  It is ready
once it has logged its start (its sockets are bound by then) and answered a
real query; it is stopped by its own PID.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dns.message
import dns.query
import dns.rcode

from tests.support.processes import PROCESS_TIMEOUT, RPC_TIMEOUT, LineLog

DNSMASQ = shutil.which("dnsmasq", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/dnsmasq"
#: The domain the tests' names live in (a reserved top-level domain: it can never be a real one).
DOMAIN = "fleet.test"
#: Where dnsmasq answers alone: a name under it that the test did not give, or a record type it did not, is
#: NXDOMAIN or an empty answer; any other name is REFUSED (there is no upstream server to ask).
LOCAL = "test"
#: The name every server answers, so that a query can tell it is ready.
READY_NAME = f"ready.{DOMAIN}"
#: Tries at a port: another process may take the free port found between the look and dnsmasq's bind.
PORT_TRIES = 5


@dataclass
class DnsServer:
    """A running dnsmasq: ``address`` (``127.0.0.1:PORT``) for ``--dns-server``, and its log."""

    process: subprocess.Popen[bytes]
    address: str
    log: LineLog

    def stop(self) -> None:
        """SIGTERM dnsmasq (by its PID) and wait; kill it if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(PROCESS_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(PROCESS_TIMEOUT)


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 now (dnsmasq serves both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _arguments(port: int, hosts: Mapping[str, Sequence[str]], srv: Mapping[str, Sequence[tuple[str, int]]],
               txt: Sequence[str]) -> list[str]:
    arguments = [
        DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--pid-file=",
        "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}", "--log-facility=-",
        f"--local=/{LOCAL}/", f"--host-record={READY_NAME},127.0.0.1",
    ]
    # One --host-record per address: dnsmasq answers every one of a name's records.
    arguments += [f"--host-record={name},{address}" for name, addresses in hosts.items() for address in addresses]
    arguments += [f"--srv-host={name},{host},{port},0,10" for name, entries in srv.items() for host, port in entries]
    arguments += [f"--txt-record={name},no address here" for name in txt]
    return arguments


def _answers(port: int) -> bool:
    """Whether dnsmasq on ``port`` answers a query for :data:`READY_NAME`."""
    query = dns.message.make_query(READY_NAME, "A")
    response = dns.query.udp(query, "127.0.0.1", timeout=RPC_TIMEOUT, port=port)
    return response.rcode() == dns.rcode.NOERROR and bool(response.answer)


def start_dns(hosts: Mapping[str, Sequence[str]] | None = None,
              srv: Mapping[str, Sequence[tuple[str, int]]] | None = None,
              txt: Sequence[str] = ()) -> DnsServer:
    """Start dnsmasq with these records: A or AAAA per ``hosts`` address, SRV per ``srv`` entry, TXT-only names."""
    for _ in range(PORT_TRIES):
        port = _free_port()
        process = subprocess.Popen(_arguments(port, hosts or {}, srv or {}, txt), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = DnsServer(process, f"127.0.0.1:{port}", LineLog(process.stderr))
        try:
            started = server.log.wait_for(r"started, version|failed to create listening socket")
            if "started" in started.string and _answers(port):
                return server
        except BaseException:
            server.stop()  # a server that never said it started must not outlive the test
            raise
        server.stop()  # the port was taken meanwhile: try another
    raise AssertionError(f"dnsmasq did not start in {PORT_TRIES} tries:\n{server.log.text()}")
