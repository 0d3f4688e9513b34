"""``petsage-grpc fleet``: check every instance behind DNS names at once, after a rollout.

``main`` reads the arguments (the probe's connection and TLS flags, in any
order with the targets), ``targets`` turns the targets into instances (A/AAAA
and SRV records, through dnspython), ``checks`` calls every instance with
bounded concurrency and retries connections, ``results`` holds what each
instance said, ``summary`` counts the outcomes and picks the exit code, and
``report`` writes the table, the JSON document and the JUnit XML file.
Nothing here imports grpc or dnspython until the arguments are valid.
"""

#: The command's name, as every line it prints begins.
PROG = "petsage-grpc fleet"
