"""The open Watch streams, and who may hold how many of them.

Watch slots are capped (``max_watchers``), and a slot is worth having: a
channel that checks health on the client side holds one, and fails its calls
when it cannot get one.  So no caller may take them all:

- at the cap, a new stream takes the slot of the caller holding the most,
  if that caller holds more than the newcomer's would: first by peer address
  (where it can be told), then by connection; otherwise the newcomer is
  refused.  The stream that loses its slot ends with RESOURCE_EXHAUSTED;
- a stream on a name that has no status yet counts against a small pool of
  its own (``max_unknown``), as such names are rarely watched for real.

Refusals and evictions are counted, and logged once per peer address.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

_LOGGER = logging.getLogger(__package__)
#: Peers whose refusals have been logged, at most: a flood of new peers cannot grow the set without bound.
LOGGED_PEERS = 1024


class Watcher:
    """One open Watch stream: the service it watches, its wake-up event, who holds it, and whether it lost its slot."""

    __slots__ = ("connection", "evicted", "host", "service", "unknown", "wakeup")

    def __init__(self, service: str, connection: str, unknown: bool) -> None:
        self.service = service
        self.wakeup = asyncio.Event()
        self.connection = connection  # grpc's peer string, e.g. "ipv4:10.0.3.7:52166": one per connection
        self.host = connection.rpartition(":")[0] or connection  # the peer's address, without the port
        self.unknown = unknown  # the name had no status when the stream opened
        self.evicted = ""  # why it lost its slot, once it has


@dataclass
class Counts:
    """Watch streams turned away since the server started."""

    refused: int = 0  # at the cap, held by callers with no more than the newcomer's
    unknown_refused: int = 0  # the pool for names with no status was full
    evicted: int = 0  # ended to give their slot to a caller holding fewer


class WatcherTable:
    """The open streams and their holders; used on the event loop's thread."""

    def __init__(self, max_watchers: int, max_unknown: int) -> None:
        self.max_watchers = max_watchers
        self.max_unknown = max_unknown
        self.counts = Counts()
        self._watchers: set[Watcher] = set()
        self._by_connection: dict[str, set[Watcher]] = {}
        self._by_host: dict[str, set[str]] = {}  # the connections of each address that hold streams
        self._host_count: Counter[str] = Counter()
        self._unknown = 0
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return len(self._watchers)

    def __iter__(self) -> Iterator[Watcher]:
        return iter(self._watchers)

    def admit(self, service: str, connection: str, *, known: bool) -> Watcher | str:
        """A slot for a new stream, or why there is none (the message of its RESOURCE_EXHAUSTED)."""
        watcher = Watcher(service, connection, unknown=not known)
        if watcher.unknown and self._unknown >= self.max_unknown:
            self.counts.unknown_refused += 1
            self._log_once(watcher.host, f"at the limit of {self.max_unknown} streams on names with no status")
            return f"too many watchers of unknown services (limit {self.max_unknown})"
        if len(self._watchers) >= self.max_watchers:
            victim = self._heaviest_above(watcher)
            if victim is None:
                self.counts.refused += 1
                self._log_once(watcher.host, f"at the limit of {self.max_watchers} streams")
                return f"too many watchers (limit {self.max_watchers})"
            self._evict(victim)
        self._watchers.add(watcher)
        self._by_connection.setdefault(connection, set()).add(watcher)
        self._by_host.setdefault(watcher.host, set()).add(connection)
        self._host_count[watcher.host] += 1
        self._unknown += watcher.unknown
        return watcher

    def discard(self, watcher: Watcher) -> None:
        """A stream has ended (or lost its slot)."""
        if watcher not in self._watchers:
            return
        self._watchers.remove(watcher)
        self._unknown -= watcher.unknown
        self._host_count[watcher.host] -= 1
        if not self._host_count[watcher.host]:
            del self._host_count[watcher.host]
        held = self._by_connection[watcher.connection]
        held.discard(watcher)
        if not held:
            del self._by_connection[watcher.connection]
            self._by_host[watcher.host].discard(watcher.connection)
            if not self._by_host[watcher.host]:
                del self._by_host[watcher.host]

    def _held(self, connection: str) -> int:
        return len(self._by_connection.get(connection, ()))

    def _heaviest_above(self, newcomer: Watcher) -> Watcher | None:
        """A stream of the holder that holds the most, if it holds more than the newcomer's would.

        Addresses first (where grpc's peer names one), then the connections
        of that address: one address may be a node, a NAT or loopback.
        """
        host, held = self._host_count.most_common(1)[0]
        if host != newcomer.host and held <= self._host_count[newcomer.host] + 1:
            return None
        target = max(self._by_host[host], key=self._held)
        if host == newcomer.host and self._held(target) <= self._held(newcomer.connection) + 1:
            return None
        return next(iter(self._by_connection[target]))

    def _evict(self, victim: Watcher) -> None:
        held = self._host_count[victim.host]
        self.discard(victim)
        self.counts.evicted += 1
        victim.evicted = (f"watch slot given to a caller holding fewer: peer {victim.host} held {held} of "
                          f"{self.max_watchers}")
        victim.wakeup.set()
        self._log_once(victim.host, f"its streams give way to callers holding fewer ({held} of {self.max_watchers})")

    def _log_once(self, host: str, what: str) -> None:
        if host in self._logged or len(self._logged) >= LOGGED_PEERS:
            return
        self._logged.add(host)
        _LOGGER.warning("Watch streams of peer %s turned away: %s (logged once per peer)", host, what)
