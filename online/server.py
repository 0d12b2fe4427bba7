"""The gRPC server (``grpc.aio``): the Recommender service over ``RecommendService``,
the standard health service (NOT_SERVING until a bundle is loaded and warmed)
and server reflection (so ``grpcurl`` works). Errors map to status codes here,
in one place."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from online.admin_auth import check_admin_exposure, token_interceptor
from online.batcher import DeadlineExceeded
from online.config import ServeConfig
from online.feature_store import FeatureStore, InMemoryFeatureStore
from online.hotswap import RegistryWatcher
from online.lifecycle import LoadedModel
from online.log_signals import LogSignals
from online.loop_health import LoopHealth
from online.metrics import error_fields
from online.proto import recommender_pb2 as pb
from online.proto import recommender_pb2_grpc as pb_grpc
from online.redis_store import RedisFeatureStore, open_redis_store
from online.reflection import enable_reflection
from online.request import RecResult, parse_events, parse_recommend
from online.service import RecommendService
from online.supervision_shared import SharedSupervision, SwapTurn
from online.tls import load_server_tls
from online.wire import lenient_deserializer
from towers import registry as registry_mod
from towers.errors import (
    ConfigError,
    FeatureStoreError,
    InvalidRequest,
    NotReady,
    Overloaded,
    TwoTowerError,
    Unsupported,
)

if TYPE_CHECKING:
    from online.experiments import Router

log = logging.getLogger("twotower.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name

MAX_RPCS_HEADROOM = 64  # concurrent RPCs beyond batching.max_pending: RecordEvents, health checks

# The one mapping from our exceptions to gRPC status codes.
STATUS_OF: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (FeatureStoreError, grpc.StatusCode.UNAVAILABLE),
    (Unsupported, grpc.StatusCode.FAILED_PRECONDITION),
    (TwoTowerError, grpc.StatusCode.INTERNAL),
]


def status_of(e: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_OF:
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


def pushback(e: Overloaded) -> tuple[tuple[str, str], ...]:
    """gRPC's retry pushback for a refused request: when (ms) a retry may come."""
    return (("grpc-retry-pushback-ms", str(max(int(e.retry_after_s * 1000), 1))),)


