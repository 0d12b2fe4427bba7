"""A Python client for the Recommender service, with a gRPC service config that
retries UNAVAILABLE (a refused connection during a worker recycle, a server not
ready yet) with exponential backoff, and CANCELLED for the read-only Recommend."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from online.proto import recommender_pb2 as pb
from online.proto import recommender_pb2_grpc as pb_grpc

_BACKOFF = {"maxAttempts": 5, "initialBackoff": "0.02s", "maxBackoff": "0.5s", "backoffMultiplier": 2}
SERVICE_CONFIG = {
    "methodConfig": [
        {
            # Recommend is read-only, so it may also retry CANCELLED: a server shutting down
            # (a worker draining during a recycle) fails calls that had arrived but not yet
            # reached a handler with CANCELLED rather than UNAVAILABLE (grpc/grpc#41785).
            "name": [{"service": "twotower.v1.Recommender", "method": "Recommend"}],
            "retryPolicy": {**_BACKOFF, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]},
        },
        {
            # RecordEvents is idempotent (an event is stored and logged once by identity, and
            # record_events stamps times before the first try), so UNAVAILABLE is retried also
            # when it is a store timeout whose write may have landed.
            "name": [{"service": "twotower.v1.Recommender"}],
            "retryPolicy": {**_BACKOFF, "retryableStatusCodes": ["UNAVAILABLE"]},
        },
    ],
}
CHANNEL_OPTIONS = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
MODES = {"auto": pb.MODE_AUTO, "online": pb.MODE_ONLINE, "batch": pb.MODE_BATCH}
EVENT_TYPES = {"view": pb.EVENT_TYPE_VIEW, "click": pb.EVENT_TYPE_CLICK, "cart": pb.EVENT_TYPE_CART,
               "purchase": pb.EVENT_TYPE_PURCHASE}


def request(user_id: str, *, k: int | None = None, recent: Sequence[str] = (), cart: Sequence[str] = (),
            exclude: Sequence[str] = (), mode: str = "auto", include_titles: bool = False,
            request_id: str = "", context: Mapping[str, str] | None = None, device: str = "",
            timestamp: int = 0) -> pb.RecommendRequest:
    """``context``: declared context feature name -> value (``Context.values``); ``device``:
    the legacy ``Context.device``; ``timestamp``: unix seconds of the request (0: the server's
    clock), which derived context features (hour of day, day of week) read."""
    msg = pb.RecommendRequest(user_id=user_id, session=pb.Session(recent_item_ids=recent, cart_item_ids=cart),
                              exclude_item_ids=exclude, mode=MODES[mode], include_titles=include_titles,
                              request_id=request_id,
                              context=pb.Context(device=device, timestamp=timestamp, values=dict(context or {})))
    if k is not None:
        msg.k = k
    return msg


class RecommenderClient:
    """``credentials`` (``online.tls.channel_credentials``) for a TLS server; plaintext without."""

    def __init__(self, target: str, *, timeout: float = 1.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.channel = (grpc.insecure_channel(target, options=CHANNEL_OPTIONS) if credentials is None
                        else grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS))
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def recommend(self, user_id: str, *, timeout: float | None = None, **kwargs: object) -> pb.RecommendResponse:
        resp: pb.RecommendResponse = self.stub.Recommend(request(user_id, **kwargs),  # type: ignore[arg-type]
                                                         timeout=timeout or self.timeout)
        return resp

    def record_events(self, events: Iterable[tuple[str, str, str, int]], *, timeout: float | None = None) -> int:
        """``(user_id, item_id, type, timestamp)`` tuples; type is view|click|cart|purchase.
        A timestamp of 0 is stamped with this machine's clock before the first try, so the
        channel's retries send the same events and the server stores and logs each once."""
        now = int(time.time())
        msg = pb.RecordEventsRequest(events=[pb.Event(user_id=u, item_id=i, type=EVENT_TYPES[t], timestamp=ts or now)
                                             for u, i, t, ts in events])
        resp: pb.RecordEventsResponse = self.stub.RecordEvents(msg, timeout=timeout or self.timeout)
        return int(resp.accepted)

    def health(self, service: str = "", *, timeout: float = 1.0) -> str:
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
