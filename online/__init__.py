"""The online gRPC service: configuration, feature stores, the dynamic batcher, the request
path and its degradation ladder, hot swap, the worker supervisor and the Python client.
These are the names other code (bench, the demo, tests) uses. Names resolve on first use
(PEP 562): the supervisor imports ``online`` without creating any gRPC object before it forks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towers.lazy import lazy_exports

_EXPORTS = {
    "ServeConfig": "online.config", "load_config": "online.config", "RecommendService": "online.service",
    "LoadedModel": "online.lifecycle", "start_server": "online.server", "ServerThread": "online.server",
    "RunningServer": "online.server", "RecommenderClient": "online.client", "FeatureStore": "online.feature_store",
    "InMemoryFeatureStore": "online.feature_store", "RedisFeatureStore": "online.redis_store",
    "StoreCapabilities": "online.feature_store", "BatchFeatures": "online.feature_store",
    "BatchRecs": "online.feature_store", "RedisConfig": "online.config", "Batcher": "online.batcher",
    "Ladder": "online.degradation",
    "RecRequest": "online.request", "RecResult": "online.request", "StageTimings": "online.request",
    "Supervisor": "online.supervisor", "RegistryWatcher": "online.hotswap",
}
__all__ = [
    "BatchFeatures",
    "BatchRecs",
    "Batcher",
    "FeatureStore",
    "InMemoryFeatureStore",
    "Ladder",
    "LoadedModel",
    "RecRequest",
    "RecResult",
    "RecommendService",
    "RecommenderClient",
    "RedisConfig",
    "RedisFeatureStore",
    "RegistryWatcher",
    "RunningServer",
    "ServeConfig",
    "ServerThread",
    "StageTimings",
    "StoreCapabilities",
    "Supervisor",
    "load_config",
    "start_server",
]

if TYPE_CHECKING:
    from online.batcher import Batcher
    from online.client import RecommenderClient
    from online.config import RedisConfig, ServeConfig, load_config
    from online.degradation import Ladder
    from online.feature_store import BatchFeatures, BatchRecs, FeatureStore, InMemoryFeatureStore, StoreCapabilities
    from online.hotswap import RegistryWatcher
    from online.lifecycle import LoadedModel
    from online.redis_store import RedisFeatureStore
    from online.request import RecRequest, RecResult, StageTimings
    from online.server import RunningServer, ServerThread, start_server
    from online.service import RecommendService
    from online.supervisor import Supervisor


__getattr__ = lazy_exports(__name__, _EXPORTS)
