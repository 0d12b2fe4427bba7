"""The exposure log: who was served which variant of which experiment, complete (not a sample)
and bounded by users, not requests.

Every response whose label names an experiment (``exp=variant,...``, ``towers.assign``) is an
exposure; the first one per user, label and UTC day is written to the store's exposure stream
(``{prefix}:exposures``: request id, user, label, version), the rest of that day's are not (a
user's label changes with a ramp, a forced assignment or a flags change: that is a new
exposure). ``twotower ab report`` counts users per arm from it and leaves out the users it
saw in more than one arm. Written like impressions (``ImpressionLog``: off the response path,
one background pipeline, dropped and counted when the buffer is full or the store fails).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from online.feature_store import FeatureStore
from online.impressions import ImpressionLog
from online.request import RecRequest, RecResult

DAY_S = 86_400


class ExposureLog(ImpressionLog):
    log = "exposures"

    def __init__(self, store: FeatureStore, *, max_seen: int = 200_000, clock: Callable[[], float] = time.time,
                 max_buffer: int = 10_000, chunk: int = 512, timeout_s: float = 0.5) -> None:
        super().__init__(store, rate=1.0, max_buffer=max_buffer, chunk=chunk, timeout_s=timeout_s)
        # hash((user, label)) of today's exposures: an int each (~40 B in the set, not two
        # strings); a collision skips one exposure of one user, which the report does not need
        # (a user counts once). Past max_seen the set restarts: a repeat, never a loss.
        self._seen: set[int] = set()
        self._day = -1
        self._max_seen = max_seen
        self._clock = clock

    def _keep(self, req: RecRequest, res: RecResult) -> bool:
        if "=" not in res.variant:  # not in any experiment
            return False
        day = int(self._clock() // DAY_S)
        if day != self._day or len(self._seen) >= self._max_seen:
            self._seen.clear()
            self._day = day
        key = hash((req.user_id, res.variant))
        if key in self._seen:
            return False
        self._seen.add(key)
        return True
