"""A fleet run once the arguments are valid: look the targets up, check every instance, print and write the reports.

Everything runs on one asyncio event loop (grpc.aio, dnspython's asyncio
resolver).  SIGINT and SIGTERM cancel the run at once: each instance's
channel is closed on the way out, nothing is reported, and the exit code is
128+N, as a shell reports a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

from petsage_grpc.cli import dial, output
from petsage_grpc.cli.fleet import PROG, report
from petsage_grpc.cli.fleet.checks import Checker, Plan, run_bounded
from petsage_grpc.cli.fleet.results import InstanceResult
from petsage_grpc.cli.fleet.summary import problems, summarize
from petsage_grpc.cli.fleet.targets import DNS_FAILED, Resolution, Resolver, Target, instances


def plan(args: argparse.Namespace) -> Plan:
    """What to ask each instance, from the flags; :class:`~petsage_grpc.tls.TLSError` for an unusable TLS file."""
    tls = dial.client_tls(args) if args.tls else None
    credentials = None
    if tls is not None:
        if args.tls_no_verify:
            dial.ssl_context(args)  # the client certificate and key checked now, not once per instance
        else:
            credentials = tls.credentials(dial.FLAG_NAMES)
    return Plan(services=tuple(args.service or [""]), list_all=args.all, smoke=args.smoke,
                connect_timeout=args.connect_timeout, rpc_timeout=args.rpc_timeout, retries=args.retries,
                user_agent=args.user_agent, metadata=dial.metadata(args), gzip=args.gzip, tls=tls,
                tls_no_verify=args.tls_no_verify, credentials=credentials)


async def _fleet(args: argparse.Namespace, checks: Plan, targets: list[Target], dns_server: tuple[str, int] | None,
                 stopped_by: list[int]) -> tuple[list[Resolution], list[InstanceResult]]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop(signum: int) -> None:
        stopped_by.append(signum)
        task.cancel()  # each attempt closes its channel in its finally

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    deadline = loop.time() + args.timeout
    resolver = Resolver(dns_server, min(args.dns_timeout, args.timeout), args.max_instances)
    resolutions = await _look_up(resolver, targets, deadline, args.timeout)
    checker = Checker(checks, deadline, args.timeout, args.concurrency)
    try:
        results = await run_bounded(instances(resolutions), checker.check, args.concurrency, deadline,
                                    checker.late)
    finally:
        checker.close()
    return resolutions, results


async def _look_up(resolver: Resolver, targets: list[Target], deadline: float, timeout: float) -> list[Resolution]:
    """Every target's lookup, within the run's deadline: one still running then is a DNS failure.

    Each query has its own limit, but an SRV name's host lookups queue for the
    resolver's slots one after another: only the deadline bounds them all.
    """
    lookups = [asyncio.ensure_future(resolver.resolve(target)) for target in targets]
    await asyncio.wait(lookups, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
    resolutions = []
    for target, lookup in zip(targets, lookups, strict=True):
        if lookup.done():
            resolutions.append(lookup.result())
            continue
        lookup.cancel()
        resolutions.append(Resolution(target, problem=DNS_FAILED, error=f"{target.text}: --timeout "
                                      f"{dial.format_duration(timeout)} ran out while looking it up"))
    await asyncio.gather(*lookups, return_exceptions=True)  # the cancelled ones have ended before the checks
    return resolutions


def run(args: argparse.Namespace, checks: Plan, targets: list[Target], dns_server: tuple[str, int] | None) -> int:
    """Look up and check everything, print the table or the JSON document and the problems; the exit code."""
    started, began = time.monotonic(), datetime.now(UTC)
    stopped_by: list[int] = []
    try:
        resolutions, results = asyncio.run(_fleet(args, checks, targets, dns_server, stopped_by))
    except asyncio.CancelledError:
        signum = stopped_by[0] if stopped_by else signal.SIGINT
        output.line(f"{PROG}: stopped by {signal.Signals(signum).name}: nothing reported")
        return 128 + signum
    elapsed = time.monotonic() - started
    summary = summarize(resolutions, results, args.min_instances)
    text = (json.dumps(report.document(resolutions, results, summary, elapsed)) if args.json
            else report.table(results, checks, summary))
    output.result(text, PROG)
    for line in problems(resolutions, results, summary):
        output.line(f"{PROG}: {output.printable(line)}")
    if args.junit is not None:
        try:
            Path(args.junit).write_bytes(report.junit(resolutions, results, checks, summary, began, elapsed))
        except OSError as exc:  # the outcome stays the checks', as when stdout cannot take the result
            output.line(f"{PROG}: cannot write --junit {args.junit!r}: {exc.strerror or exc}")
    return summary.exit_code
