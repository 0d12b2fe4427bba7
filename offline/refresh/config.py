"""A refresh's settings (``twotower refresh`` flags map onto these fields one to one)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from towers.errors import ConfigError
from towers.store_format import DEFAULT_PREFIX, REFRESH_GROUP

MODES = ("embed", "train")
ENGINES = ("local", "ray")
STEPS = ("read", "merge", "candidate", "index", "batch_score", "evaluate", "publish", "ack", "gc")


@dataclass(frozen=True, kw_only=True)
class RefreshConfig:
    registry: Path  # the bundle registry CURRENT is read from and the candidate published to
    redis_url: str  # the event stream, the lock, and where the new version's keys are loaded
    run_root: Path  # a directory per run (checkpoints, the candidate bundle, the report)
    store_root: Path  # the interaction store (Parquet partitioned by day)
    data_dir: Path  # dataset cache: seeds an empty store with CURRENT's training dataset
    mode: str = "embed"  # embed | train (see the module docstring)
    engine: str = "local"
    prefix: str = DEFAULT_PREFIX  # Redis key prefix (the server's)
    group: str = REFRESH_GROUP  # consumer group on the event stream
    consumer: str = "refresh"  # one name: a later run finds a crashed run's pending entries
    holdout_s: int = 86_400  # the gate's window: the newest events within this many seconds
    max_drop: float = 0.01  # gate: refuse a candidate measurably worse than CURRENT by more (see evaluate)
    gate: bool = True  # False: publish whatever the evaluation says (it is still measured and reported)
    max_targets: int = 20_000  # holdout events scored (a deterministic sample beyond this)
    gate_min_targets: int = 20  # below: measured and reported, but too few to refuse on
    # Train mode: a retrained model passes only on at least this many holdout events (the
    # window reaches back, never into what CURRENT trained on); fewer: CURRENT stays tonight.
    train_min_targets: int = 1_000
    train_min_users: int = 100  # ... of at least this many distinct users (the test's real sample size)
    train_epochs: int = 3  # train mode: warm-start epochs (an epoch is kept only if it beats the start)
    # Train mode: the published towers are ``blend`` x the warm start's + (1 - blend) x CURRENT's
    # (weight averaging; 1.0: the warm start's alone).
    train_blend: float = 1.0
    # Train mode: a refused retrained candidate is followed by an embed run (see ``refresh``).
    train_fallback: bool = True
    batch_k: int = 100  # precomputed recs per user
    grace_s: int = 3_600  # keep a retired version's Redis keys this long (servers still swapping)
    flags: Path | None = None  # versions a running or paused experiment pins keep their keys and directories
    keep_versions: int = 2  # registry: the newest this many versions beside CURRENT (and pinned) stay
    # Interaction store retention: days of history kept before the newest event (0: all). A
    # train-mode refresh trains on what is kept; embed mode re-embeds from it.
    store_retention_days: int = 0
    # Entries one run takes from the log (pending first); the rest wait for the next run. Bounds
    # the run's memory: measured ~1 GB + ~0.7 KB per event taken (bench/refresh_backlog.py), so
    # 5M fits the CronJob's 8Gi; at 100 events/s (8.6M a day) schedule it twice a day.
    max_events: int = 5_000_000
    lock_ttl_ms: int = 60_000
    seed: int = 0
    # A catalog feed in the spec's item schema (the items table's id, feature and title columns,
    # any table format; ``offline.loading.read_item_feed``): how items that first appear in
    # events get the features the item tower embeds them from (known items keep theirs).
    item_features: Path | None = None
    threads: int = 1  # torch threads of the train mode (1: a shared machine's OpenMP spin costs more)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("--mode", f"{self.mode!r}: choose one of {', '.join(MODES)}")
        if self.engine not in ENGINES:
            raise ConfigError("--engine", f"{self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.engine == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("--engine", "ray: Ray is not installed; install the [ray] extra (twotower[ray])")
        if not 0 <= self.max_drop < 1:
            raise ConfigError("--max-drop", f"{self.max_drop}: must be in [0, 1)")
        if self.holdout_s <= 0:
            raise ConfigError("--holdout-s", f"{self.holdout_s}: must be positive")
        if self.max_events < 1:
            raise ConfigError("--max-events", f"{self.max_events}: must be >= 1")
        if self.keep_versions < 0:
            raise ConfigError("--keep-versions", f"{self.keep_versions}: must be >= 0")
        if self.store_retention_days < 0:
            raise ConfigError("--store-retention-days", f"{self.store_retention_days}: must be >= 0 (0: keep all)")
        if not 0 < self.train_blend <= 1:
            raise ConfigError("--train-blend", f"{self.train_blend}: must be in (0, 1]")
        if self.train_min_targets < 0:
            raise ConfigError("--train-min-targets", f"{self.train_min_targets}: must be >= 0")
        if self.train_min_users < 0:
            raise ConfigError("--train-min-users", f"{self.train_min_users}: must be >= 0")
