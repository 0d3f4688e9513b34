"""Entry point for ``python -m petsage_grpc``."""

from petsage_grpc.cli import main

raise SystemExit(main())
