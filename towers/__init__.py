"""What a model version is: the feature pipeline, the towers' exported arrays, the session
combiner, the versioned bundle and registry, the one ranking path, and the feature store's
key layout. ``offline`` and ``online`` both stand on this package and use these names.

Names resolve on first use (PEP 562), so importing ``towers`` for one helper does not load
FAISS, and nothing here ever imports torch (``towers.model`` is for training only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towers.lazy import lazy_exports

_EXPORTS = {
    "Bundle": "towers.bundle", "load_bundle": "towers.bundle:load", "verify_bundle": "towers.bundle:verify",
    "CombinerParams": "towers.combiner", "FeaturePipeline": "towers.features", "Vocabulary": "towers.features",
    "IndexSpec": "towers.index", "RankModel": "towers.ranking", "QueryBatch": "towers.ranking",
    "Ranked": "towers.ranking", "rank": "towers.ranking",
    "Rung": "towers.labels", "Source": "towers.labels", "Mode": "towers.labels",
    "publish": "towers.registry", "current_path": "towers.registry", "current_version": "towers.registry",
    "RedisKeys": "towers.store_format", "Event": "towers.store_format", "EVENT_TYPES": "towers.store_format",
    "load_bundle_into_redis": "towers.redis_load", "Flags": "towers.flags", "load_flags": "towers.flags",
    "assign": "towers.assign", "TwoTowerError": "towers.errors", "ConfigError": "towers.errors",
    "BundleError": "towers.errors", "FeatureStoreError": "towers.errors", "InvalidRequest": "towers.errors",
}
__all__ = [
    "EVENT_TYPES",
    "Bundle",
    "BundleError",
    "CombinerParams",
    "ConfigError",
    "Event",
    "FeaturePipeline",
    "FeatureStoreError",
    "Flags",
    "IndexSpec",
    "InvalidRequest",
    "Mode",
    "QueryBatch",
    "RankModel",
    "Ranked",
    "RedisKeys",
    "Rung",
    "Source",
    "TwoTowerError",
    "Vocabulary",
    "assign",
    "current_path",
    "current_version",
    "load_bundle",
    "load_bundle_into_redis",
    "load_flags",
    "publish",
    "rank",
    "verify_bundle",
]

if TYPE_CHECKING:
    from towers.assign import assign
    from towers.bundle import Bundle
    from towers.bundle import load as load_bundle
    from towers.bundle import verify as verify_bundle
    from towers.combiner import CombinerParams
    from towers.errors import BundleError, ConfigError, FeatureStoreError, InvalidRequest, TwoTowerError
    from towers.features import FeaturePipeline, Vocabulary
    from towers.flags import Flags, load_flags
    from towers.index import IndexSpec
    from towers.labels import Mode, Rung, Source
    from towers.ranking import QueryBatch, Ranked, RankModel, rank
    from towers.redis_load import load_bundle_into_redis
    from towers.registry import current_path, current_version, publish
    from towers.store_format import EVENT_TYPES, Event, RedisKeys


__getattr__ = lazy_exports(__name__, _EXPORTS)
