"""What ``fleet`` checks: the targets of the command line, and the instances DNS gives for them.

A target is one of::

    NAME:PORT        every A and AAAA record of NAME, each on PORT
    srv:NAME         the SRV records of NAME (host and port), each host's A and AAAA records
    IP:PORT          an address as it is: 10.0.0.7:50051, [fd00::7]:50051

and one argument may hold several, separated by commas.  dnspython asks
``--dns-server`` or the servers of /etc/resolv.conf (with its search
domains, so a Kubernetes Job may name a Service of its own namespace by its
short name); /etc/hosts is not read.  An instance is one IP and port, however
many targets name it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    import dns.asyncresolver

#: A target's kinds, as the JSON document names them.
DNS, SRV, ADDRESS = "dns", "srv", "address"
#: What went wrong with a target: nothing found (exit code 5), no DNS answer at all (exit code 2), or more
#: instances than ``--max-instances`` (exit code 1: the run checks none of them).
NO_INSTANCES, DNS_FAILED, TOO_MANY = "no_instances", "dns_failed", "too_many"
# A DNS name as resolvers take it: labels of letters, digits, "-" and "_" (SRV labels), an optional final dot.
_NAME = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                   r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")
_DO53 = re.compile(r"^Do53:(.+)@(\d+)$")
FORMS = "NAME:PORT, srv:NAME or IP:PORT"
#: DNS queries in flight at once.
MAX_QUERIES = 16
_Found = TypeVar("_Found")


@dataclass(frozen=True)
class Target:
    """One target as given: its text, its kind, and the name, port or address it holds."""

    text: str
    kind: str
    name: str = ""  # the DNS name (DNS and SRV)
    port: int = 0  # DNS and ADDRESS
    host: str = ""  # the IP literal (ADDRESS)


def _port(text: str, target: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid target {target!r}: the port should be in 1..65535")
    return port


def parse_target(text: str) -> Target:
    """Read one target; ``ValueError`` with a one-line reason for anything else."""
    if text.startswith("srv:"):
        name = text.removeprefix("srv:")
        if not _NAME.match(name):
            raise ValueError(f"invalid target {text!r}: expected srv:NAME, e.g. srv:_grpc._tcp.petsage-grpc-headless")
        return Target(text, SRV, name=name)
    if text.startswith("unix:"):
        raise ValueError(f"invalid target {text!r}: a unix socket is one server; probe or smoke check it")
    match = _HOST_PORT.match(text)
    if match is None:
        hint = " (an IPv6 address goes in brackets: [::1]:50051)" if text.count(":") > 1 else ""
        raise ValueError(f"invalid target {text!r}: expected {FORMS}{hint}")
    host, port = match["v6"] or match["host"], _port(match["port"], text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if match["v6"] is not None or not _NAME.match(host):
            raise ValueError(f"invalid target {text!r}: {host!r} is neither an IP address nor a DNS name") from None
        return Target(text, DNS, name=host, port=port)
    return Target(text, ADDRESS, port=port, host=str(address))


def parse_targets(arguments: Sequence[str]) -> list[Target]:
    """Every target of ``arguments`` (each may list several, comma-separated), in order, repeats dropped."""
    texts = [text.strip() for argument in arguments for text in argument.split(",")]
    if any(not text for text in texts):
        raise ValueError("empty target (a stray comma?)")
    return [parse_target(text) for text in dict.fromkeys(texts)]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Instance:
    """One server to check: an IP and a port, the targets that named it, and the name TLS should expect."""

    host: str
    port: int
    targets: tuple[str, ...]
    server_name: str | None  # the DNS name it was found under (None for an IP given as it is)

    @property
    def address(self) -> str:
        """``IP:PORT``, or ``[IPv6]:PORT``."""
        return _address(self.host, self.port)

    @property
    def channel_target(self) -> str:
        """The grpc target: the address itself, so that grpc resolves nothing again."""
        return f"ipv6:{self.address}" if ":" in self.host else f"ipv4:{self.address}"


@dataclass
class Resolution:
    """What one target gave: ``(ip, port, name)`` triples, or the problem and its one-line reason."""

    target: Target
    found: list[tuple[str, int, str | None]] = field(default_factory=list)
    problem: str | None = None  # NO_INSTANCES, DNS_FAILED or TOO_MANY
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The target's entry in the JSON document."""
        return {"target": self.target.text, "kind": self.target.kind,
                "instances": list(dict.fromkeys(_address(host, port) for host, port, _ in self.found)),
                "problem": self.problem, "error": self.error}


