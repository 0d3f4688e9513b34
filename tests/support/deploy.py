"""The deployment files as the tests read them: the Kubernetes manifests and the Dockerfile."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import yaml  # type: ignore[import-untyped, unused-ignore]  # PyYAML ships no types; stubs optional

from petsage_grpc import settings as config
from petsage_grpc.cli import dispatch as cli
from tests.support.processes import ROOT, SERVING, ServerProcess, http_request

Resource = dict[str, Any]
MANIFESTS = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
#: Units of Kubernetes quantities, in cores and bytes.
CPU = {"": 1.0, "m": 0.001}
MEMORY = {"": 1.0, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30}
#: Flags that name a listening address: the tests move them to free loopback ports.
ADDRESS_FLAGS = frozenset(s.flag for s in config.SETTINGS if s.name.endswith("address"))
FREE_PORT = "127.0.0.1:0"


def load_manifests() -> list[tuple[str, Resource]]:
    """Every resource of every YAML file in deploy/kubernetes, with its file name."""
    paths = sorted([*MANIFESTS.glob("*.yaml"), *MANIFESTS.glob("*.yml")])
    return [(path.name, doc) for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str) -> Resource:
    """The one resource of ``kind`` (a fresh copy, free to change)."""
    found = [doc for _, doc in load_manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {MANIFESTS}, found {len(found)}"
    return found[0]


def container() -> Resource:
    """The petsage-grpc container of the Deployment."""
    containers = resource("Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["petsage-grpc"]
    return dict(containers[0])


def serve_settings(args: Sequence[str], environ: dict[str, str] | None = None) -> config.ServeSettings:
    """Parse ``args`` as ``petsage-grpc serve`` does: an unknown flag or a bad value fails the test."""
    parsed, unknown = cli.build_parser().parse_known_args(["serve", *args])
    assert not unknown, f"flags petsage-grpc serve does not know: {unknown}"
    return config.resolve(parsed, environ or {})


def container_settings() -> config.ServeSettings:
    """The settings the container's args and env give the server."""
    spec = container()
    environ = {var["name"]: var["value"] for var in spec.get("env", [])}
    return serve_settings(spec["args"], environ)


def port_of(address: str) -> int:
    """The port of ``HOST:PORT``."""
    return int(address.rsplit(":", 1)[1])


def container_ports() -> dict[str, int]:
    """Container port name -> number."""
    return {port["name"]: port["containerPort"] for port in container()["ports"]}


def on_free_ports(args: Sequence[str]) -> list[str]:
    """``args`` with every listening address (``--flag=ADDR`` or ``--flag ADDR``) on a free loopback port."""
    moved: list[str] = []
    for arg in args:
        flag, equals, _ = arg.partition("=")
        if moved and moved[-1] in ADDRESS_FLAGS:
            moved.append(FREE_PORT)
        elif equals and flag in ADDRESS_FLAGS:
            moved.append(f"{flag}={FREE_PORT}")
        else:
            moved.append(arg)
    return moved


def quantity(value: object, units: dict[str, float]) -> float:
    """A Kubernetes quantity (``100m``, ``1``, ``256Mi``) in base units."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match and match[2] in units, f"unexpected quantity {value!r}"
    return float(match[1]) * units[match[2]]


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    value: str


def instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile, comments and parser directives left out."""
    found: list[Instruction] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            keyword, _, value = " ".join(pending).partition(" ")
            found.append(Instruction(keyword.upper(), value.strip()))
            pending = []
    return found


def stages() -> list[list[Instruction]]:
    """The Dockerfile's build stages, each from its FROM on."""
    result: list[list[Instruction]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            result.append([])
        assert result, f"{instruction.keyword} before the first FROM"
        result[-1].append(instruction)
    return result


def last(stage: list[Instruction], keyword: str) -> str:
    """The value of the stage's last ``keyword`` instruction (the one that counts)."""
    values = [i.value for i in stage if i.keyword == keyword]
    assert values, f"no {keyword} in the final stage"
    return values[-1]


def image_env() -> dict[str, str]:
    """The environment the final stage's ``ENV`` instructions give the server (``ENV KEY=VALUE`` form)."""
    found: dict[str, str] = {}
    for instruction in stages()[-1]:
        if instruction.keyword == "ENV":
            for pair in instruction.value.split():
                key, _, value = pair.partition("=")
                found[key] = value
    return found


#: Probe kinds of the Deployment's container.
PROBE_KINDS = ("startupProbe", "livenessProbe", "readinessProbe")
#: What the kubelet's HTTP prober sends (k8s.io/kubernetes/pkg/probe/http), and the statuses that pass.
KUBELET_HEADERS = {"User-Agent": "kube-probe/1.31", "Accept": "*/*"}
KUBELET_PASS = range(200, 400)


def documented_probes(kind: str) -> dict[str, Resource]:
    """The probes a comment of the Deployment documents as a variant: ``#   livenessProbe: {KIND: ...}``."""
    text = (MANIFESTS / "deployment.yaml").read_text()
    found: dict[str, Resource] = {}
    for line in text.splitlines():
        stripped = line.strip().removeprefix("#").strip()
        if line.strip().startswith("#") and stripped.startswith(PROBE_KINDS) and "{" + kind + ":" in stripped:
            found.update(yaml.safe_load(stripped))
    return found


def kubelet_probe(server: ServerProcess, probe: Resource) -> bool:
    """Whether ``probe`` passes against ``server``, judged as the kubelet does, within its timeoutSeconds.

    An ``httpGet`` probe goes to the server's HTTP listener (its named port
    is the one the test moved to a free port), a ``grpc`` one to its gRPC
    address; a connection or call that fails or times out fails the probe.
    """
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        try:
            answer = http_request(server.http_url + str(probe["httpGet"]["path"]), headers=KUBELET_HEADERS,
                                  timeout=timeout)
        except OSError:
            return False
        return answer.status in KUBELET_PASS
    try:
        return bool(server.health(str(probe["grpc"].get("service", "")), timeout=timeout) == SERVING)
    except grpc.RpcError:
        return False
