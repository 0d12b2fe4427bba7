"""``twotower refresh``: the nightly loop that keeps a model alive.

One run, each step checkpointed in the run directory (``offline.refresh.run_steps``), so that
``--resume RUN`` continues after a crash and never repeats a step whose effect is out:

1. ``read``      new events from the event stream (consumer group; pending entries of an
                 earlier, crashed run first), saved in the run dir;
2. ``merge``     into the interaction store (Parquet by day; repeats by event identity are
                 stored once, so a replay stores nothing twice). The bundle's dataset spec
                 maps the events (``interactions.event_type``): only the ``positives`` types
                 are interactions (the others are consumed, not stored), and ``weights`` are
                 the per-type training weights of the ``train`` mode; a spec without event
                 types takes every event at weight 1;
3. ``candidate`` a new bundle from CURRENT's towers. Modes:
                 - ``embed``: re-embed the users with new events and every new user from their
                   history (the user tower reads it), append new items that have features;
                 - ``train``: warm-start the towers on the store's interactions before the
                   holdout window for a few epochs, then re-embed every user and item;
4. ``index``     rebuild the FAISS index (same type and search settings as CURRENT) when the
                 item embeddings changed;
5. ``batch_score`` the precomputed top-K per user (past items excluded or not, as the spec's
                 ``policies.exclude_seen`` says; the gate below follows the same policy);
6. ``evaluate``  candidate vs CURRENT on the holdout window (every new event in the most
                 recent ``holdout_s`` is a target, with what came before it as known), and the
                 gate: refused when measurably (95%, paired) worse than CURRENT by more than
                 ``max_drop`` of its Recall@20;
7. ``publish``   (gate passed, lock still ours) install, load the version's keys into Redis,
                 flip CURRENT;
8. ``ack``       ``XACK`` the consumed entries: after publish, so a crash replays them;
9. ``gc``        retention (``offline.refresh.retention``): delete Redis keys of versions retired
                 more than ``grace_s`` ago, and registry directories beyond the newest
                 ``keep_versions``; never CURRENT's nor a version a flags file pins.

A run that ends removes its directory and keeps its report (``RUNS/reports/RUN.json``).

Two refreshes never overlap: the run holds a Redis lock (``offline.refresh.run_lock``) and checks it
right before publishing. A run with no new events says so and publishes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towers.lazy import lazy_exports

# Resolved on first use: the CLI registers ``refresh``'s flags without loading the steps.
_EXPORTS = {"ENGINES": "offline.refresh.config", "MODES": "offline.refresh.config", "STEPS": "offline.refresh.config",
            "RefreshConfig": "offline.refresh.config", "collect_garbage": "offline.refresh.retention",
            "refresh": "offline.refresh.run"}
__all__ = ["ENGINES", "MODES", "STEPS", "RefreshConfig", "collect_garbage", "refresh"]

if TYPE_CHECKING:
    from offline.refresh.config import ENGINES, MODES, STEPS, RefreshConfig
    from offline.refresh.retention import collect_garbage
    from offline.refresh.run import refresh

__getattr__ = lazy_exports(__name__, _EXPORTS)
