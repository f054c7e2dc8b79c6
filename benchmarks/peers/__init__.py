"""Heddle against its peers: Celery, taskiq (taskiq-nats) and Dramatiq, same machine, same run.

Each peer gets its usual broker on the same embedded servers, its worker
started through its own CLI with its defaults, and the same three workloads as Heddle: no-op
throughput, sequential round trips, and a 100-wide fan-out/fan-in. See
``test_peers.py`` for what is measured and ``docs/benchmarks.md`` ("Against the
peers") for the figures. Needs the ``peers`` extra; without it every benchmark
here is skipped.
"""
