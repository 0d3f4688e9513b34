"""The health model: checks, their runner, the published statuses, ``grpc.health.v1`` and the watchdog.

It knows nothing of the grpc server that serves it.  A service embedding
the server defines its own checks with the two names handed on here::

    from petsage_grpc.health import Check, CheckFailed
"""

from petsage_grpc.health.checks import Check, CheckFailed

__all__ = ["Check", "CheckFailed"]
