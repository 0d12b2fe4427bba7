"""One feature fetch for the groups of a batch that serve the same version.

An interleave experiment answers each of its requests with two lists (``towers.interleave``),
computed as two groups of the batch side by side (``online.experiments``): the first with the
first variant's settings, the second with the second's. When both variants serve the same
version (they differ by overrides), the user embeddings and sessions the second group needs
are exactly what the first fetched: the first group to fetch a version publishes its rows here
and a later group of the same batch takes them instead of asking the store again (a second
fetch costs a round trip, and the store's load doubles for the experiment's traffic). Users
the first fetch did not cover are fetched as usual. Two versions cannot share: a user's
embedding is per version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from online.feature_store import BatchFeatures

Fetch = Callable[[Sequence[str]], Awaitable[BatchFeatures]]


class SharedFetch:
    """Per version: a future of (user id -> row, features), set by the first group that fetches."""

    def __init__(self) -> None:
        self._rows: dict[str, asyncio.Future[tuple[dict[str, int], BatchFeatures]]] = {}
        self.fetches = 0  # store round trips made through this object (a test reads it)

    async def fetch(self, version: str, users: Sequence[str], fetch: Fetch) -> BatchFeatures:
        """``users``' features of ``version``: from an earlier group's fetch where it covered
        them, else by ``fetch`` (which this then publishes for later groups)."""
        published = self._rows.get(version)
        if published is not None:
            index, feats = await asyncio.shield(published)  # the first group's failure is ours too
            missing = [u for u in dict.fromkeys(users) if u not in index]
            if missing:
                self.fetches += 1
                more = await fetch(missing)
                index = {**index, **{u: len(feats) + j for j, u in enumerate(missing)}}
                feats = BatchFeatures.concat(feats, more)
            return feats.take(np.fromiter((index[u] for u in users), np.int64, count=len(users)))
        fut: asyncio.Future[tuple[dict[str, int], BatchFeatures]] = asyncio.get_running_loop().create_future()
        self._rows[version] = fut
        self.fetches += 1
        try:
            feats = await fetch(users)
        except BaseException as e:
            fut.set_exception(e if isinstance(e, Exception) else RuntimeError("the first fetch was cancelled"))
            fut.exception()  # retrieved: no "never retrieved" warning when no group waits on it
            raise
        fut.set_result(({u: i for i, u in enumerate(users)}, feats))
        return feats
