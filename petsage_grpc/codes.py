"""Codes every part shares: the exit codes of the commands and the server, and gRPC codes as Go spells them.

The exit codes follow grpc_health_probe's contract (0 serving, 1 bad
arguments, 2 connection failure, 3 RPC failure, 4 not serving), which
``probe`` must keep to the letter and ``smoke`` and ``serve`` share, so a
script reads every command the same way.  ``fleet``, which checks many
servers at once, adds one code of its own (5, too few instances) after
them; when several apply to it, :mod:`petsage_grpc.cli.fleet.summary`
says which one wins.  A process ended by a second signal N exits 128+N, as a shell
reports it; that is not a member here.

This module imports nothing heavy: the probe imports it before grpc.
"""

from __future__ import annotations

import enum

TYPE_CHECKING = False  # not typing's: importing typing would cost the probe milliseconds
if TYPE_CHECKING:
    import grpc


class ExitCode(enum.IntEnum):
    """How every ``petsage-grpc`` command ends."""

    #: SERVING (``probe``), status OK (``smoke``), a graceful stop (``serve``).
    OK = 0
    #: Bad arguments or settings, or a TLS or log file that cannot be used; nothing was started.
    USAGE = 1
    #: No connection (``probe``, ``smoke``), or no listening socket (``serve``: e.g. the port is taken).
    CONNECTION = 2
    #: The call failed (an error status or the deadline).
    RPC_FAILED = 3
    #: The server answered, but not SERVING (``probe``) or not OK (``smoke``).
    UNHEALTHY = 4
    #: Too few instances (``fleet``): a target resolved to nothing, or fewer than ``--min-instances`` answered.
    NO_INSTANCES = 5


#: The gRPC status codes 0..16 as grpc-go spells them.
GO_CODE_NAMES = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
                 "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
                 "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated")


def go_code_name(number: int) -> str:
    """The status code ``number`` as grpc-go spells it (``Code(17)`` for one the protocol does not define)."""
    return GO_CODE_NAMES[number] if 0 <= number < len(GO_CODE_NAMES) else f"Code({number})"


def go_name(code: grpc.StatusCode) -> str:
    """``code`` as grpc-go spells it: ``OK``, ``NotFound``, ``DeadlineExceeded``, ``Canceled``.

    grpc_health_probe prints these, and go-grpc-prometheus labels calls with them.
    """
    return go_code_name(code.value[0])
