"""The ``petsage-grpc`` command: ``serve``, ``smoke``, ``probe`` and ``fleet``, one module (or package) each.

:func:`main` is the console script's entry point; ``petsage_grpc.cli.dispatch``
dispatches to the subcommands, importing only the one that runs.
"""

from petsage_grpc.cli.dispatch import main

__all__ = ["main"]
