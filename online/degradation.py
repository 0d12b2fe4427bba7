"""Graceful degradation (DESIGN §3): every decision about a batch's rungs, sources
and reasons, in one place, driven by what the stages report.

The ladder, best first::

    full        the query used everything there is: the user embedding (store or the
                bundle's own copy of the same version) and the session (request + store)
    no_session  the feature store failed or ran late: the query is the user embedding
                alone. The request's own session items are still excluded from the
                list, but they do not feed the query: the label says what was used.
    batch       no time left for the search (or mode=BATCH): the nightly top-K
    popularity  nothing else applies: the most popular items not excluded

A request only ever moves down. ``source`` says where its list came from
(``towers.labels.Source``); ``reasons`` say why it is not on the full rung.
"""

from __future__ import annotations

import numpy as np

from towers.labels import Rung, Source

COLD_START = "cold start: unknown user and no session"
TOO_LATE = "too little time left for the search"
NOTHING_PRECOMPUTED = "nothing precomputed for this user"
EMBEDDING_FROM_BUNDLE = "user embedding missing from the feature store; used the bundle's copy"


class Ladder:
    """The rung, source and reasons of each request in one batch.

    Arrays, not per-request objects: the common case (every request on the full rung)
    costs a few numpy calls per batch, and reasons exist only for requests that have one.
    """

    def __init__(self, n: int) -> None:
        self.rung = np.full(n, Rung.FULL, dtype=np.int8)
        self.source = np.full(n, Source.POPULARITY, dtype=np.int8)
        self.reasons: dict[int, list[str]] = {}

    def _down(self, idx: np.ndarray, rung: int, reason: str) -> None:
        if len(idx) == 0:
            return
        self.rung[idx] = np.maximum(self.rung[idx], rung)
        for i in idx.tolist():
            self.reasons.setdefault(i, []).append(reason)

    def note(self, idx: np.ndarray, reason: str) -> None:
        """A reason that changes no rung (the response is still what its rung promises)."""
        for i in idx.tolist():
            self.reasons.setdefault(i, []).append(reason)

    # -- stage outcomes -------------------------------------------------------------------
    def feature_store_failed(self, idx: np.ndarray, error: str) -> None:
        """The fetch failed or timed out: no session for these requests (the caller leaves
        the session out of their queries)."""
        self._down(idx, Rung.NO_SESSION, f"feature store: {error}")

    def plan_search(self, online: np.ndarray, has_query: np.ndarray, time_left_s: np.ndarray,
                    min_search_s: float) -> np.ndarray:
        """Which online requests search: those with a query (user or session) and time left.
        Without a query: popularity (cold start); without time: the batch rung. Returns the
        indices that search, sorted."""
        cold = online[~has_query[online]]
        self._down(cold, Rung.POPULARITY, COLD_START)
        candidates = online[has_query[online]]
        late = candidates[time_left_s[candidates] < min_search_s]
        self._down(late, Rung.BATCH, TOO_LATE)
        return candidates[time_left_s[candidates] >= min_search_s]

    def not_allowed(self, idx: np.ndarray, rung: int, to: int) -> None:
        """Requests ``idx`` would be served on ``rung``, which their experiment's
        ``allowed_rungs`` leaves out: they move down to ``to`` (the next allowed rung)."""
        self._down(idx, to, f"rung {Rung(rung).label} not allowed by the experiment")

    def searched(self, idx: np.ndarray, source: np.ndarray) -> None:
        """Requests answered by the search; ``source`` from ``QueryBatch.source``."""
        self.source[idx] = source

    def batch_recs(self, idx: np.ndarray, found: np.ndarray, enough: np.ndarray, batch_mode: np.ndarray,
                   store_error: str | None) -> np.ndarray:
        """The precomputed rung for ``idx`` (mode=BATCH or too late to search). A list is
        served when it exists and, for online requests, still holds k items after filtering
        (otherwise the next rung serves k). Returns the positions in ``idx`` that it serves."""
        if store_error is not None:
            self.note(idx, f"batch recs from the bundle: feature store: {store_error}")
        served = found & (enough | batch_mode)
        rows = idx[served]
        self.rung[rows] = np.maximum(self.rung[rows], Rung.BATCH)  # mode=BATCH asked for it; late ones said why
        self.source[rows] = Source.BATCH
        return np.flatnonzero(served)

    def overloaded(self, why: str) -> None:
        """Admission refused these requests (a batch of their own, never queued): they go to
        the precomputed rung, answered from memory, then popularity."""
        self._down(np.arange(len(self.rung)), Rung.BATCH, why)

    def popularity(self, idx: np.ndarray) -> None:
        """The last rung, for whatever nothing else answered. Requests already sent here (cold
        start, a rung the experiment leaves out) said why; the rest fell off the batch rung."""
        fell = idx[self.rung[idx] < Rung.POPULARITY]
        self._down(fell, Rung.POPULARITY, NOTHING_PRECOMPUTED)
        self.source[idx] = Source.POPULARITY

    def reasons_of(self, i: int) -> list[str]:
        return self.reasons.get(i, [])
