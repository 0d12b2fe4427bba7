"""The event log's health as metrics, from the serving processes.

The nightly refresh is a batch job: it is not running when Prometheus scrapes, and a job
that never ran (the failure an operator most needs to hear about) pushes nothing. So instead
of a Pushgateway, the refresh records each run's outcome in Redis
(``RedisKeys.refresh_status``: last run, outcome, last success, entries lost) and the serving
workers, which are always scraped and already hold a Redis connection, poll that hash and the
log's state (length, bytes, the refresh group's lag and pending entries, the age of the
oldest unacknowledged entry, dead letters) every ``log_signals_s`` into gauges
(``ServingMetrics.event_log``). Every worker reports the same values; alerts take the max.
A few O(1) Redis commands per stream per poll (256 streams on a cluster).
"""

from __future__ import annotations

import logging
import time

from online.metrics import ServingMetrics
from online.polling import Poller
from online.redis_store import RedisFeatureStore

log = logging.getLogger("twotower.serve")


class LogSignals:
    def __init__(self, store: RedisFeatureStore, metrics: ServingMetrics, *, every_s: float) -> None:
        self.store, self.metrics = store, metrics
        self._poller = Poller(self.check, every_s=every_s, name="event-log-signals", log=log)

    async def check(self) -> None:
        status = await self.store.log_status(timeout=2.0)
        self.metrics.event_log(status, now=time.time())

    def start(self) -> None:
        self._poller.start()

    async def stop(self) -> None:
        await self._poller.stop()
