"""``petsage-grpc probe``: grpc_health_probe in Python.

``main`` parses the arguments (grpc_health_probe's flags and rules),
``run`` connects, checks and reports, ``wire`` speaks the two tiny health
messages without protobuf, and ``stop`` turns SIGTERM and SIGINT into a flag
the waits look at.  Nothing here imports grpc until the arguments are valid.
"""
