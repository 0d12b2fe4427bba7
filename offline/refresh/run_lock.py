"""A Redis lease that keeps two refresh jobs from publishing over each other.

The nightly refresh may be started on more than one host (a cron on two replicas, an operator
re-running it by hand while the scheduled one is still going). Two refreshes that both
publish would flip ``CURRENT`` in an arbitrary order and acknowledge each other's events, so
only the holder of this lock runs.

The lock is a lease, redis-py's ``redis.lock.Lock`` (``SET key token NX PX ttl`` to take it,
Lua compare-and-pexpire to extend it, compare-and-delete to release it), with the owner
``host:pid:nonce`` as its token. A background thread extends it every ttl/3, so a holder that
crashes frees it within ``ttl``. A holder that stalls (a long GC pause, a frozen VM, a network
partition) past ``ttl`` may find the key expired and taken by someone else; :meth:`RefreshLock.check`
finds that out, and the refresh calls it right before publishing so a holder that lost the
lock never publishes. ``check`` also extends the lease, so the publish that follows it has a
whole ``ttl`` to finish. (Without fencing tokens at the registry no lease is airtight against
a stall *between* ``check`` and the publish; the registry's flock still serializes the flip.)
A holder never deletes a lock another owner has taken.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from types import TracebackType
from typing import Any

from towers.errors import ConfigError, FeatureStoreError, LockError, LockHeld, LockLost
from towers.store_format import is_cluster_url

log = logging.getLogger(__name__)

MIN_TTL_MS = 30  # below this, renewing every ttl/3 is no longer meaningful


def default_owner() -> str:
    """host:pid:nonce — the host and pid tell an operator where the holder runs; the nonce
    keeps two locks in one process (or a reused pid) apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RefreshLock:
    """``with RefreshLock(redis_url=..., key=...) as lock: ...; lock.check(); publish(...)``"""

    def __init__(self, *, redis_url: str, key: str, ttl_ms: int = 60_000, owner: str | None = None) -> None:
        import redis

        if not key:
            raise ConfigError("key", "the lock key must not be empty")
        if ttl_ms < MIN_TTL_MS:
            raise ConfigError("ttl_ms", f"{ttl_ms} is below the minimum of {MIN_TTL_MS} ms")
        self.key = key
        self.ttl_ms = int(ttl_ms)
        self.owner = owner or default_owner()
        # A call must give up well within one renewal interval, or a hung connection would
        # silently let the lease run out while the thread waits on it.
        timeout = max(0.05, min(10.0, self.ttl_ms / 3000))
        if is_cluster_url(redis_url):  # one key: a cluster client routes it (and its scripts) to its slot
            from towers.redis_load import sync_client

            self._redis = sync_client(redis_url, socket_timeout=timeout)
        else:
            self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, redis.exceptions.RedisClusterException,
                                                         OSError)
        # thread_local=False: the renew thread extends with the token the acquiring thread set.
        self._lock = redis.lock.Lock(self._redis, key, timeout=self.ttl_ms / 1000, blocking=False,
                                     thread_local=False)
        self._mu = threading.Lock()
        self._held = False
        self._lost: str | None = None  # sticky: once lost, this acquisition can never publish
        self._confirmed_at = 0.0  # monotonic time the key was last seen holding our owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- redis calls -------------------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as e:
            raise FeatureStoreError(f"lock {self.key!r}: redis {what} failed: {type(e).__name__}: {e}") from e

    def holder(self) -> str | None:
        """Who holds the lock now (any owner), None if nobody does."""
        raw = self._call("get", self._redis.get, self.key)
        return None if raw is None else raw.decode(errors="replace")

    # -- acquire / renew / check / release ---------------------------------------------------

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeld` naming the holder (never waits: a second
        refresh should stop, not queue behind the first)."""
        with self._mu:
            if self._held:
                raise LockError(f"lock {self.key!r} is already held by this object ({self.owner})")
            t0 = time.monotonic()
            ok = self._call("set", self._lock.acquire, blocking=False, token=self.owner)
            if not ok:
                holder = self.holder()
                if holder is None:  # expired between SET and GET: one more try, then give up
                    t0 = time.monotonic()
                    ok = self._call("set", self._lock.acquire, blocking=False, token=self.owner)
                    holder = None if ok else (self.holder() or "<unknown>")
                if not ok:
                    raise LockHeld(self.key, str(holder),
                                   f"lock {self.key!r} is held by {holder!r} (another refresh is running; "
                                   f"it expires {self.ttl_ms} ms after its holder stops renewing it)")
            self._held, self._lost, self._confirmed_at = True, None, t0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._renew_loop, args=(self._stop,),
                                            name=f"lock-renew:{self.key}", daemon=True)
            self._thread.start()
        log.info("lock %s acquired by %s (ttl %d ms)", self.key, self.owner, self.ttl_ms)

    def _extend(self) -> bool:
        """One compare-and-pexpire. True: the key held our owner and now lives another ttl.
        A success proves the lease was never interrupted: had it expired, the key would be
        gone or another owner's, and we never set it again. Redis errors propagate."""
        import redis

        t0 = time.monotonic()
        try:
            self._lock.extend(self.ttl_ms / 1000, replace_ttl=True)
        except redis.exceptions.LockNotOwnedError:
            return False
        self._confirmed_at = t0
        return True

    def _mark_lost(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            log.error("lock %s lost by %s: %s", self.key, self.owner, why)

    def _renew_loop(self, stop: threading.Event) -> None:
        interval = self.ttl_ms / 3000
        while not stop.wait(interval):
            if time.monotonic() - self._confirmed_at >= self.ttl_ms / 1000:
                self._mark_lost(f"not renewed for {self.ttl_ms} ms; the lease may have expired")
                return
            try:
                if not self._extend():
                    self._mark_lost("the key no longer holds our owner (expired or taken over)")
                    return
            except self._errors as e:  # transient: the next tick retries while the lease lasts
                log.warning("lock %s: renewal failed (%s: %s); retrying", self.key, type(e).__name__, e)

    def check(self) -> None:
        """Raise :class:`LockLost` unless this object still holds the lock, verified in Redis
        now; extends the lease on success. Call it right before any irreversible step."""
        if not self._held:
            raise LockLost(f"lock {self.key!r} is not held by {self.owner} (never acquired or released)")
        if self._lost is not None:
            raise LockLost(f"lock {self.key!r} lost by {self.owner}: {self._lost}")
        if time.monotonic() - self._confirmed_at >= self.ttl_ms / 1000:
            self._mark_lost(f"not renewed for {self.ttl_ms} ms; the lease may have expired")
            raise LockLost(f"lock {self.key!r} lost by {self.owner}: {self._lost}")
        try:
            ok = self._extend()
        except self._errors as e:
            # Cannot prove we hold it: do not publish. The lease itself may still be ours; a
            # later check can succeed if Redis comes back before it runs out.
            raise LockLost(f"lock {self.key!r}: cannot verify ownership ({type(e).__name__}: {e})") from e
        if not ok:
            holder = None
            with contextlib.suppress(FeatureStoreError):
                holder = self.holder()
            self._mark_lost(f"the key holds {holder!r}, not us" if holder else "the key expired")
            raise LockLost(f"lock {self.key!r} lost by {self.owner}: {self._lost}")

    @property
    def held(self) -> bool:
        """Acquired, not released, and not known to be lost (without asking Redis)."""
        return self._held and self._lost is None

    def release(self) -> bool:
        """Stop renewing and delete the key if it still names us; True if it was deleted.
        A lock another owner has taken over is left alone."""
        with self._mu:
            if not self._held:
                return False
            self._stop.set()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join()
            self._thread = None
            self._held = False
            deleted = self._call("release", self._release_key)
        if deleted:
            log.info("lock %s released by %s", self.key, self.owner)
        else:
            log.warning("lock %s: not released by %s (it had expired or was taken over)", self.key, self.owner)
        return deleted

    def _release_key(self) -> bool:
        import redis

        try:
            self._lock.release()
        except redis.exceptions.LockNotOwnedError:  # expired, or another owner's now: left alone
            return False
        return True

    def close(self) -> None:
        self.release()
        self._redis.close()

    def __enter__(self) -> RefreshLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except FeatureStoreError:
            if exc is None:
                raise
            # Do not hide the error that ended the block; the lease expires on its own.
            log.exception("lock %s: release failed while handling %s", self.key, type(exc).__name__)
