"""The one exception tree of twotower.

Third-party errors (OSError, redis, faiss, grpc) are translated into these at
the boundary with ``raise ... from``; the gRPC layer maps them to status codes
in exactly one place (``online.server.STATUS_OF``), the CLI maps them to exit code 2.
"""

from __future__ import annotations


class TwoTowerError(Exception):
    """Base of every error twotower raises on purpose."""


class ConfigError(TwoTowerError):
    """A configuration value or CLI flag is invalid. ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InvalidRequest(TwoTowerError):
    """A request is malformed; maps to INVALID_ARGUMENT. ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class DataError(TwoTowerError):
    """A dataset cannot be fetched or parsed; the message names the file (and line)."""


class BundleError(TwoTowerError):
    """A bundle is missing, incomplete or corrupt; the message says what is wrong."""


class RegistryError(TwoTowerError):
    """The registry (CURRENT pointer, bundle directories) is unusable."""


class FeatureStoreError(TwoTowerError):
    """The online feature store failed or timed out; serving degrades on it."""


class FeatureStoreTimeout(FeatureStoreError):
    """A feature store call did not answer within its budget (counted apart from failures)."""


class VersionNotInStore(FeatureStoreError):
    """The feature store answered, and does not hold a version's keys (not published with
    ``--redis``): a definite refusal, unlike a store that did not answer."""


class Overloaded(TwoTowerError):
    """A request refused at admission (the worker's queue is full, or its deadline cannot be
    met behind the queue); maps to RESOURCE_EXHAUSTED with retry pushback."""

    def __init__(self, reason: str, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason = reason  # queue_full | deadline
        self.retry_after_s = retry_after_s


class NotReady(TwoTowerError):
    """No bundle is loaded yet; maps to UNAVAILABLE."""


class Unsupported(TwoTowerError):
    """A valid request this deployment cannot honour; maps to FAILED_PRECONDITION."""


class LockError(TwoTowerError):
    """A distributed run lock (``offline.refresh.run_lock``) could not be taken or was not kept."""


class LockHeld(LockError):
    """Another owner holds the lock; ``holder`` names it (host:pid:nonce) so an operator can find it."""

    def __init__(self, key: str, holder: str, message: str = "") -> None:
        super().__init__(message or f"lock {key!r} is held by {holder!r}")
        self.key = key
        self.holder = holder


class LockLost(LockError):
    """The lock this process held expired or was taken over: it must not publish."""
