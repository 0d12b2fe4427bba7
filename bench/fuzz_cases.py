"""Protocol fuzzing of the Recommender service: generators, target and property
(issue 10 item 7; run by ``tests/test_fuzz.py`` and ``twotower fuzz``).

Hypothesis generates ``RecommendRequest`` and ``RecordEventsRequest`` messages —
weird unicode (NUL, tabs, bidi marks, astral code points, hash-tag braces),
empty and oversized fields, negative and far-future timestamps, every enum value
and out-of-range enum ints, unknown fields at the top level and inside nested
messages — and sends them as raw bytes over real gRPC (a generic
``unary_unary`` with identity serializers, so unknown fields reach the server
exactly as generated) to an in-process server backed by a throwaway
redis-server. The property (DESIGN §3, "bad input gets a clear error"):

- every answer is OK, INVALID_ARGUMENT whose message starts with a field of the
  request (``user_id:``, ``events[3].timestamp:``) or RESOURCE_EXHAUSTED (gRPC's
  own message size limit) — never INTERNAL or UNKNOWN;
- an OK Recommend honours k and never returns an excluded, cart or session item;
  an OK RecordEvents stored every event it accepted (checked in the session
  sorted set itself, with its TTL);
- the server stays SERVING, and events accepted before the run are still there.

The test suite runs a few hundred derandomized examples per message type;
``bench/fuzz.py``'s ``run_fuzz`` is the long run of the benchmark.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from hypothesis import strategies as st

from online.proto import recommender_pb2 as pb
from towers.store_format import EVENT_TYPES, TIE_STEP, Event, RedisKeys, encode_event

SERVICE = "/twotower.v1.Recommender/"
ALLOWED = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
# INVALID_ARGUMENT must name a field of the request it answers.
FIELD_OF = {
    "Recommend": re.compile(r"^(user_id|k|mode|request_id|session|session\.recent_item_ids|session\.cart_item_ids"
                            r"|exclude_item_ids|context|context\.device|context\.timestamp"
                            r"|context\.values(\[[^\]]*\])?): "),
    "RecordEvents": re.compile(r"^(events|events\[(?P<j>\d+)\]\.(user_id|item_id|type|timestamp|request_id)): "),
}
SENTINEL_USERS = [f"sentinel-{j}" for j in range(8)]

# --------------------------------------------------------------------------- wire format


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative ints travel as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One encoded field: tag, then the payload (length-prefixed for wire type 2)."""
    if wire_type == 2:
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire_type) + payload


def unknown_fields(*, first_free: int) -> st.SearchStrategy[bytes]:
    """Fields the schema does not know (numbers from ``first_free`` up to protobuf's
    maximum), of every non-group wire type: a parser must skip and keep them."""
    number = st.one_of(st.integers(first_free, 64), st.integers(first_free, (1 << 29) - 1))
    one = st.one_of(
        st.builds(lambda n, v: _field(n, 0, _varint(v)), number, st.integers(-(1 << 63), (1 << 64) - 1)),
        st.builds(lambda n, b: _field(n, 1, b), number, st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, b: _field(n, 2, b), number, st.binary(max_size=64)),
        st.builds(lambda n, b: _field(n, 5, b), number, st.binary(min_size=4, max_size=4)),
    )
    return st.lists(one, max_size=3).map(b"".join)


# --------------------------------------------------------------------------- strategies

def rarely(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], *,
           one_in: int = 25) -> st.SearchStrategy[Any]:
    """``rare`` about once in ``one_in`` draws: the huge cases (a 9 MiB message, 10,000
    events) cost a thousand small ones, and ``one_of`` would pick them half the time."""
    return st.integers(1, one_in).flatmap(lambda r: rare if r == 1 else common)


WEIRD = ["", "\x00", "\t", "a\tb", "\n", "\r\n", " ", "{", "}", "{}", "}{", "{u1}", "u1}", "\u202e1", "\ufeff",
         "\uffff", "\U0010ffff", "😀", "e\u0301", "../..", "%s%n", "\\", "'", '"', "tt:zsess:u1", "*", "-1", "0"]


