"""A real container engine for the tests: podman, a stand-in base image, and the pod's container as a podman run.

No image registry is reachable from the machines the tests run on, so
``python:3.11-slim`` is made here: Debian bookworm (the Python 3.11 of the
official image's Debian) from ``debootstrap --variant=minbase``, laid out as
the official image is (``python3`` and ``pip`` in ``/usr/local/bin``, packages
in ``/usr/local/lib/python3.11/site-packages``), imported with ``podman
import`` and kept in podman's store between runs on one machine.

Podman's configuration for the tests is a containers.conf the tests write
(``CONTAINERS_CONF``), never the machine's own: see :func:`containers_conf`.
"""

from __future__ import annotations

import json
import os
import re
import resource as rlimits
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.deploy import CPU, MEMORY, Resource, quantity
from tests.support.processes import ROOT

#: Debian packages of the engine: podman runs containers with runc (see :func:`containers_conf`), netavark
#: and aardvark-dns give them a network (netavark programs iptables), and debootstrap makes the base image.
PACKAGES = ("podman", "runc", "iptables", "netavark", "aardvark-dns", "debootstrap")
#: The base image the Dockerfile names, as podman stores the stand-in (a short name resolves to localhost/).
BASE_IMAGE = "localhost/python:3.11-slim"
#: Label of the stand-in: its recipe.  A stored image with another value is made again.
BASE_LABEL = "org.petsage.test.stand-in"
BASE_RECIPE = "debootstrap minbase bookworm; python3 python3-venv python3-pip ca-certificates; venv /usr/local; r1"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: The bundle of every certificate authority the host trusts (Debian's path).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: Seconds for steps that download (apt, debootstrap, the image build's pip).
DOWNLOAD_TIMEOUT = 600.0
#: The usual container default of open files (containerd's, podman's), when the hard limit allows it.
CONTAINER_NOFILE = 1_048_576
#: The process limit podman gives conmon, the parent of the container's process.
CONMON_NPROC = 32_768
#: Seconds for any other podman command.
PODMAN_TIMEOUT = 60.0


def install_engine() -> None:
    """Install :data:`PACKAGES` with apt when one is missing: the tests never skip for want of them."""
    missing = [name for name in PACKAGES if not _installed(name)]
    if not missing:
        return
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        done = subprocess.run(command, capture_output=True, text=True, env=environ, timeout=DOWNLOAD_TIMEOUT,
                              check=False)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}"


def _installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True,
                          timeout=PODMAN_TIMEOUT, check=False)
    return done.stdout.endswith(" installed")


def containers_conf() -> str:
    """The tests' containers.conf, for this machine's quirks.

    - runc, not crun: Debian's crun 1.8 refuses the hybrid cgroup hierarchy of these machines.
    - cgroupfs and a file events logger: there is no systemd (podman's "unable to get systemd
      connection" lines, about healthcheck timers, are noise: ``podman healthcheck run`` works).
    - nofile and nproc no higher than the hard limits the container's parent (conmon) inherits:
      runc sets them once the container has no CAP_SYS_RESOURCE left, so a higher value is
      refused ("error setting rlimit type 7: operation not permitted"), and podman's defaults
      (1048576) are higher than ``ulimit -H`` here.  Podman starts conmon with nproc at most
      :data:`CONMON_NPROC` (read from conmon's /proc/PID/limits).
    """
    nofile = rlimits.getrlimit(rlimits.RLIMIT_NOFILE)[1]
    nproc = rlimits.getrlimit(rlimits.RLIMIT_NPROC)[1]
    # RLIM_INFINITY (-1) is no bound.
    nofile = CONTAINER_NOFILE if nofile < 0 else min(nofile, CONTAINER_NOFILE)
    nproc = CONMON_NPROC if nproc < 0 else min(nproc, CONMON_NPROC)
    return (
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        "[network]\n"
        'network_backend = "netavark"\n'
    )


