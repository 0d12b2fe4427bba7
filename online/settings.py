"""Per-batch serving settings: what an experiment's overrides change inside the
request path (``RecommendService.run_batch``), resolved once per (version,
overrides) rather than per request.

Overrides that act on the request itself (``default_k``, ``budget_ms``) are applied
to the ``RecRequest`` by the router (``online.experiments``); the rest live here,
because they act on stages of the batch: the FAISS search parameters, how much of
the session the query reads, and which degradation rungs may serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from towers.flags import Overrides
from towers.index import IndexSpec, search_params


@dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """What one group of a batch runs with. The default is the server's own behaviour."""

    search_params: Any = None  # faiss.SearchParameters for index.search(..., params=...), or None
    max_session: int | None = None  # session items the query reads (cut below the combiner's own)
    allow_full: bool = True
    allow_no_session: bool = True
    allow_batch: bool = True  # popularity is always allowed: the rung that cannot fail

    @property
    def is_default(self) -> bool:
        return self == DEFAULT_SETTINGS


DEFAULT_SETTINGS = BatchSettings()


def batch_settings(overrides: Overrides, spec: IndexSpec) -> BatchSettings:
    """The stage settings of ``overrides`` for a version whose index is ``spec`` (nprobe
    applies to IVF indexes, ef_search to HNSW; neither to flat search)."""
    rungs = overrides.allowed_rungs
    return BatchSettings(
        search_params=search_params(spec, nprobe=overrides.nprobe, ef_search=overrides.ef_search),
        max_session=overrides.max_session,
        allow_full=rungs is None or "full" in rungs,
        allow_no_session=rungs is None or "no_session" in rungs,
        allow_batch=rungs is None or "batch" in rungs,
    )
