"""The image and the pod, run for real: the Dockerfile built by podman and run as the Deployment runs it.

The project's Dockerfile, unchanged, is built from a clean copy of the tree
(``podman build --pull=never --format docker``: the docker format keeps the
HEALTHCHECK, which the OCI format drops) on a stand-in for
``python:3.11-slim`` (tests/support/container.py).  The container then runs
with the settings of deploy/kubernetes/deployment.yaml itself, and is probed
from the host as the kubelet probes it.  Not covered: the official base image
(a Debian Python 3.11 stands in for it) and a real cluster.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import SERVING, LineLog, http_request, run_cli
from tests.support.container import (
    DOWNLOAD_TIMEOUT,
    Podman,
    build_context,
    ensure_base_image,
    install_engine,
    published_ports,
    run_args,
    with_image,
)
from tests.support.deploy import (
    KUBELET_HEADERS,
    KUBELET_PASS,
    MEMORY,
    PROBE_KINDS,
    Resource,
    container,
    container_settings,
    documented_probes,
    quantity,
    resource,
)
from tests.test_deploy import healthcheck

# Building the image downloads the project's dependencies, and the first run on a machine makes the base.
pytestmark = pytest.mark.timeout(DOWNLOAD_TIMEOUT * 2)

#: Seconds a container gets to log "serving on".
START_TIMEOUT = 60.0
_names = itertools.count(1)


@dataclass(frozen=True)
class Image:
    """The image built from the Dockerfile, and what its build measured."""

    name: str
    build_seconds: float
    base_made: bool


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """podman, installed if it is missing, with the tests' containers.conf."""
    install_engine()
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """The Dockerfile built from a clean copy of the tree, with no cache; removed afterwards."""
    base_made = ensure_base_image(podman)
    context = build_context(tmp_path_factory.mktemp("context"))
    name = f"localhost/petsage-grpc:test-{os.getpid()}"
    started = time.monotonic()
    built = podman("build", "--pull=never", "--format", "docker", "--no-cache", "--layers=false", "--tag", name,
                   str(context), timeout=DOWNLOAD_TIMEOUT, check=False)
    build_seconds = time.monotonic() - started
    assert built.returncode == 0, f"podman build failed:\n{built.stdout[-6000:]}\n{built.stderr[-6000:]}"
    try:
        yield Image(name, build_seconds, base_made)
    finally:
        podman("rmi", "--force", name, check=False)


@dataclass
class Pod:
    """The Deployment's container, running in podman, its ports published on loopback."""

    podman: Podman
    name: str
    log: LineLog
    ports: dict[int, int]
    seconds_to_serving: float

    def host_port(self, port: int | str) -> int:
        """The host's loopback port for a container port, by number or by the manifest's name."""
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in container()["ports"] if p["name"] == port]
        return self.ports[int(port)]

    def exec(self, *command: str) -> tuple[int, str]:
        """Run ``command`` in the container (as the container's user): its exit code and output."""
        done = self.podman("exec", self.name, *command, check=False)
        return done.returncode, done.stdout + done.stderr

    def status(self) -> dict[str, str]:
        """/proc/1/status of the server, as fields."""
        code, text = self.exec("cat", "/proc/1/status")
        assert code == 0, text
        return dict(re.findall(r"^(\w+):\s+(.*)$", text, re.MULTILINE))


def kubelet_probe(pod: Pod, probe: Resource) -> bool:
    """Whether ``probe`` of the manifest passes, asked from the host as the kubelet asks, within its timeout."""
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        get = probe["httpGet"]
        try:
            answer = http_request(f"http://127.0.0.1:{pod.host_port(get['port'])}{get['path']}",
                                  headers=KUBELET_HEADERS, timeout=timeout)
        except OSError:
            return False
        return answer.status in KUBELET_PASS
    assert "grpc" in probe, f"a probe kind the tests do not run: {probe}"
    with grpc.insecure_channel(f"127.0.0.1:{pod.host_port(probe['grpc']['port'])}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(answer.status == SERVING)


@pytest.fixture
def pod(podman: Podman, image: Image) -> Iterator[Pod]:
    """The Deployment's container started from ``image``; removed after the test."""
    name = f"petsage-test-{os.getpid()}-{next(_names)}"
    template = resource("Deployment")["spec"]["template"]
    started = time.monotonic()
    podman(*with_image(run_args(template, name), image.name))
    logs = podman.popen("logs", "--follow", name)
    try:
        log = LineLog(logs.stdout)
        log.wait_for(r'"message": "serving on ', timeout=START_TIMEOUT)
        ports = published_ports(podman, name)
        running = Pod(podman, name, log, ports, 0.0)
        assert kubelet_probe(running, container()["startupProbe"]), log.text()
        running.seconds_to_serving = time.monotonic() - started
        yield running
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
        if logs.poll() is None:
            logs.kill()
        logs.wait(DOWNLOAD_TIMEOUT)


def test_the_dockerfile_builds_into_an_image_with_its_healthcheck_user_and_entry_point(
        podman: Podman, image: Image, record_property: Any) -> None:
    inspected = podman.inspect("image", image.name)
    config = inspected["Config"]
    command, timeout = healthcheck()
    assert inspected["Healthcheck"]["Test"] == ["CMD", *command]  # kept by the docker format
    assert inspected["Healthcheck"]["Timeout"] == timeout * 1e9
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["petsage-grpc", "serve"]
    assert set(config["ExposedPorts"]) == {f"{p['containerPort']}/tcp" for p in container()["ports"]}
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image.name).stdout)
    record_property("terminal_summary",
                    f"container image: {size / 2**20:.0f} MiB, built in {image.build_seconds:.0f} s "
                    f"(no cache; base image {'made now' if image.base_made else 'kept from an earlier run'})")


