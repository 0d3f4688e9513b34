"""The reports of a fleet run: a table for people, one JSON document, and JUnit XML for CI systems.

The JUnit file follows the schema Jenkins, GitLab and most CI systems read
(one ``testsuite``; ``testcase`` elements with ``failure`` for an answer that
did not pass and ``error`` for one that never came): a test case per target
lookup, per instance and check, and one for ``--min-instances``.
"""

from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime

from petsage_grpc.cli import output
from petsage_grpc.cli.fleet.checks import Plan
from petsage_grpc.cli.fleet.results import NOT_SERVING, RPC_FAILED, SERVING, UNREACHABLE, InstanceResult
from petsage_grpc.cli.fleet.summary import Summary, describe
from petsage_grpc.cli.fleet.targets import NO_INSTANCES, Resolution

#: The RESULT column's words for each outcome (those of the summary line).
RESULT_WORDS = {SERVING: "SERVING", NOT_SERVING: "NOT_SERVING", RPC_FAILED: "RPC failed", UNREACHABLE: "unreachable"}
#: The JUnit ``classname`` of every test case: CI systems group by it, and read a dot as a package.
CLASSNAME = "petsage-grpc.fleet"
# Characters XML 1.0 cannot carry at all, even escaped (a server's message could hold one).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def health_names(results: Sequence[InstanceResult], plan: Plan) -> list[str]:
    """The health names of the table's columns: those asked for, or every name any List gave."""
    if not plan.list_all:
        return list(plan.services)
    return sorted({reply.service for result in results for reply in result.health})


def table(results: Sequence[InstanceResult], plan: Plan, summary: Summary) -> str:
    """One row per instance (address, instance id, version, each status, latency, result), then the summary line."""
    names = health_names(results, plan)
    header = ["ADDRESS", "INSTANCE", "VERSION", *(name or '""' for name in names),
              *(["SMOKE"] if plan.smoke else []), "LATENCY", "RESULT"]
    rows = [header]
    for result in results:
        smoke = result.smoke
        statuses = {reply.service: reply.status or reply.code or "-" for reply in result.health}
        row = [result.instance.address, (smoke and smoke.instance_id) or "-", (smoke and smoke.version) or "-",
               *(statuses.get(name, "-") for name in names)]
        if plan.smoke:
            cell = "-" if smoke is None else smoke.status or smoke.code or "-"
            if smoke is not None and smoke.failing_checks:
                cell += f" ({', '.join(str(check['name']) for check in smoke.failing_checks)})"
            row.append(cell)
        rows.append([*row, _milliseconds(result.latency_seconds), RESULT_WORDS[result.outcome]])
    rows = [[output.printable(cell) for cell in row] for row in rows]  # names and ids come from the servers
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([*lines, "", summary.line()])


def instance_dict(result: InstanceResult) -> dict[str, object]:
    """One instance in the JSON document: where it is, what it said, how long it took."""
    instance, smoke = result.instance, result.smoke
    return {
        "address": instance.address, "host": instance.host, "port": instance.port, "targets": list(instance.targets),
        "outcome": result.outcome, "error": result.error, "attempts": result.attempts,
        "connect_seconds": result.connect_seconds, "latency_seconds": result.latency_seconds,
        "elapsed_seconds": result.elapsed_seconds,
        "instance_id": smoke.instance_id if smoke else None, "version": smoke.version if smoke else None,
        "health": [reply.as_dict() for reply in result.health],
        "smoke": smoke.as_dict() if smoke else None,
    }


def document(resolutions: Sequence[Resolution], results: Sequence[InstanceResult], summary: Summary,
             elapsed_seconds: float) -> dict[str, object]:
    """The ``--json`` document: every target, every instance and every answer, and the summary."""
    return {"targets": [resolution.as_dict() for resolution in resolutions],
            "instances": [instance_dict(result) for result in results],
            "summary": summary.as_dict(elapsed_seconds)}