def to_proto(r: RecResult) -> pb.RecommendResponse:
    t = r.timings
    return pb.RecommendResponse(
        item_ids=r.item_ids, scores=r.scores, model_version=r.version, variant=r.variant,
        rung=int(r.rung),  # type: ignore[arg-type]  # Rung's values are the proto's
        reasons=r.reasons, source=r.source.label, batch_size=r.batch_size, titles=r.titles, request_id=r.request_id,
        contributed_by=r.teams,
        timings=pb.StageTimings(queue_us=t.queue, fetch_us=t.fetch, combine_us=t.combine,
                                search_us=t.search, filter_us=t.filter, total_us=t.total),
    )


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """The ``grpc.aio`` transport: handlers run on the service's event loop."""

    def __init__(self, service: RecommendService) -> None:
        self.service = service

    async def _fail(self, context: grpc.aio.ServicerContext, e: BaseException, request: Any = None) -> Any:
        code = status_of(e)
        self.service.metrics.rpc_failed(code)
        if isinstance(e, Overloaded):
            context.set_trailing_metadata(pushback(e))
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error", exc_info=e, extra=error_fields(self.service, request))
        await context.abort(code, str(e))

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            req = parse_recommend(request, self.service.cfg, time_remaining=context.time_remaining())
            return to_proto(await self.service.recommend(req))
        except Exception as e:
            return await self._fail(context, e, request)

    async def RecordEvents(self, request: pb.RecordEventsRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            events = parse_events(request, self.service.cfg)
            return pb.RecordEventsResponse(accepted=await self.service.record_events(events))
        except Exception as e:
            return await self._fail(context, e)


class SyncRecommenderServicer(pb_grpc.RecommenderServicer):
    """The sync transport (``grpc.server`` with a thread pool): the same parsing, service and
    mapping as ``RecommenderServicer``; each call waits in a pool thread for the service, which
    stays on its event loop (the batcher needs one place where concurrent calls meet)."""

    def __init__(self, service: RecommendService, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop

    def _call(self, coro_fn: Callable[[], Any], context: grpc.ServicerContext) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro_fn(), self.loop)
        context.add_callback(fut.cancel)  # the client went away: drop the request from its batch
        return fut.result()

    def _fail(self, context: grpc.ServicerContext, e: BaseException, request: Any = None) -> Any:
        code = status_of(e)
        self.service.metrics.rpc_failed(code)
        if isinstance(e, Overloaded):
            context.set_trailing_metadata(pushback(e))
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error", exc_info=e, extra=error_fields(self.service, request))
        context.abort(code, str(e))

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> Any:
        try:
            req = parse_recommend(request, self.service.cfg, time_remaining=context.time_remaining())
            return to_proto(self._call(lambda: self.service.recommend(req), context))
        except Exception as e:
            return self._fail(context, e, request)

    def RecordEvents(self, request: pb.RecordEventsRequest, context: grpc.ServicerContext) -> Any:
        try:
            events = parse_events(request, self.service.cfg)
            return pb.RecordEventsResponse(accepted=self._call(lambda: self.service.record_events(events), context))
        except Exception as e:
            return self._fail(context, e)


def add_recommender(servicer: pb_grpc.RecommenderServicer, server: Any) -> None:
    """The generated ``add_RecommenderServicer_to_server``, with lenient request deserializers:
    bytes that do not decode reach the handler as a ``MalformedRequest`` (INVALID_ARGUMENT naming
    the field) instead of ending the call as UNKNOWN before any handler runs (online/wire.py)."""
    handlers = {
        "Recommend": grpc.unary_unary_rpc_method_handler(
            servicer.Recommend, request_deserializer=lenient_deserializer(pb.RecommendRequest),
            response_serializer=pb.RecommendResponse.SerializeToString),
        "RecordEvents": grpc.unary_unary_rpc_method_handler(
            servicer.RecordEvents, request_deserializer=lenient_deserializer(pb.RecordEventsRequest),
            response_serializer=pb.RecordEventsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def make_store(cfg: ServeConfig) -> FeatureStore:
    if cfg.feature_store == "redis":
        return open_redis_store(cfg.redis)
    return InMemoryFeatureStore(session_cap=cfg.redis.session_cap)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, watcher: RegistryWatcher, router: Router | None = None,
                 supervision: SharedSupervision | None = None) -> None:
        self.watcher = watcher
        self.router = router
        self.supervision = supervision

    def _status(self) -> pb.StatusResponse:
        extra: dict[str, Any] = self.router.status() if self.router is not None else {}
        if self.supervision is not None:
            extra["supervisor"] = pb.SupervisorStatus(**self.supervision.snapshot())
        return pb.StatusResponse(**self.watcher.status(), **extra)  # type: ignore[arg-type]

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> Any:
        return self._status()

    async def Reload(self, request: pb.ReloadRequest, context: grpc.aio.ServicerContext) -> Any:
        await self.watcher.check(force=True)
        if self.router is not None:  # and the flags file, refused content included
            await self.router.reload(force=True)
        return self._status()


@dataclass
class RunningServer:
    server: Any  # grpc.aio.Server, or grpc.Server for the sync transport
    service: RecommendService
    health: Any
    port: int
    watcher: RegistryWatcher | None = None
    router: Router | None = None  # A/B flags (cfg.flags_file)
    signals: LogSignals | None = None  # the event log's state into metrics (Redis stores)
    loop_health: LoopHealth | None = None  # event-loop lag and GC pauses into metrics
    admin: grpc.aio.Server | None = None
    admin_port: int = -1
    restore: list[Callable[[], None]] = field(default_factory=list)  # process-wide settings to put back

    async def set_serving(self) -> None:
        self.service.metrics.set_serving(True)
        for name in ("", SERVICE_NAME):
            await _maybe_await(self.health.set(name, health_pb2.HealthCheckResponse.SERVING))

    async def stop(self, grace: float = 1.0) -> None:
        """Graceful drain: NOT_SERVING, stop accepting, let in-flight calls finish within ``grace``."""
        if self.watcher is not None:
            await self.watcher.stop()
        if self.router is not None:
            await self.router.stop()
        if self.signals is not None:
            await self.signals.stop()
        if self.loop_health is not None:
            await self.loop_health.stop()
        self.service.metrics.set_serving(False)
        await _maybe_await(self.health.enter_graceful_shutdown())
        stopped = self.server.stop(grace)
        if isinstance(stopped, threading.Event):  # the sync transport: wait off the event loop
            await asyncio.get_running_loop().run_in_executor(None, stopped.wait)
        else:
            await stopped
        if self.admin is not None:
            await self.admin.stop(0)
        await self.service.close()
        while self.restore:
            self.restore.pop()()


async def _maybe_await(x: Any) -> None:
    """The aio health servicer's methods are coroutines; the sync one's are plain calls."""
    if inspect.isawaitable(x):
        await x


def _add_port(server: Any, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError as e:  # grpc's "Failed to bind": most often the port is taken
        raise TwoTowerError(f"cannot bind {address}: in use or not available") from e
    if port == 0:
        raise TwoTowerError(f"cannot bind {address}: in use or not available")
    return int(port)


async def start_server(cfg: ServeConfig, *, bundle_path: Path | None = None, registry: Path | None = None,
                       store: FeatureStore | None = None, bind_early: bool = True,
                       reuse_port: bool = False, admin_port: int | None = None, swap_turn: SwapTurn | None = None,
                       supervision: SharedSupervision | None = None) -> RunningServer:
    """Bind, report NOT_SERVING, load + verify + warm the bundle, then report SERVING.

    ``reuse_port`` (workers sharing a port) sets SO_REUSEPORT; otherwise it is off, so a
    port someone else holds is an error rather than a silent second listener.
    ``bind_early=False`` (those workers) loads and warms first and binds only then: the
    kernel spreads new connections over every listener, so a listener that is not ready
    yet would draw traffic it can only refuse. ``admin_port`` overrides ``cfg.admin_port``.
    A supervisor's workers get its ``swap_turn`` (they swap versions one at a time) and its
    ``supervision`` state (shown by ``admin status``).
    ``cfg.tls`` puts TLS (or mutual TLS) on the serving and admin ports.
    """
    import faiss

    admin_port = cfg.admin_port if admin_port is None else admin_port
    # Both raise ConfigError naming the setting, before anything is bound or loaded.
    tls = load_server_tls(cfg.tls)
    credentials = tls.credentials() if tls is not None else None
    admin_token = check_admin_exposure(cfg, admin_port=admin_port)
    if cfg.flags_file and registry is None:
        raise ConfigError("flags_file", "A/B flags pin registry versions: serve with --registry")

    # A process-wide FAISS setting, applied at the serving edge and put back on stop
    # (in-process servers in tests and the demo share the interpreter with other code).
    old_blas = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = cfg.search_blas_threshold
    options = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),
        *((("grpc.max_concurrent_streams", cfg.max_concurrent_streams),) if cfg.max_concurrent_streams else ()),
    ]
    service = RecommendService(cfg, store or make_store(cfg))
    # Past the batcher's bound, refuse in gRPC's core (RESOURCE_EXHAUSTED) before a Python
    # handler runs at all: measured at 1.5x the peak, calls queued in front of the handlers
    # waited out their deadlines before admission control could see them.
    max_rpcs = cfg.batching.max_pending + MAX_RPCS_HEADROOM if cfg.batching.max_pending else None
    server: Any
    health_servicer: Any
    if cfg.transport == "sync":
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(max_workers=cfg.sync_threads, thread_name_prefix="grpc"),
                             options=options, maximum_concurrent_rpcs=max_rpcs)
        add_recommender(SyncRecommenderServicer(service, asyncio.get_running_loop()), server)
        health_servicer = health.HealthServicer()
    else:
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_rpcs)
        add_recommender(RecommenderServicer(service), server)
        health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)  # v1 and v1alpha
    for name in ("", SERVICE_NAME):
        await _maybe_await(health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING))
    running = RunningServer(server, service, health_servicer, -1)
    # gc.unfreeze: the service freezes its model's objects on install (see RecommendService.install).
    running.restore += [lambda: setattr(faiss.cvar, "distance_compute_blas_threshold", old_blas), gc.unfreeze]

    async def bind() -> None:
        running.port = _add_port(server, f"{cfg.host}:{cfg.port}", credentials)
        await _maybe_await(server.start())

    try:
        if bind_early or registry is None:
            await bind()
        if registry is not None:
            registry_mod.current_path(registry)  # a clear error if there is nothing to serve
            running.watcher = RegistryWatcher(service, registry, poll_s=cfg.registry_poll_s, swap_turn=swap_turn)
            if not await running.watcher.check(force=True):
                raise TwoTowerError(f"cannot serve {registry}: {running.watcher.state.last_error}")
            if cfg.flags_file:
                running.router = await start_router(service, cfg, registry)
            if admin_port >= 0:
                # Never shared: each process answers for its own loaded version. Bound before the
                # serving port, so a taken admin port fails the start before any traffic arrives.
                running.admin = grpc.aio.server(
                    options=[("grpc.so_reuseport", 0)],
                    interceptors=[token_interceptor(admin_token)] if admin_token else None)
                pb_grpc.add_AdminServicer_to_server(AdminServicer(running.watcher, running.router, supervision),
                                                    running.admin)
                running.admin_port = _add_port(running.admin, f"{cfg.admin_host}:{admin_port}", credentials)
                await running.admin.start()
            if running.port < 0:
                await bind()
            await running.set_serving()
            running.watcher.start()
            if running.router is not None:
                running.router.start()
        elif bundle_path is not None:
            await load_and_serve(running, bundle_path)
        if isinstance(service.store, RedisFeatureStore) and service.metrics.enabled and cfg.log_signals_s > 0:
            running.signals = LogSignals(service.store, service.metrics, every_s=cfg.log_signals_s)
            running.signals.start()
        if service.metrics.enabled:
            running.loop_health = LoopHealth(service.metrics.registry)
            running.loop_health.start()
    except BaseException:
        await running.stop(grace=0)
        raise
    return running


