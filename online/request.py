"""Typed requests and results of the request path, and validation of the wire
messages into them. Every rejection is an ``InvalidRequest`` naming the field."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from online.config import ServeConfig
from online.feature_store import EVENT_TYPES, Event
from online.wire import MalformedRequest
from towers.errors import InvalidRequest
from towers.labels import Mode, Rung, Source

# Context.values bounds: a spec declares a handful of context features; anything near these is abuse.
MAX_CONTEXT_VALUES = 64
MAX_CONTEXT_KEY = 128


@dataclass(slots=True)
class RecRequest:
    """One validated request (treated as immutable; not frozen only because a frozen
    dataclass's __init__ costs several times more, once per request)."""

    user_id: str
    k: int
    recent: tuple[str, ...]  # request-supplied session, most recent first
    cart: tuple[str, ...]
    exclude: tuple[str, ...]
    mode: Mode
    request_id: str
    include_titles: bool
    deadline: float  # time.monotonic() by which the budget says the response must be sent
    received: float = field(default_factory=time.monotonic)
    # The client's own gRPC deadline (inf when none). Only this one may fail an RPC;
    # running out of budget degrades instead (DESIGN §3).
    client_deadline: float = float("inf")
    # k was not in the request (the server's default): an experiment's default_k may replace it.
    k_default: bool = False
    # Context.values by feature name (None: none sent); checked against the serving bundle's
    # spec by the service (towers.context.ContextSchema), which alone knows the model.
    context: dict[str, str] | None = None
    device: str = ""  # Context.device: feeds a declared context feature named "device"
    timestamp: int = 0  # Context.timestamp, unix seconds (0: the server's clock when encoded)


@dataclass(slots=True)
class StageTimings:
    """Microseconds one response spent in each stage: its own wait in the queue, its batch's
    fetch, combine, search and filter (shared by the batch), and its total (received -> result)."""

    queue: int = 0
    fetch: int = 0
    combine: int = 0
    search: int = 0
    filter: int = 0
    total: int = 0


@dataclass(slots=True)
class RecResult:
    item_ids: list[str]
    scores: list[float]
    version: str
    variant: str
    rung: Rung
    reasons: list[str]
    source: Source
    timings: StageTimings
    batch_size: int
    titles: list[str] = field(default_factory=list)
    request_id: str = ""
    teams: list[str] = field(default_factory=list)  # interleaving: the variant behind each item


def _ids(values: Any, name: str, cfg: ServeConfig, limit: int, *, dedupe: bool) -> tuple[str, ...]:
    """Validated ids. ``dedupe``: a session that repeats an item (viewed twice) is normal;
    keep its first position, which is the most recent (sessions are most recent first)."""
    if not values:
        return ()
    vals = tuple(values)
    if len(vals) > limit:
        raise InvalidRequest(name, f"{len(vals)} ids exceed the limit of {limit}")
    lengths = list(map(len, vals))  # one C-level pass; the per-id checks only run to word an error
    if min(lengths) == 0:
        raise InvalidRequest(name, "empty item id")
    if max(lengths) > cfg.max_id_length:
        raise InvalidRequest(name, f"item id longer than {cfg.max_id_length} characters")
    if dedupe and len(set(vals)) != len(vals):
        vals = tuple(dict.fromkeys(vals))
    return vals


def parse_recommend(msg: Any, cfg: ServeConfig, *, time_remaining: float | None) -> RecRequest:
    """From a ``RecommendRequest`` message; ``time_remaining`` is the client's gRPC deadline (s)."""
    if isinstance(msg, MalformedRequest):  # bytes that did not decode (online.wire)
        raise msg.error
    now = time.monotonic()
    user_id = msg.user_id
    if not user_id:
        raise InvalidRequest("user_id", "must not be empty")
    if len(user_id) > cfg.max_id_length:
        raise InvalidRequest("user_id", f"longer than {cfg.max_id_length} characters")
    k = msg.k if msg.HasField("k") else cfg.default_k
    if k < 1:
        raise InvalidRequest("k", "must be >= 1 (leave it unset for the default)")
    if k > cfg.max_k:
        raise InvalidRequest("k", f"{k} exceeds the maximum of {cfg.max_k}")
    try:
        mode = Mode(msg.mode)
    except ValueError:
        raise InvalidRequest("mode", f"unknown mode {msg.mode}") from None
    if len(msg.request_id) > cfg.max_id_length:  # echoed, logged and written to the impression log
        raise InvalidRequest("request_id", f"longer than {cfg.max_id_length} characters")
    session = msg.session
    recent_ids, cart_ids = session.recent_item_ids, session.cart_item_ids
    n_session = len(recent_ids) + len(cart_ids)
    if n_session > cfg.max_session_items:
        raise InvalidRequest("session", f"{n_session} items exceed the limit of {cfg.max_session_items}")
    recent = _ids(recent_ids, "session.recent_item_ids", cfg, cfg.max_session_items, dedupe=True)
    cart = _ids(cart_ids, "session.cart_item_ids", cfg, cfg.max_session_items, dedupe=True)
    exclude = _ids(msg.exclude_item_ids, "exclude_item_ids", cfg, cfg.max_exclude_items, dedupe=False)
    if time_remaining is None and cfg.default_deadline_ms > 0:
        time_remaining = cfg.default_deadline_ms / 1000.0
    client_deadline = now + time_remaining if time_remaining is not None else float("inf")
    deadline = budget_deadline(now, total_ms=cfg.budget.total_ms, network_ms=cfg.budget.network_ms,
                               client_deadline=client_deadline)
    context, device, timestamp = _context(msg.context, cfg)
    return RecRequest(user_id, int(k), recent, cart, exclude, mode, msg.request_id, msg.include_titles, deadline, now,
                      client_deadline, not msg.HasField("k"), context, device, timestamp)


def _context(ctx: Any, cfg: ServeConfig) -> tuple[dict[str, str] | None, str, int]:
    """(values, device, timestamp) of a ``Context``, bounded; which keys the model reads is
    the service's check. Timestamp 0 (unset) is the server's clock."""
    now = int(time.time())
    ts = int(ctx.timestamp)
    if ts < 0 or ts > now + cfg.max_event_skew_s:
        # A millisecond timestamp would derive a wrong hour of day without any error.
        raise InvalidRequest("context.timestamp", f"{ts} is not unix seconds up to now "
                             f"(+{cfg.max_event_skew_s} s of clock skew); 0 means now")
    device = ctx.device
    if len(device) > cfg.max_id_length:
        raise InvalidRequest("context.device", f"longer than {cfg.max_id_length} characters")
    raw = ctx.values
    if not raw:
        return None, device, ts or now
    if len(raw) > MAX_CONTEXT_VALUES:
        raise InvalidRequest("context.values", f"{len(raw)} values exceed the limit of {MAX_CONTEXT_VALUES}")
    values = dict(raw)
    for key, value in values.items():
        if not key:
            raise InvalidRequest("context.values", "empty context key")
        if len(key) > MAX_CONTEXT_KEY:
            raise InvalidRequest("context.values", f"key longer than {MAX_CONTEXT_KEY} characters")
        if len(value) > cfg.max_id_length:
            raise InvalidRequest(f"context.values[{key}]", f"longer than {cfg.max_id_length} characters")
    if device and values.get("device", device) != device:
        raise InvalidRequest("context.device", f"{device!r} conflicts with context.values[device] "
                             f"{values['device']!r}; send one of them")
    return values, device, ts or now


def budget_deadline(received: float, *, total_ms: float, network_ms: float, client_deadline: float) -> float:
    """When a request received at ``received`` must be answered: the budget, capped by the
    client's own deadline, less the network share for the way back (the server must be done
    before the client gives up). An experiment's ``budget_ms`` override recomputes it."""
    budget = min(total_ms / 1000.0, client_deadline - received)
    return received + max(budget - network_ms / 1000.0, budget * 0.5)


def parse_events(msg: Any, cfg: ServeConfig) -> list[Event]:
    if isinstance(msg, MalformedRequest):  # bytes that did not decode (online.wire)
        raise msg.error
    if len(msg.events) == 0:
        raise InvalidRequest("events", "must not be empty")
    if len(msg.events) > cfg.max_events_per_call:
        raise InvalidRequest("events", f"{len(msg.events)} events exceed the limit of {cfg.max_events_per_call}")
    out = []
    now = int(time.time())
    for j, e in enumerate(msg.events):
        if not e.user_id or len(e.user_id) > cfg.max_id_length:
            raise InvalidRequest(f"events[{j}].user_id", f"must be 1..{cfg.max_id_length} characters")
        if not e.item_id or len(e.item_id) > cfg.max_id_length:
            raise InvalidRequest(f"events[{j}].item_id", f"must be 1..{cfg.max_id_length} characters")
        if not 1 <= e.type <= len(EVENT_TYPES):
            raise InvalidRequest(f"events[{j}].type", "must be VIEW, CLICK, CART or PURCHASE")
        if "\t" in e.item_id:
            raise InvalidRequest(f"events[{j}].item_id", "must not contain a tab")
        if e.timestamp < 0 or e.timestamp > now + cfg.max_event_skew_s:
            # A millisecond or future timestamp would pin its item at the head of the session.
            raise InvalidRequest(f"events[{j}].timestamp", f"{e.timestamp} is not unix seconds up to now "
                                 f"(+{cfg.max_event_skew_s} s of clock skew); 0 means now")
        if len(e.request_id) > cfg.max_id_length:
            raise InvalidRequest(f"events[{j}].request_id", f"longer than {cfg.max_id_length} characters")
        out.append(Event(e.user_id, e.item_id, EVENT_TYPES[e.type - 1], int(e.timestamp or now), e.request_id))
    return out
