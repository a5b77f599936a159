"""The `cascade` command line: the one place that wires policies, calibration, upstreams
and the proxy together (every other room imports only the rooms below it)."""