def ids(known: Sequence[str]) -> st.SearchStrategy[str]:
    """Ids: known ones (to reach the full scoring path), weird ones, random unicode
    without surrogates (protobuf strings are UTF-8), and long ones around the limit."""
    chars = st.characters(exclude_categories=["Cs"])  # no surrogates: protobuf strings are UTF-8
    return rarely(st.one_of(st.sampled_from(list(known)), st.sampled_from(WEIRD), st.text(chars, max_size=12)),
                  st.one_of(st.text(chars, min_size=200, max_size=300),
                            st.builds(lambda c, n: c * n, chars, st.sampled_from([255, 256, 257, 1024, 70_000]))),
                  one_in=6)


def id_lists(known: Sequence[str], *, huge: Sequence[int]) -> st.SearchStrategy[list[str]]:
    """Mostly short lists; sometimes one of ``huge`` sizes (at and just over the limits)."""
    return rarely(st.lists(ids(known), max_size=8),
                  st.builds(lambda n, p: [f"{p}{j}" for j in range(n)], st.sampled_from(list(huge)),
                            st.sampled_from(["i", "x", ""])))


def enum_ints(n_values: int) -> st.SearchStrategy[int]:
    """Every declared value, near misses and the int32 extremes (proto3 enums are open)."""
    return st.one_of(st.integers(-2, n_values + 2), st.sampled_from([-(1 << 31), (1 << 31) - 1]))


def timestamps() -> st.SearchStrategy[int]:
    """Around now (as the strategy is built: a replayed case must draw the same values)."""
    now = int(time.time())
    return st.one_of(
        st.sampled_from([0, -1, now, now - 86_400, now + 3_599, now + 3_601, now * 1000, (1 << 31), (1 << 32),
                         -(1 << 63), (1 << 63) - 1]),
        st.integers(0, now),
        st.integers(-(1 << 63), (1 << 63) - 1),
    )


def _event(user_id: str, item_id: str, type_: int, timestamp: int) -> pb.Event:
    """An event with any enum int (proto3 enums are open; the stubs' types are not)."""
    return pb.Event(user_id=user_id, item_id=item_id, type=cast(Any, type_), timestamp=timestamp)


@dataclass(frozen=True, repr=False)
class Case:
    """One generated call: ``raw`` is what goes on the wire, ``msg`` the known fields
    the server should see in it."""

    method: str  # Recommend | RecordEvents
    raw: bytes
    msg: Any

    def short(self, limit: int = 600) -> str:
        return f"{self.method}({str(self.msg)[:limit]!r}, {len(self.raw)} bytes)"

    __repr__ = short  # a failing bulk case would otherwise print megabytes


def recommend_cases(*, users: Sequence[str], items: Sequence[str]) -> st.SearchStrategy[Case]:
    times = timestamps()  # built once: "now" must not move between a case and its replay

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        msg = pb.RecommendRequest(
            user_id=draw(ids(users)), exclude_item_ids=draw(id_lists(items, huge=[10_000, 10_001])),
            mode=cast(Any, draw(enum_ints(3))), include_titles=draw(st.booleans()),
            request_id=draw(rarely(st.text(max_size=20),
                                   st.builds(lambda n: "r" * n, st.sampled_from([100_000, 9 << 20])))))
        k = draw(st.one_of(st.none(), st.integers(0, 300), st.integers(0, (1 << 32) - 1)))
        if k is not None:
            msg.k = k
        raw = msg.SerializeToString()
        if draw(st.booleans()):
            session = pb.Session(recent_item_ids=draw(id_lists(items, huge=[1000, 1001])),
                                 cart_item_ids=draw(id_lists(items, huge=[1000])))
            msg.session.CopyFrom(session)
            raw += _field(3, 2, session.SerializeToString() + draw(unknown_fields(first_free=3)))
        if draw(st.booleans()):
            context = pb.Context(device=draw(ids(["ios", "web"])), timestamp=draw(times))
            msg.context.CopyFrom(context)
            raw += _field(4, 2, context.SerializeToString() + draw(unknown_fields(first_free=4)))
        return Case("Recommend", raw + draw(unknown_fields(first_free=9)), msg)

    return build()


