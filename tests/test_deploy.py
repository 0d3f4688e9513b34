"""The deployment files: the Kubernetes manifests in deploy/kubernetes and the Dockerfile.

Nothing here needs a cluster, a container engine or the network.  The manifests are
validated against the Kubernetes API schemas kubernetes-validate ships, their container
args are parsed by the server's own flag parser (a typo fails), and the properties that
keep a pod alive through probes, rollouts and SIGTERM are asserted.  The Dockerfile is
linted by hadolint, its structure checked, and its HEALTHCHECK command run against a
real server started with the image's CMD.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from petsage_grpc import settings as config
from petsage_grpc.server.running import PENDING_HEADROOM
from tests.support import NOT_SERVING, ROOT, SERVING, Start, tool
from tests.support.deploy import (
    CPU,
    DOCKERFILE,
    MEMORY,
    Resource,
    container,
    container_ports,
    container_settings,
    documented_probes,
    kubelet_probe,
    last,
    load_manifests,
    on_free_ports,
    port_of,
    quantity,
    resource,
    serve_settings,
    stages,
)

DOCKERIGNORE = ROOT / ".dockerignore"
#: The oldest Kubernetes the manifests target (native gRPC probes are GA since 1.27), and the newest known.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
#: Probe kind -> the HTTP path it must ask, and the gRPC health service its documented variant asks.
PROBE_PATHS = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
PROBE_SERVICES = {"startupProbe": "liveness", "livenessProbe": "liveness", "readinessProbe": "readiness"}
#: How long the startup probe must wait at least before the kubelet gives up on a slow start.
STARTUP_BUDGET = 30
#: Seconds the kubelet should leave, beyond --drain and --grace, before its SIGKILL.
SHUTDOWN_MARGIN = 5
#: Memory measured by bench/ (README): RSS after load, one open Health/Watch stream, and headroom.
RSS_AFTER_LOAD_MIB = 48
WATCH_STREAM_KIB = 25
#: One idle connection, measured by tests/test_limits.py.
IDLE_CONNECTION_KIB = 17
#: One call grpc holds (queued for the server, or waiting for its request), measured by tests/test_hostile.py.
HELD_CALL_KIB = 25
MEMORY_HEADROOM = 1.25


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", [
    pytest.param(doc, id=f"{name}:{doc['kind']}/{doc['metadata']['name']}") for name, doc in load_manifests()
])
def test_manifest_is_valid_for_kubernetes(manifest: Resource, version: str) -> None:
    kubernetes_validate.validate(manifest, version, strict=True)


def service(name: str) -> Resource:
    """The Service called ``name`` (a fresh copy, free to change)."""
    [found] = [doc for _, doc in load_manifests() if doc["kind"] == "Service" and doc["metadata"]["name"] == name]
    return found


def test_manifests_hold_the_deployment_and_its_services() -> None:
    """The Service clients call, and the headless one that names every pod for ``petsage-grpc fleet``."""
    assert sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in load_manifests()) == [
        ("Deployment", "petsage-grpc"), ("Service", "petsage-grpc"), ("Service", "petsage-grpc-headless")]


BREAKAGES: dict[str, Callable[[Resource], None]] = {
    # A gRPC probe takes a port number; a named port is an error the API server rejects.
    "named grpc probe port": lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        livenessProbe={"grpc": {"port": "grpc", "service": "liveness"}}),
    "misspelled field": lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=30),
    "replicas as text": lambda d: d["spec"].update(replicas="2"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_validator_rejects_a_broken_deployment(breakage: str) -> None:
    broken = copy.deepcopy(resource("Deployment"))
    BREAKAGES[breakage](broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_container_args_are_flags_serve_accepts() -> None:
    settings = container_settings()
    assert (settings.address, settings.log_format) == ("[::]:50051", "json")
    assert "command" not in container(), "the image's entry point is petsage-grpc serve"


def test_probes_ask_livez_and_readyz_on_the_http_port() -> None:
    spec, settings = container(), container_settings()
    assert settings.http_address is not None and container_ports()["http"] == port_of(settings.http_address)
    for kind, path in PROBE_PATHS.items():
        probe = spec[kind]
        assert probe["httpGet"] == {"path": path, "port": "http"}, kind
        assert {"exec", "grpc", "tcpSocket"}.isdisjoint(probe), kind
        # The kubelet's whole budget for connecting and calling.
        assert probe["timeoutSeconds"] >= 1, kind
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BUDGET


def test_the_documented_grpc_probes_ask_liveness_and_readiness_on_the_grpc_port() -> None:
    spec, grpc_port = container(), port_of(container_settings().address)
    variant = documented_probes("grpc")
    assert container_ports()["grpc"] == grpc_port
    assert set(variant) == set(PROBE_PATHS)
    for kind, service in PROBE_SERVICES.items():
        assert variant[kind]["grpc"] == {"port": grpc_port, "service": service}, kind
        # The same timing as the probes in use.
        assert {k: v for k, v in variant[kind].items() if k != "grpc"} == {
            k: v for k, v in spec[kind].items() if k != "httpGet"}, kind


def test_termination_grace_exceeds_drain_plus_grace() -> None:
    settings = container_settings()
    period = resource("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert settings.drain > 0, "without --drain, load balancers learn of a shutdown from refused calls"
    assert period >= settings.drain + settings.grace + SHUTDOWN_MARGIN


def test_pod_runs_as_non_root_with_a_read_only_root_filesystem() -> None:
    pod = resource("Deployment")["spec"]["template"]["spec"]
    security = container()["securityContext"]
    for context in (pod["securityContext"], security):
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == context["runAsGroup"] == 10001
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_service_links_cannot_set_the_servers_variables() -> None:
    # Kubernetes gives every pod NAME_SERVICE_HOST, NAME_PORT, ... for each Service of its namespace.
    for _, doc in load_manifests():
        injected_prefix = doc["metadata"]["name"].upper().replace("-", "_") + "_"
        if doc["kind"] == "Service" and injected_prefix.startswith(config.ENV_PREFIX):
            assert resource("Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_resources_fit_the_idle_server_and_every_watcher() -> None:
    resources = container()["resources"]
    for name, units in (("cpu", CPU), ("memory", MEMORY)):
        assert 0 < quantity(resources["requests"][name], units) <= quantity(resources["limits"][name], units)
    settings = container_settings()
    held_calls = settings.max_watchers + PENDING_HEADROOM + settings.max_incomplete_requests
    need = (RSS_AFTER_LOAD_MIB * 2**20 + settings.max_watchers * WATCH_STREAM_KIB * 2**10
            + settings.max_connections * IDLE_CONNECTION_KIB * 2**10 + held_calls * HELD_CALL_KIB * 2**10)
    assert quantity(resources["limits"]["memory"], MEMORY) >= need * MEMORY_HEADROOM


def test_prometheus_scrapes_the_http_port() -> None:
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    settings = container_settings()
    assert settings.http_address is not None and settings.metrics, "--http-address and --metrics are not set"
    assert container_ports()["http"] == port_of(settings.http_address)
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port_of(settings.http_address)),
                           "prometheus.io/path": "/metrics"}


def test_service_selects_the_pods_and_targets_their_ports() -> None:
    deployment, clusterip = resource("Deployment"), service("petsage-grpc")
    selector = clusterip["spec"]["selector"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"] == selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert "app.kubernetes.io/name" in selector
    assert clusterip["spec"]["type"] == "ClusterIP"
    ports = container_ports()
    exposed = {port["name"]: port for port in clusterip["spec"]["ports"]}
    assert {name: port["port"] for name, port in exposed.items()} == {"grpc": 50051}
    assert exposed["grpc"]["appProtocol"] == "grpc"
    for name, port in exposed.items():
        target = port["targetPort"]
        assert (ports.get(target) if isinstance(target, str) else target) == ports[name], name


def test_headless_service_names_every_ready_pod_with_a_grpc_srv_record() -> None:
    """``fleet srv:_grpc._tcp.petsage-grpc-headless...`` needs: no virtual IP, ready pods only, a port named grpc."""
    headless, clusterip = service("petsage-grpc-headless"), service("petsage-grpc")
    spec = headless["spec"]
    assert spec["clusterIP"] == "None" and "type" not in spec  # headless: DNS answers each pod's address
    assert spec["publishNotReadyAddresses"] is False  # a pod starting or draining is no instance to check
    assert spec["selector"] == clusterip["spec"]["selector"] == resource("Deployment")["spec"]["selector"][
        "matchLabels"]
    # The SRV record _grpc._tcp.NAME exists for a port named grpc with protocol TCP, on the container's grpc port.
    [port] = spec["ports"]
    assert (port["name"], port["protocol"], port["appProtocol"]) == ("grpc", "TCP", "grpc")
    assert container_ports()[port["targetPort"]] == port_of(container_settings().address)


def test_deployment_args_serve_its_probes_and_stop_within_the_grace_period(start_server: Start) -> None:
    spec, settings = container(), container_settings()
    period = resource("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    server = start_server(*on_free_ports(spec["args"]), address="")
    server.wait_for_health("readiness", SERVING)
    grpc_variant = documented_probes("grpc")
    for kind in PROBE_PATHS:
        assert kubelet_probe(server, spec[kind]), kind
        assert kubelet_probe(server, grpc_variant[kind]), f"{kind}, documented gRPC variant"
    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    server.wait_for_health("readiness", NOT_SERVING)  # readiness probes fail while it drains...
    assert not kubelet_probe(server, spec["readinessProbe"])
    assert not kubelet_probe(server, grpc_variant["readinessProbe"])
    assert kubelet_probe(server, spec["livenessProbe"])  # ...not liveness
    assert kubelet_probe(server, grpc_variant["livenessProbe"])
    assert server.wait(timeout=period) == 0
    assert settings.drain <= time.monotonic() - signalled < period


# --- Dockerfile -------------------------------------------------------------------------------------------


def healthcheck() -> tuple[list[str], float]:
    """The HEALTHCHECK command (exec form) and its --timeout in seconds."""
    match = re.fullmatch(r"(?P<options>(?:--\S+\s+)*)CMD\s+(?P<command>.+)", last(stages()[-1], "HEALTHCHECK"))
    assert match, "HEALTHCHECK should be HEALTHCHECK [OPTIONS] CMD [...]"
    command = json.loads(match["command"])
    assert isinstance(command, list), "HEALTHCHECK CMD should be in exec form"
    timeout = re.search(r"--timeout=(\d+)s\b", match["options"])
    assert timeout, "HEALTHCHECK needs --timeout=Ns"
    return [str(arg) for arg in command], float(timeout[1])


def run_healthcheck(address: str) -> subprocess.CompletedProcess[str]:
    """Run the HEALTHCHECK command against ``address``, within the HEALTHCHECK's own timeout."""
    command, timeout = healthcheck()
    assert "-addr" in command, command
    command[command.index("-addr") + 1] = address
    return subprocess.run([tool(command[0]), *command[1:]], capture_output=True, text=True,
                          timeout=timeout, check=False)