def instances(resolutions: Sequence[Resolution]) -> list[Instance]:
    """The instances of every target, each IP and port once, in the order first found."""
    seen: dict[tuple[str, int], tuple[list[str], str | None]] = {}
    for resolution in resolutions:
        for host, port, name in resolution.found:
            named = seen.setdefault((host, port), ([], name))[0]
            if resolution.target.text not in named:
                named.append(resolution.target.text)
    return [Instance(host, port, tuple(named), name) for (host, port), (named, name) in seen.items()]


class Resolver:
    """Looks targets up with dnspython: ``server`` (``(ip, port)``) or /etc/resolv.conf, within ``timeout`` each.

    A target that gives more than ``max_instances`` instances (or SRV records) fails
    with :data:`TOO_MANY` as soon as that is known: a DNS answer can hold thousands of
    records, and an SRV name's hosts multiply them.
    """

    def __init__(self, server: tuple[str, int] | None, timeout: float, max_instances: int) -> None:
        self.server = server
        self.timeout = timeout
        self.max_instances = max_instances
        self._resolver: dns.asyncresolver.Resolver | None = None
        # An SRV name of a large fleet has a host per pod: its lookups are not all sent at once.
        self._queries = asyncio.Semaphore(MAX_QUERIES)

    def _get(self) -> dns.asyncresolver.Resolver:
        """The dnspython resolver, made on first use (reading /etc/resolv.conf can fail)."""
        import dns.asyncresolver

        if self._resolver is None:
            resolver = dns.asyncresolver.Resolver(configure=self.server is None)
            if self.server is not None:
                resolver.nameservers, resolver.port = [self.server[0]], self.server[1]
            resolver.lifetime = self.timeout
            resolver.timeout = min(resolver.timeout, self.timeout)
            self._resolver = resolver
        return self._resolver

    @property
    def where(self) -> str:
        """The DNS server asked, as messages name it."""
        return _address(*self.server) if self.server is not None else "the servers of /etc/resolv.conf"

    async def resolve(self, target: Target) -> Resolution:
        """The instances ``target`` names, or why there are none."""
        result = Resolution(target)
        if target.kind == ADDRESS:
            result.found.append((target.host, target.port, None))
            return result
        try:
            if target.kind == DNS:
                name = target.name.rstrip(".")  # as a certificate names it
                addresses = await self._addresses(target.name, search=self.server is None)
                self._bound(len(addresses), "addresses")
                result.found += [(ip, target.port, name) for ip in addresses]
            else:
                services = await self._services(target.name)
                self._bound(len(services), "SRV records")
                hosts = list(dict.fromkeys(host for host, _ in services))
                found = dict(zip(hosts, await _all(self._host(host) for host in hosts), strict=True))
                # Named as a certificate names it: without the final dot.
                result.found += [(ip, port, host.rstrip(".")) for host, port in services for ip in found[host]]
                self._bound(len(result.found), "instances")
        except _Failure as failure:
            result.problem, result.error = failure.problem, f"{target.text}: {failure}"
            result.found = []  # e.g. past --max-instances: none of them is checked
            return result
        # DNS servers rotate their answers: sorted, the table's rows stay in place from one run to the next.
        result.found.sort(key=lambda found: (ipaddress.ip_address(found[0]).version, ipaddress.ip_address(found[0]),
                                             found[1]))
        if not result.found:
            what = "A or AAAA" if target.kind == DNS else "SRV records whose hosts have A or AAAA"
            result.problem, result.error = NO_INSTANCES, f"{target.text}: {target.name} has no {what} records"
        return result

    async def _services(self, name: str) -> list[tuple[str, int]]:
        answer = await self._query(name, "SRV", search=self.server is None)
        # A target of "." means "no such service here" (RFC 2782); priority and weight choose among
        # servers for a client, while a fleet check calls every one of them.  An SRV record's host is
        # absolute: its final dot keeps the search domains out of its lookup (see _host).
        return list(dict.fromkeys((record.target.to_text(), int(record.port))
                                  for record in answer if record.target.to_text() != "."))

    def _bound(self, count: int, what: str) -> None:
        if count > self.max_instances:
            raise _Failure(TOO_MANY, f"{count} {what}, more than --max-instances {self.max_instances}")

    async def _host(self, host: str) -> list[str]:
        """The addresses of an SRV record's host (absolute, so never searched); none if it has none."""
        try:
            return await self._addresses(host, search=False)
        except _Failure as failure:
            if failure.problem == NO_INSTANCES:
                return []
            raise

    async def _addresses(self, name: str, search: bool) -> list[str]:
        """Every A and AAAA address of ``name`` (none, if it has neither)."""
        answers = await _all([self._query(name, "A", search), self._query(name, "AAAA", search)])
        return list(dict.fromkeys(record.to_text() for answer in answers for record in answer))

    async def _query(self, name: str, rdtype: str, search: bool) -> list[Any]:
        """The records of one type; none for a name without them; :class:`_Failure` for no such name or no answer."""
        import dns.exception
        import dns.resolver

        try:
            async with self._queries:
                # search: the system's search domains, as getaddrinfo would try them (dnspython's default is not).
                answer = await self._get().resolve(name, rdtype, search=search)
        except dns.resolver.NoAnswer:
            return []
        except dns.resolver.NXDOMAIN:
            raise _Failure(NO_INSTANCES, f"no such name in DNS: {name}") from None
        except dns.resolver.NoNameservers as exc:  # e.g. SERVFAIL or REFUSED from every server
            raise _Failure(DNS_FAILED, f"no DNS server could answer for {name} ({_servers_said(exc)})") from None
        except dns.exception.Timeout:
            raise _Failure(DNS_FAILED, f"no answer from {self.where} for {name} within {self.timeout:g}s") from None
        except dns.resolver.NoResolverConfiguration as exc:
            raise _Failure(DNS_FAILED, f"cannot read the system's DNS settings (/etc/resolv.conf): {exc}") from None
        except dns.exception.DNSException as exc:
            raise _Failure(DNS_FAILED, f"cannot look up {name}: {exc}") from None
        return list(answer)


