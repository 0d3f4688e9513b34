"""Who may hold Watch slots (health/watchers.py): the cap, fairness between callers, names with no status."""

from __future__ import annotations

from petsage_grpc.health.watchers import Watcher, WatcherTable
from tests.support.aio import run


def admitted(table: WatcherTable, connection: str, count: int, *, known: bool = True) -> list[Watcher]:
    """``count`` new streams on ``connection``; each must be admitted."""
    watchers = []
    for _ in range(count):
        watcher = table.admit("readiness", connection, known=known)
        assert isinstance(watcher, Watcher), watcher
        watchers.append(watcher)
    return watchers


def test_at_the_cap_a_caller_holding_no_more_than_others_is_refused() -> None:
    async def scenario() -> tuple[object, int]:
        table = WatcherTable(max_watchers=4, max_unknown=10)
        admitted(table, "ipv4:10.0.0.1:1000", 2)
        admitted(table, "ipv4:10.0.0.2:1000", 2)
        return table.admit("readiness", "ipv4:10.0.0.2:1000", known=True), table.counts.refused

    assert run(scenario) == ("too many watchers (limit 4)", 1)


def test_at_the_cap_a_new_address_takes_a_slot_from_the_address_holding_the_most() -> None:
    async def scenario() -> tuple[list[str], int]:
        table = WatcherTable(max_watchers=4, max_unknown=10)
        hog = admitted(table, "ipv4:10.0.0.1:1000", 4)
        newcomer = table.admit("readiness", "ipv4:10.0.0.9:2000", known=True)
        assert isinstance(newcomer, Watcher)
        return [w.evicted for w in hog], len(table)

    evictions, held = run(scenario)
    assert held == 4
    assert sorted(evictions) == ["", "", "", "watch slot given to a caller holding fewer: peer ipv4:10.0.0.1 "
                                            "held 4 of 4"]


def test_on_one_address_the_connection_holding_the_most_gives_way() -> None:
    async def scenario() -> tuple[list[str], list[str], object]:
        table = WatcherTable(max_watchers=4, max_unknown=10)
        hog = admitted(table, "ipv6:[::1]:1000", 3)
        other = admitted(table, "ipv6:[::1]:2000", 1)
        admitted(table, "ipv6:[::1]:2000", 1)  # 2 against the hog's 3: the hog gives one up
        balanced = table.admit("readiness", "ipv6:[::1]:2000", known=True)  # 2 and 2 now: refused
        return [w.evicted for w in hog], [w.evicted for w in other], balanced

    hog, other, balanced = run(scenario)
    assert sum(bool(reason) for reason in hog) == 1 and other == [""]
    assert balanced == "too many watchers (limit 4)"


def test_names_with_no_status_have_a_small_pool_of_their_own() -> None:
    async def scenario() -> tuple[object, object]:
        table = WatcherTable(max_watchers=100, max_unknown=2)
        admitted(table, "ipv4:10.0.0.1:1000", 2, known=False)
        return (table.admit("nope", "ipv4:10.0.0.1:1000", known=False),
                table.admit("readiness", "ipv4:10.0.0.1:1000", known=True))

    unknown, known = run(scenario)
    assert unknown == "too many watchers of unknown services (limit 2)"
    assert isinstance(known, Watcher)


def test_a_discarded_stream_frees_its_slot_and_its_holders_share() -> None:
    async def scenario() -> tuple[int, object]:
        table = WatcherTable(max_watchers=2, max_unknown=10)
        first, _ = admitted(table, "ipv4:10.0.0.1:1000", 2)
        table.discard(first)
        table.discard(first)  # twice: the second is a no-op
        return len(table), table.admit("readiness", "ipv4:10.0.0.1:1000", known=True)

    held, again = run(scenario)
    assert held == 1 and isinstance(again, Watcher)