def builder_copy_sources() -> list[str]:
    """The sources the builder stage COPYs from the build context."""
    copies = [i.value.split() for i in stages()[0] if i.keyword == "COPY"]
    return [arg for args in copies for arg in args[:-1] if not arg.startswith("--")]


def hadolint(path: Path) -> list[dict[str, Any]]:
    """hadolint's findings on ``path``."""
    result = subprocess.run([tool("hadolint"), "--no-color", "--format", "json", str(path)],
                            capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert result.stdout.startswith("["), result.stderr
    findings: list[dict[str, Any]] = json.loads(result.stdout)
    return findings


def test_dockerfile_has_no_hadolint_findings() -> None:
    assert hadolint(DOCKERFILE) == []


def test_hadolint_reports_a_final_user_root(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + "USER root\n")
    assert "DL3002" in {finding["code"] for finding in hadolint(broken)}


def test_dockerfile_builds_wheels_in_one_stage_and_installs_only_them_in_another() -> None:
    builder, *_, final = stages()
    assert all(re.fullmatch(r"python:3\.11-slim(?:@sha256:\w+)?(?: AS \w+)?", s[0].value) for s in (builder, final))
    builds = [i.value for i in builder if i.keyword == "RUN" and "pip wheel" in i.value]
    assert len(builds) == 1 and re.search(r"--wheel-dir /wheels \.$", builds[0]), builds
    installs = [i.value for i in final if i.keyword == "RUN" and "pip install" in i.value]
    assert len(installs) == 1 and {"--no-index", "--find-links=/wheels"} <= set(installs[0].split()), installs


def test_dockerfile_runs_as_the_deployments_non_root_user() -> None:
    user, _, group = last(stages()[-1], "USER").partition(":")
    assert user.isdigit() and int(user) != 0, "a numeric user lets runAsNonRoot check it"
    security = container()["securityContext"]
    assert (int(user), int(group or user)) == (security["runAsUser"], security["runAsGroup"])


def test_dockerfile_entrypoint_serves_and_exposes_the_container_ports() -> None:
    final = stages()[-1]
    assert json.loads(last(final, "ENTRYPOINT")) == ["petsage-grpc", "serve"]
    settings = serve_settings(json.loads(last(final, "CMD")))
    assert settings.http_address is not None and settings.metrics
    ports = {port_of(settings.address), port_of(settings.http_address)}
    exposed = {int(port) for i in final if i.keyword == "EXPOSE" for port in i.value.split()}
    assert ports == exposed == set(container_ports().values())
    command, _ = healthcheck()
    assert command[:2] == ["petsage-grpc", "probe"]
    assert port_of(command[command.index("-addr") + 1]) == port_of(settings.address)


def test_dockerignore_admits_what_the_builder_copies() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()[:1] not in ("", "#")]
    assert patterns[0] == "*", "an allow-list: stale build/ and *.egg-info/ must stay out of the context"
    for source in builder_copy_sources():
        assert f"!{source}" in patterns or f"!{source}/" in patterns, source


def test_builder_copies_are_enough_to_build_the_wheel(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for source in builder_copy_sources():
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(ROOT / source, context / source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    [wheel] = (tmp_path / "wheels").glob("petsage_grpc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    expected = {"petsage_grpc/cli/dispatch.py", "petsage_grpc/py.typed", "petsage_grpc/_proto/smoke/v1/smoke_pb2.py"}
    assert expected <= set(names)
    [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "petsage-grpc = petsage_grpc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_healthcheck_passes_against_a_server_run_with_the_image_cmd(start_server: Start) -> None:
    server = start_server(*on_free_ports(json.loads(last(stages()[-1], "CMD"))), address="")
    server.wait_for_health("liveness", SERVING)
    result = run_healthcheck(server.address)
    assert (result.returncode, result.stderr) == (0, "status: SERVING\n")


def test_healthcheck_fails_where_nothing_listens(refused_address: str) -> None:
    result = run_healthcheck(refused_address)
    # Docker counts any exit but 0 as unhealthy; 2 is the probe's "cannot connect".
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f'timeout: failed to connect service "{refused_address}"')
