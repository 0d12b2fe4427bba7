"""The serving half of ``twotower demo``: serve the registry's CURRENT bundle
in-process on a free port and make real gRPC calls against it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from online.cli import format_response
from online.client import RecommenderClient
from online.config import load_config
from online.server import ServerThread


def serve_and_call(*, registry: Path, titles: dict[str, str]) -> int:
    cfg = load_config(port=0)
    print("== serve (in-process gRPC on a free port, in-memory feature store) ==")
    t0 = time.perf_counter()
    srv = ServerThread(cfg, registry=registry)
    print(f"SERVING {srv.running.service.model.version if srv.running.service.model else '?'} on {srv.target} "
          f"after load + warmup in {time.perf_counter() - t0:.2f} s")
    try:
        with RecommenderClient(srv.target, timeout=2.0) as c:
            print(f"health: {c.health()}")
            print("\n-- user 1, no session (user embedding only) --")
            print(format_response(c.recommend("1", k=5, include_titles=True)))
            toy_story, star_wars = "1", "50"
            print(f"\n-- user 1 with a request session: {titles.get(star_wars)}, {titles.get(toy_story)} --")
            print(format_response(c.recommend("1", k=5, recent=[star_wars, toy_story], include_titles=True)))
            print("\n-- user 1 after RecordEvents (clicked three horror films) --")
            now = int(time.time())
            c.record_events([("1", "184", "click", now), ("1", "200", "click", now + 1), ("1", "219", "view", now + 2)])
            print(format_response(c.recommend("1", k=5, include_titles=True)))
            print("\n-- unknown user with a session (session-only query) --")
            print(format_response(c.recommend("new-visitor", k=5, recent=["172", "181"], include_titles=True)))
            print("\n-- unknown user, no session (popularity) --")
            print(format_response(c.recommend("another-visitor", k=5, include_titles=True)))
            print("\n-- user 42, mode=BATCH (precomputed top-K, one lookup) --")
            print(format_response(c.recommend("42", k=5, mode="batch", include_titles=True)))
            lat = []
            for i in range(500):
                t = time.perf_counter()
                c.recommend(str(1 + i % 943), k=10, recent=[str(1 + (i * 7) % 1682)])
                lat.append(time.perf_counter() - t)
            ms = np.array(lat) * 1000
            print(f"\nlatency of 500 sequential Recommend calls (client-measured, k=10, with session): "
                  f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms")
    finally:
        srv.stop()
    return 0
