"""PetSage health and smoke-test service over gRPC.

The package serves ``petsage.smoke.v1.SmokeTestService``, the standard
``grpc.health.v1.Health`` service and server reflection from one process, and
ships the ``petsage-grpc`` command (``serve`` and ``smoke``).  Nothing here
configures logging, reads the environment or installs signal handlers at
import time: only :func:`petsage_grpc.cli.main` does.
"""

__version__ = "0.1.0"
