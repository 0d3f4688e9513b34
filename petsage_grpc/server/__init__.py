"""The server: building, lifecycle and drain, the gate, handler wrapping, SmokeTest, reflection, and more.

Also the access log and metrics, the workers and the process around them.
A service embedding the server uses the two names handed on here, with
:class:`~petsage_grpc.settings.ServeSettings` and the checks of
:mod:`petsage_grpc.health`::

    from petsage_grpc.server import PetSageServer, run
"""

from petsage_grpc.server.lifecycle import PetSageServer
from petsage_grpc.server.process import run

__all__ = ["PetSageServer", "run"]