def _case(suite: ET.Element, name: str, seconds: float | None, kind: str | None = None, type_: str = "",
          message: str = "") -> None:
    """Add a test case; ``kind`` ``failure`` or ``error`` (None: it passed) with its type and message."""
    case = ET.SubElement(suite, "testcase", name=_xml(name), classname=CLASSNAME, time=f"{seconds or 0.0:.3f}")
    if kind is not None:
        ET.SubElement(case, kind, type=_xml(type_), message=_xml(message)).text = _xml(message)


def _xml(text: str) -> str:
    return _NOT_XML.sub("\N{REPLACEMENT CHARACTER}", text)


def _instance_cases(suite: ET.Element, result: InstanceResult, plan: Plan) -> None:
    address = result.instance.address
    if not result.reached:
        names = ["health (List)"] if plan.list_all else [f'health "{name}"' for name in plan.services]
        for name in [*names, *(["SmokeTest"] if plan.smoke else [])]:
            _case(suite, f"{address} {name}", None, "error", "unreachable", describe(result))
        return
    if result.error is not None:  # --all: List failed or named no service; or --timeout cut a call short
        what = "health (List)" if plan.list_all else "calls"
        _case(suite, f"{address} {what}", None, "error" if result.call_failed else "failure", what, result.error)
    for reply in result.health:
        name = f'{address} health "{reply.service}"'
        if reply.failed:
            _case(suite, name, reply.rpc_seconds, "error", reply.code or "", reply.error or "")
        elif reply.status != "SERVING":
            _case(suite, name, reply.rpc_seconds, "failure", reply.status or "", f"answered {reply.status}")
        else:
            _case(suite, name, reply.rpc_seconds)
    smoke = result.smoke
    if smoke is not None:
        name = f"{address} SmokeTest"
        if smoke.failed:
            _case(suite, name, smoke.rpc_seconds, "error", smoke.code or "", smoke.error or "")
        elif smoke.status != "STATUS_OK":
            failing = "; ".join(f"{check['name']}: {check['status']}: {check['detail']}"
                                for check in smoke.failing_checks)
            _case(suite, name, smoke.rpc_seconds, "failure", smoke.status or "",
                  f"{smoke.message}" + (f" ({failing})" if failing else ""))
        else:
            _case(suite, name, smoke.rpc_seconds)


def junit(resolutions: Sequence[Resolution], results: Sequence[InstanceResult], plan: Plan, summary: Summary,
          started: datetime, elapsed_seconds: float) -> bytes:
    """The JUnit XML document (UTF-8): one test suite, counted as CI systems count it."""
    suite = ET.Element("testsuite", name="petsage-grpc fleet")
    properties = ET.SubElement(suite, "properties")
    for resolution in resolutions:
        ET.SubElement(properties, "property", name="target", value=_xml(resolution.target.text))
    for resolution in resolutions:
        # Nothing found is the fleet's failure; no answer, or too many to check, the check's error.
        kind = None if resolution.problem is None else "failure" if resolution.problem == NO_INSTANCES else "error"
        _case(suite, f"resolve {resolution.target.text}", None, kind, resolution.problem or "", resolution.error or "")
    for result in results:
        _instance_cases(suite, result, plan)
    if summary.min_instances:
        short = summary.reached < summary.min_instances
        _case(suite, f"at least {summary.min_instances} instance(s) answer", None, "failure" if short else None,
              "too few instances", f"{summary.reached} of {summary.instances} answered")
    cases = suite.findall("testcase")
    suite.attrib.update(tests=str(len(cases)), failures=str(sum(c.find("failure") is not None for c in cases)),
                        errors=str(sum(c.find("error") is not None for c in cases)), skipped="0",
                        time=f"{elapsed_seconds:.3f}", timestamp=started.isoformat(timespec="seconds"),
                        hostname=socket.gethostname())
    ET.indent(suite)
    text: bytes = ET.tostring(suite, encoding="utf-8", xml_declaration=True)
    return text + b"\n"
