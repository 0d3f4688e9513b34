# syntax=docker/dockerfile:1
# The petsage-grpc server image: `docker build -t ghcr.io/petsage/petsage-grpc:0.1.0 .`
# deploy/kubernetes/deployment.yaml runs it; tests/test_deploy.py lints it with hadolint
# and runs its HEALTHCHECK command against a real server.

# Builder: wheels for the project and its runtime dependencies (no test extras), so
# that compilers, build backends and pip's cache never reach the runtime image.
FROM python:3.11-slim AS builder
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the
# context); README.md is the package's long description in pyproject.toml.
COPY pyproject.toml README.md ./
COPY petsage_grpc ./petsage_grpc
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

FROM python:3.11-slim
# Log lines reach the container runtime as they are written, even from a crash.
ENV PYTHONUNBUFFERED=1
# The wheels are bind-mounted for this one step instead of copied: they never land in
# a layer.  --no-index: nothing but those wheels is installed, nothing is downloaded.
# --compile writes the bytecode now, and compileall does the same for the standard
# library (the base image ships it without .pyc files): at run time the root
# filesystem is read-only, and every start, the server's and each health probe's,
# would otherwise recompile in memory all it imports.
# Then a user and group 10001, with no home and no shell, to run as.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --no-index --find-links=/wheels \
        --compile /wheels/*.whl \
    && python3 -m compileall -q -j 0 /usr/local/lib/python3.11 \
    && groupadd --gid 10001 petsage \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin petsage
# Bytecode was compiled above; the read-only filesystem could not take more.
ENV PYTHONDONTWRITEBYTECODE=1
# glibc gives each of grpc's threads a malloc arena of its own, and every arena keeps the
# high-water mark of a burst of calls: RSS crept up burst after burst.  Two arenas hold
# repeated bursts near one burst's mark (tests/test_hostile.py measures it).
ENV MALLOC_ARENA_MAX=2
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
# gRPC (health, SmokeTest, reflection) and HTTP (/livez, /readyz, the REST smoke test, /metrics).
EXPOSE 50051 8080
# For docker and compose only: the kubelet ignores HEALTHCHECK and uses the Deployment's
# native gRPC probes.  The probe is our grpc_health_probe: exit 0 only when SERVING, and
# docker counts every other exit (the probe's 2, 3 and 4) as unhealthy.  Liveness, not
# readiness: the container is unhealthy when its event loop is stuck, not while it
# drains.  Its connect and RPC timeouts (1 s each) fit within --timeout.  The port
# must follow --address if CMD is overridden.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["petsage-grpc", "probe", "-addr", "127.0.0.1:50051", "-service", "liveness"]
ENTRYPOINT ["petsage-grpc", "serve"]
# The defaults of `docker run`; Kubernetes replaces them with the container's args.
CMD ["--address", "[::]:50051", "--http-address", "[::]:8080", "--metrics"]