def record_events_cases(*, users: Sequence[str], items: Sequence[str]) -> st.SearchStrategy[Case]:
    event = st.builds(_event, ids(users), ids(items), enum_ints(4), timestamps())
    now = int(time.time())

    def many(n: int) -> list[pb.Event]:  # a bulk call of valid events: the size limit, both sides of it
        return [_event(f"bulk{j % 97}", f"i{j % 500}", 1 + j % 4, now - j) for j in range(n)]

    @st.composite
    def build(draw: st.DrawFn) -> Case:
        events = draw(rarely(st.lists(event, max_size=12), st.builds(many, st.sampled_from([10_000, 10_001]))))
        msg = pb.RecordEventsRequest(events=events)
        small = len(events) <= 100  # a bulk call gets its unknown fields at the top level only
        raw = b"".join(_field(1, 2, e.SerializeToString() + (draw(unknown_fields(first_free=6)) if small else b""))
                       for e in events)
        return Case("RecordEvents", raw + draw(unknown_fields(first_free=2)), msg)

    return build()


# --------------------------------------------------------------------------- the target


@dataclass
class FuzzTarget:
    """A served bundle, a raw-bytes channel to it, and the Redis behind it (to check
    that accepted events are really stored)."""

    target: str
    version: str
    redis_url: str
    prefix: str
    session_cap: int
    users: list[str]
    items: list[str]
    counts: dict[str, Counter[str]] = field(default_factory=lambda: {"Recommend": Counter(), "RecordEvents": Counter()})

    def __post_init__(self) -> None:
        import grpc
        import redis
        from grpc_health.v1 import health_pb2_grpc

        self.channel = grpc.insecure_channel(self.target, options=[("grpc.max_send_message_length", 64 << 20),
                                                                   ("grpc.max_receive_message_length", 64 << 20)])
        self.calls = {m: self.channel.unary_unary(SERVICE + m) for m in ("Recommend", "RecordEvents")}
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.redis = redis.Redis.from_url(self.redis_url)
        self.keys = RedisKeys(self.prefix)
        self.sentinels: list[Event] = []

    def close(self) -> None:
        self.channel.close()
        self.redis.close()

    def send(self, case: Case) -> tuple[str, str, bytes | None]:
        import grpc

        try:
            return "OK", "", self.calls[case.method](case.raw, timeout=60.0)
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", None

    def serving(self) -> bool:
        from grpc_health.v1 import health_pb2

        resp = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10.0)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def run_case(self, case: Case) -> list[str]:
        """Send one case; returns what it violated (empty: the answer is fine)."""
        code, details, raw = self.send(case)
        self.counts[case.method][code] += 1
        problems: list[str] = []
        if code not in ALLOWED:
            problems.append(f"{code}: {details[:300]}")
        elif code == "INVALID_ARGUMENT":
            m = FIELD_OF[case.method].match(details)
            if m is None:
                problems.append(f"INVALID_ARGUMENT does not start with a field of the request: {details[:300]!r}")
            elif m.groupdict().get("j") is not None and int(m["j"]) >= len(case.msg.events):
                problems.append(f"INVALID_ARGUMENT names an event that is not there: {details[:300]!r}")
        elif code == "OK" and raw is not None:
            problems += self._check_recommend(case.msg, raw) if case.method == "Recommend" \
                else self._check_recorded(case.msg, raw)
        if not self.serving():
            problems.append("the server stopped reporting SERVING")
        return problems

    def _check_recommend(self, msg: Any, raw: bytes) -> list[str]:
        resp = pb.RecommendResponse.FromString(raw)
        k = msg.k if msg.HasField("k") else 10
        out = []
        if len(resp.item_ids) > k or len(resp.item_ids) != len(resp.scores):
            out.append(f"{len(resp.item_ids)} items, {len(resp.scores)} scores for k={k}")
        if len(set(resp.item_ids)) != len(resp.item_ids):
            out.append("duplicate items in the response")
        banned = set(msg.exclude_item_ids) | set(msg.session.cart_item_ids) | set(msg.session.recent_item_ids)
        if banned & set(resp.item_ids):
            out.append(f"excluded/cart/session items returned: {sorted(banned & set(resp.item_ids))[:5]}")
        if resp.model_version != self.version or not 1 <= resp.rung <= 4:
            out.append(f"version {resp.model_version!r} rung {resp.rung}")
        return out

    def _check_recorded(self, msg: Any, raw: bytes) -> list[str]:
        accepted = pb.RecordEventsResponse.FromString(raw).accepted
        if accepted != len(msg.events):
            return [f"accepted {accepted} of {len(msg.events)} events"]
        # Events stored with the server's clock (timestamp 0) have a member not known here.
        checked = [(j, Event(e.user_id, e.item_id, EVENT_TYPES[e.type - 1], e.timestamp))
                   for j, e in enumerate(msg.events) if e.timestamp != 0]
        users = sorted({ev.user_id for _, ev in checked})
        pipe = self.redis.pipeline(transaction=False)  # one round trip, however many events
        for u in users:
            pipe.ttl(self.keys.session(u))
            pipe.zcard(self.keys.session(u))
            pipe.zrange(self.keys.session(u), 0, 0, withscores=True)
        for _, ev in checked:
            pipe.zscore(self.keys.session(ev.user_id), encode_event(ev))
        res = pipe.execute()
        per_user = {u: res[3 * i: 3 * i + 3] for i, u in enumerate(users)}
        for (j, ev), score in zip(checked, res[3 * len(users):], strict=True):
            ttl, card, oldest = per_user[ev.user_id]
            if ttl <= 0:
                return [f"the session of accepted event {j} has no TTL: {ev}"]
            # Missing is fine only when session_cap newer events (by score) pushed it out.
            trimmed = card >= self.session_cap and oldest and oldest[0][1] >= ev.timestamp + j * TIE_STEP - TIE_STEP
            if score is None and not trimmed:
                return [f"accepted event {j} is not in the session: {ev}"]
        return []

    def record_sentinels(self) -> None:
        """Events accepted before the fuzzing starts: ``lost_sentinels`` must find them after."""
        now = int(time.time())
        events = [_event(u, f"i{j}", 1 + j % 4, now - 60 + j) for j, u in enumerate(SENTINEL_USERS)]
        code, details, _ = self.send(Case("RecordEvents", pb.RecordEventsRequest(events=events).SerializeToString(),
                                          pb.RecordEventsRequest(events=events)))
        if code != "OK":
            raise RuntimeError(f"recording the sentinel events failed: {code} {details}")
        self.sentinels = [Event(e.user_id, e.item_id, EVENT_TYPES[e.type - 1], e.timestamp) for e in events]

    def lost_sentinels(self) -> list[Event]:
        return [e for e in self.sentinels
                if self.redis.zscore(self.keys.session(e.user_id), encode_event(e)) is None]


