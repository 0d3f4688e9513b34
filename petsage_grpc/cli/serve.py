"""``petsage-grpc serve``: validate the settings, then run the server until a signal."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from petsage_grpc import settings
from petsage_grpc.codes import ExitCode


def add_parser(commands: Any) -> None:
    """Add the ``serve`` subcommand, one flag per setting, to ``commands`` (an argparse subparsers object)."""
    parser = commands.add_parser(
        "serve",
        help="run the server",
        allow_abbrev=False,
        description="Serve SmokeTestService, grpc.health.v1.Health and reflection. "
        f"Every flag may also be set by its {settings.ENV_PREFIX}<FLAG> variable; flags win.",
    )
    settings.add_arguments(parser)


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Validate settings (flags, then ``environ``), then run the server until a signal; return the exit code."""
    try:
        resolved = settings.resolve(args, environ)
    except settings.SettingError as exc:
        print(f"petsage-grpc serve: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    from petsage_grpc.server import PetSageServer
    from petsage_grpc.server import run as run_server

    return run_server(PetSageServer(resolved))