async def start_router(service: RecommendService, cfg: ServeConfig, registry: Path) -> Router:
    """Load the flags file and every version it pins (warmed) before the server reports
    SERVING; a file that cannot serve is a start error (later ones only fail a reload)."""
    from online.experiments import Router

    router = Router(service, registry=registry, flags_file=Path(cfg.flags_file), poll_s=cfg.registry_poll_s,
                    max_resident_mb=cfg.max_resident_mb, max_shadow_inflight=cfg.max_shadow_inflight,
                    shadow_time_share=cfg.shadow_time_share,
                    cache_size=cfg.assignment_cache)
    if not await router.reload(force=True):
        raise TwoTowerError(f"cannot serve with flags {cfg.flags_file}: {router.state.error}")
    service.router = router
    return router


async def load_and_serve(running: RunningServer, bundle_path: Path) -> LoadedModel:
    lifecycle = running.service.lifecycle
    model = await lifecycle.candidate(bundle_path)
    lifecycle.install(model)
    log.info("loaded %s from %s%s", model.version, bundle_path, ", warmed" if running.service.cfg.warmup else "")
    await running.set_serving()
    return model


class ServerThread:
    """A server on its own event loop in a background thread: for the in-process
    demo and tests, where the calling thread uses the blocking client."""

    def __init__(self, cfg: ServeConfig, **kwargs: Any) -> None:
        import threading

        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-server", daemon=True)
        self._thread.start()
        try:
            self.running: RunningServer = self.call(start_server(cfg, **kwargs), timeout=120)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            raise

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"{self.cfg.host}:{self.running.port}"

    def stop(self) -> None:
        self.call(self.running.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