@contextmanager
def fuzz_target(*, workdir: Path, n_items: int = 2000, n_users: int = 300) -> Iterator[FuzzTarget]:
    """A synthetic bundle loaded into a throwaway redis-server, served in-process."""
    from bench.procs import RedisProcess
    from offline.synth import make_synthetic_bundle
    from online.config import RedisConfig, load_config
    from online.server import ServerThread
    from towers import bundle as bundle_mod
    from towers.redis_load import load_bundle_into_redis

    bundle_dir = workdir / "bundle"
    if not bundle_dir.exists():
        make_synthetic_bundle(bundle_dir, n_items=n_items, n_users=n_users, dim=32, seed=7, index_type="flat",
                              progress=False)
    b = bundle_mod.load(bundle_dir)
    (workdir / "redis").mkdir(exist_ok=True)
    redis_proc = RedisProcess(workdir / "redis")
    try:
        load_bundle_into_redis(bundle_dir, redis_url=redis_proc.url, prefix="fz", progress=False)
        cfg = load_config(port=0, feature_store="redis")
        cfg = replace(cfg, redis=RedisConfig(url=redis_proc.url, prefix="fz", session_cap=cfg.redis.session_cap))
        srv = ServerThread(cfg, bundle_path=bundle_dir)
        try:
            t = FuzzTarget(srv.target, b.version, redis_proc.url, "fz", cfg.redis.session_cap,
                           users=list(b.features.user_vocab.values[:50]),
                           items=list(b.features.item_vocab.values[:200]))
            try:
                t.record_sentinels()
                yield t
            finally:
                t.close()
        finally:
            srv.stop()
    finally:
        redis_proc.stop()