class Podman:
    """``podman`` with the tests' containers.conf (written to ``workdir``)."""

    def __init__(self, workdir: Path) -> None:
        conf = workdir / "containers.conf"
        conf.write_text(containers_conf())
        self.environ = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, timeout: float = PODMAN_TIMEOUT, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS`` to completion; with ``check``, a failure fails the test with podman's words."""
        done = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.environ,
                              timeout=timeout, check=False)
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
        return done

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """``podman ARGS`` as a child process, its output (both streams) piped to us."""
        return subprocess.Popen(["podman", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=self.environ)

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        """``podman KIND inspect NAME``, parsed."""
        found = json.loads(self(kind, "inspect", name).stdout)
        assert len(found) == 1, found
        return dict(found[0])


def debian_mirror() -> str:
    """The Debian mirror the machine's apt sources name for bookworm (deb822 or one-line form)."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.MULTILINE))
            if "bookworm" in fields.get("Suites", "").split() and fields.get("Types", "deb").startswith("deb"):
                return str(fields["URIs"].split()[0])
    listed = Path("/etc/apt/sources.list")
    if listed.exists():
        match = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", listed.read_text(), re.MULTILINE)
        if match:
            return match[1]
    return DEBIAN_MIRROR


def ensure_base_image(podman: Podman) -> bool:
    """Make the stand-in :data:`BASE_IMAGE` unless podman holds it already; True when it was made now."""
    stored = podman("image", "inspect", "--format", f'{{{{index .Config.Labels "{BASE_LABEL}"}}}}', BASE_IMAGE,
                    check=False)
    if stored.returncode == 0 and stored.stdout.strip() == BASE_RECIPE:
        return False
    with tempfile.TemporaryDirectory(prefix="petsage-base-", dir="/var/tmp") as work:
        rootfs = Path(work) / "rootfs"
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs),
             debian_mirror()],
            capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, check=False,
        )
        assert done.returncode == 0, f"debootstrap failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        for path in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / path, ignore_errors=True)
        # The official image's layout: Debian's own pip refuses to install into the system's Python
        # (PEP 668), and the official image's is a Python of its own under /usr/local.  A venv there
        # gives the same paths: python3 and pip in /usr/local/bin, site-packages under /usr/local/lib.
        subprocess.run(["chroot", str(rootfs), "python3", "-m", "venv", "/usr/local"], check=True,
                       capture_output=True, timeout=PODMAN_TIMEOUT)
        # pip (in the build's first stage) then trusts what the host trusts, a TLS-inspecting proxy's
        # authority among them: pip reads its own certifi bundle unless told otherwise.
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / HOST_CA_BUNDLE.relative_to("/"))
        (rootfs / "etc/pip.conf").write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["podman", "import", "--change", f"LABEL {BASE_LABEL}={json.dumps(BASE_RECIPE)}",
                 "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
                stdin=tar.stdout, capture_output=True, text=True, env=podman.environ, timeout=DOWNLOAD_TIMEOUT,
                check=False,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(PODMAN_TIMEOUT)
        assert imported.returncode == 0, f"podman import failed:\n{imported.stderr}"
    return True


def build_context(target: Path) -> Path:
    """A clean copy of the tree (every file git tracks, as it is in the working tree) in ``target``."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                            timeout=PODMAN_TIMEOUT)
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():  # a tracked file deleted in the working tree is left out
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def run_args(pod: Resource, name: str) -> list[str]:
    """``podman run`` arguments that run the pod's one container as the kubelet would run it.

    Read from the manifest: the user and group, the read-only root filesystem with
    only the pod's in-memory volumes writable, dropped capabilities, no privilege
    escalation, the memory and CPU limits, the environment and the args (after
    the image's entry point).  Every container port is published on a free
    loopback port (``podman port`` tells which).  seccomp RuntimeDefault is
    podman's default profile.
    """
    spec = pod["spec"]
    (container,) = spec["containers"]
    security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
    args = ["run", "--detach", "--name", name, "--user", f"{security['runAsUser']}:{security['runAsGroup']}"]
    if security.get("readOnlyRootFilesystem"):
        # Podman adds writable /tmp, /var/tmp and /run to a read-only container; the kubelet does not.
        args += ["--read-only", "--read-only-tmpfs=false"]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    args += [f"--cap-drop={cap}" for cap in security.get("capabilities", {}).get("drop", [])]
    args += [f"--cap-add={cap}" for cap in security.get("capabilities", {}).get("add", [])]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        empty_dir = volumes[mount["name"]].get("emptyDir")
        assert empty_dir is not None and empty_dir.get("medium") == "Memory", f"unsupported volume {mount}"
        size = int(quantity(empty_dir["sizeLimit"], MEMORY))
        args += ["--tmpfs", f"{mount['mountPath']}:rw,exec,nosuid,nodev,mode=1777,size={size}"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", str(int(quantity(limits["memory"], MEMORY)))]
    if "cpu" in limits:
        args += ["--cpus", f"{quantity(limits['cpu'], CPU):g}"]
    args += [f"--env={variable['name']}={variable['value']}" for variable in container.get("env", [])]
    args += [f"--publish=127.0.0.1::{port['containerPort']}" for port in container.get("ports", [])]
    assert "command" not in container, "the container keeps the image's entry point"
    return [*args, IMAGE_PLACEHOLDER, *container.get("args", [])]


#: Stands for the image in :func:`run_args`' result: the caller puts the image it built there.
IMAGE_PLACEHOLDER = "<image>"


def with_image(args: Sequence[str], image: str) -> list[str]:
    """``args`` of :func:`run_args` with the image put in its place."""
    return [image if arg == IMAGE_PLACEHOLDER else arg for arg in args]


def published_ports(podman: Podman, name: str) -> dict[int, int]:
    """Container port -> the loopback port of the host it is published on."""
    found: dict[int, int] = {}
    for line in podman("port", name).stdout.splitlines():
        match = re.fullmatch(r"(\d+)/tcp -> 127\.0\.0\.1:(\d+)", line.strip())
        assert match, f"unexpected podman port line {line!r}"
        found[int(match[1])] = int(match[2])
    return found
