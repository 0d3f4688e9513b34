"""Benchmark of the PetSage gRPC server against a stock grpcio server, side by side in one run.

``python -m bench`` starts ``petsage-grpc serve`` exactly as a user would and
the stock server of :mod:`bench.baseline`, alternately, each pinned to one
core; loads them with h2load (unary calls) and an asyncio client (Watch) from
another core; checks that every answer was a success; and prints one table of
figures and project/baseline ratios, also written as JSON.  See ``bench/run.py``.
"""