def test_every_probe_of_the_manifest_passes_from_the_host(pod: Pod, record_property: Any) -> None:
    spec = container()
    for kind in PROBE_KINDS:
        assert kubelet_probe(pod, spec[kind]), kind
    for kind, probe in documented_probes("grpc").items():  # the native gRPC probes the comments offer
        assert kubelet_probe(pod, probe), f"{kind}, documented gRPC variant"
    record_property("terminal_summary", f"container: start to first SERVING {pod.seconds_to_serving:.2f} s "
                                        "(podman run to a passing startup probe)")


def test_the_images_healthcheck_passes(pod: Pod) -> None:
    done = pod.podman("healthcheck", "run", pod.name, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_root_filesystem_refuses_writes_and_tmp_is_the_in_memory_volume(pod: Pod) -> None:
    code, output = pod.exec("python3", "-c", "open('/written-by-a-test', 'w')")
    assert code != 0 and "Read-only file system" in output, output
    code, output = pod.exec("python3", "-c", "import tempfile; tempfile.TemporaryFile().write(b'x')")
    assert code == 0, output
    (volume,) = resource("Deployment")["spec"]["template"]["spec"]["volumes"]
    size_kib = int(quantity(volume["emptyDir"]["sizeLimit"], MEMORY)) // 1024
    code, mounts = pod.exec("cat", "/proc/mounts")
    assert re.search(rf"^\S+ /tmp tmpfs rw,\S*size={size_kib}k", mounts, re.MULTILINE), mounts


def test_the_server_runs_as_the_manifests_user_with_no_privileges(pod: Pod) -> None:
    security = container()["securityContext"]
    status = pod.status()
    assert status["Uid"].split() == [str(security["runAsUser"])] * 4
    assert status["Gid"].split() == [str(security["runAsGroup"])] * 4
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter: podman's default profile, the RuntimeDefault of the manifest


def test_smoke_test_and_logging_check_answer_ok_in_the_read_only_container(
        pod: Pod, record_property: Any) -> None:
    address = f"127.0.0.1:{pod.host_port('grpc')}"
    done = run_cli("smoke", "-addr", address, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    checks = {check["name"]: check["status"] for check in json.loads(done.stdout)["checks"]}
    assert checks["logging"] == "STATUS_OK", done.stdout
    answer = http_request(f"http://127.0.0.1:{pod.host_port('http')}/api/v1/smoke-test/")
    assert answer.status == 200 and answer.json()["status"] == "ok", answer.text
    limit = quantity(container()["resources"]["limits"]["memory"], MEMORY)
    rss = int(pod.status()["VmRSS"].split()[0]) * 1024
    assert rss < limit / 2, f"RSS {rss / 2**20:.0f} MiB against a limit of {limit / 2**20:.0f} MiB"
    record_property("terminal_summary", f"container: RSS {rss / 2**20:.0f} MiB after a SmokeTest, "
                                        f"against the manifest's memory limit of {limit / 2**20:.0f} MiB")


def test_sigterm_drains_with_readiness_failing_and_liveness_passing_then_exits_zero(pod: Pod) -> None:
    spec, drain = container(), container_settings().drain
    grace = resource("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    mark = pod.log.mark()
    signalled = time.monotonic()
    stopper = pod.podman.popen("stop", "--time", str(grace), pod.name)  # SIGTERM, then SIGKILL after grace
    try:
        pod.log.wait_for(r"received SIGTERM: shutting down", start=mark)
        assert not kubelet_probe(pod, spec["readinessProbe"])
        assert kubelet_probe(pod, spec["livenessProbe"])
        grpc_variant = documented_probes("grpc")
        assert not kubelet_probe(pod, grpc_variant["readinessProbe"])
        assert kubelet_probe(pod, grpc_variant["livenessProbe"])
        stopper.wait(grace + START_TIMEOUT)
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait()
    stopped = time.monotonic() - signalled
    assert stopper.returncode == 0
    assert pod.podman.inspect("container", pod.name)["State"]["ExitCode"] == 0
    assert drain <= stopped < grace, f"stopped {stopped:.1f} s after SIGTERM (drain {drain} s, grace {grace} s)"
    pod.log.wait_for(r'"message": "stopped after ', start=mark)