async def _all(lookups: Iterable[Awaitable[_Found]]) -> list[_Found]:
    """Every lookup's result; the first failure only once all have ended, so that none is left running."""
    results = await asyncio.gather(*lookups, return_exceptions=True)
    for outcome in results:
        if isinstance(outcome, BaseException):
            raise outcome
    return cast("list[_Found]", results)


class _Failure(Exception):
    """A lookup that found nothing (NO_INSTANCES) or got no answer (DNS_FAILED); the message says which."""

    def __init__(self, problem: str, message: str) -> None:
        super().__init__(message)
        self.problem = problem


def _servers_said(exc: Exception) -> str:
    """What each DNS server answered, e.g. ``127.0.0.1:53 answered SERVFAIL``."""
    errors = getattr(exc, "kwargs", {}).get("errors", [])
    said = []
    for server, _tcp, _port, error, *_ in errors:
        # dnspython names a server "Do53:IP@PORT" (DNS over port 53's protocol, UDP or TCP).
        plain = _DO53.match(str(server))
        said.append(f"{_address(plain[1], int(plain[2])) if plain else server} answered {error}")
    return "; ".join(dict.fromkeys(said)) or "no server to ask"


def parse_dns_server(text: str) -> tuple[str, int]:
    """``--dns-server IP[:PORT]`` (port 53 by default; ``[IPv6]:PORT``), or ``ValueError``."""
    match = _HOST_PORT.match(text)
    host, port = (match["v6"] or match["host"], int(match["port"])) if match else (text.strip("[]"), 53)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"invalid --dns-server {text!r}: expected IP or IP:PORT, e.g. 10.96.0.10:53") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid --dns-server {text!r}: the port should be in 1..65535")
    return str(address), port
