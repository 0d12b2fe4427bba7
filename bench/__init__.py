"""``twotower bench``: servers and load generators as separate processes, ratios measured in
one run (``bench.run``), operations under load (``bench.ops``), the processes they start
(``bench.procs``) and the load generator (``bench.loadgen``)."""

from __future__ import annotations

from bench.loadgen import LoadResult, LoadRun, LoadSpec, run_load
from bench.procs import ServerProc, cpu_seconds, free_port, server, trivial_server, wait_serving

__all__ = ["LoadResult", "LoadRun", "LoadSpec", "ServerProc", "cpu_seconds", "free_port", "run_load", "server",
           "trivial_server", "wait_serving"]
