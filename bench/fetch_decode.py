"""What the columnar fetch result saves: a Redis fetch's replies for a batch (one embedding and
up to ``max_session`` session members per user) turned into what the query needs (the
embedding matrix, the session items per request deduplicated, the cart items), the old way
(an ``Event`` object per member, unpacked per request; re-implemented here as the plain
reference) against ``BatchFeatures.from_rows`` and the batch-wide dedup. In process, CPU only.

    python -m bench.fetch_decode --out bench/results/fetch_decode.json
"""

from __future__ import annotations

import argparse
import functools
import json
import timeit
from pathlib import Path
from typing import Any

import numpy as np

from online.feature_store import CART, BatchFeatures
from online.service import _first_per_request
from towers.store_format import EVENT_TYPES, Event


def per_event(user_ids: list[str], embs: list[bytes], sessions: list[list[bytes]], dim: int) -> Any:
    """The plain reference: an Event per member, a Python loop per request."""
    user = np.zeros((len(user_ids), dim), np.float32)
    s_ids: list[str] = []
    cart: list[str] = []
    for i, (u, e, members) in enumerate(zip(user_ids, embs, sessions, strict=True)):
        user[i] = np.frombuffer(e, "<f4")
        events = []
        for m in members:
            item, typ, ts = m.decode().split("\t")
            events.append(Event(u, item, typ, int(ts)))
        s_ids += dict.fromkeys(ev.item_id for ev in events)
        cart += [ev.item_id for ev in events if ev.type == "cart"]
    return user, s_ids, cart


def columnar(rows_of: dict[str, int], embs: list[bytes], sessions: list[list[bytes]], dim: int) -> Any:
    f = BatchFeatures.from_rows([np.frombuffer(e, "<f4") for e in embs], sessions, dim=dim)
    rows = np.fromiter((rows_of.get(i, -1) for i in f.items), np.int64, count=len(f.items))
    cart = [f.items[j] for j in np.flatnonzero(f.types == CART).tolist()]
    return f.embedding, _first_per_request(f.owner, rows, len(rows_of)), cart


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/fetch_decode.json"))
    args = p.parse_args()
    rng = np.random.default_rng(0)
    dim, n_items = 64, 1682
    rows_of = {f"item{j}": j for j in range(n_items)}
    out: list[dict[str, Any]] = []
    for b in (1, 8, 32, 64):
        for e in (5, 20):
            users = [f"u{j}" for j in range(b)]
            embs = [rng.standard_normal(dim).astype("<f4").tobytes() for _ in users]
            sessions = [[f"item{rng.integers(n_items)}\t{EVENT_TYPES[rng.integers(4)]}\t{1_700_000_000 + k}".encode()
                         for k in range(e)] for _ in users]
            n = max(20, 2000 // b)
            ref = functools.partial(per_event, users, embs, sessions, dim)
            col = functools.partial(columnar, rows_of, embs, sessions, dim)
            t_ref = min(timeit.repeat(ref, number=n, repeat=5)) / n
            t_col = min(timeit.repeat(col, number=n, repeat=5)) / n
            row = {"users": b, "events_per_user": e, "per_event_us": round(t_ref * 1e6, 1),
                   "columnar_us": round(t_col * 1e6, 1), "speedup": round(t_ref / t_col, 2)}
            out.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
