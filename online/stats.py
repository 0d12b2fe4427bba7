"""Serving statistics in one place: responses by rung, variant and reason, and
per-stage latency histograms. A metrics exporter (Prometheus) reads this
object; the service only calls ``observe``. Degraded responses are also logged,
at most once per second per rung, with how many were folded into that line."""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from online.request import RecResult

log = logging.getLogger("twotower.serve")

# Microsecond bucket upper bounds (roughly x2 apart), the last one catching everything.
# Plain lists and bisect: observe() runs once per response, and numpy's per-call overhead on
# scalars (six searchsorted calls) cost more than the rest of the bookkeeping together.
BUCKETS_US = [50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1 << 62]
STAGES = ("queue", "fetch", "combine", "search", "filter", "total")


@dataclass
class ServingStats:
    responses: Counter[tuple[str, str]] = field(default_factory=Counter)  # (variant, rung) → count
    reasons: Counter[str] = field(default_factory=Counter)
    histograms: dict[str, list[int]] = field(default_factory=lambda: {s: [0] * len(BUCKETS_US) for s in STAGES})
    _last_log: dict[str, float] = field(default_factory=dict)
    _suppressed: Counter[str] = field(default_factory=Counter)

    def observe(self, r: RecResult) -> None:
        self.responses[(r.variant, r.rung)] += 1
        timings = r.timings_us
        for stage in STAGES:
            self.histograms[stage][bisect_left(BUCKETS_US, timings.get(stage, 0))] += 1
        if r.rung == "full":
            return
        for reason in r.reasons:
            self.reasons[reason.split(":")[0]] += 1
        now = time.monotonic()
        if now - self._last_log.get(r.rung, 0.0) >= 1.0:
            extra = self._suppressed.pop(r.rung, 0)
            log.warning("degraded response rung=%s version=%s reasons=%s total_us=%d (+%d similar since last line)",
                        r.rung, r.version, "; ".join(r.reasons), r.timings_us.get("total", 0), extra)
            self._last_log[r.rung] = now
        else:
            self._suppressed[r.rung] += 1

    def rung_counts(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, rung), n in self.responses.items():
            out[rung] += n
        return dict(out)

    def total(self) -> int:
        return sum(self.responses.values())
