"""A refresh's settings (``twotower refresh`` flags map onto these fields one to one)."""

from __future__ import annotations

import importlib.util
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from towers.cliargs import Doc
from towers.errors import ConfigError
from towers.store_format import DEFAULT_PREFIX, REFRESH_GROUP

MODES = ("embed", "train")
ENGINES = ("local", "ray")
Mode = Literal["embed", "train"]
Engine = Literal["local", "ray"]
NonNeg = Annotated[int, Field(ge=0)]
# Fields whose flag is not ``--`` + the name with dashes (errors name the flag a user typed).
_FLAG = {"holdout_s": "--holdout-hours", "train_epochs": "--epochs", "store_root": "--store", "run_root": "--run-dir"}
_CHECKS: dict[str, TypeAdapter[Any]] = {}  # field -> its declared type (bounds included), built once
STEPS = ("read", "merge", "candidate", "index", "batch_score", "evaluate", "publish", "ack", "gc")


@dataclass(frozen=True, kw_only=True)
class RefreshConfig:
    registry: Path  # the bundle registry CURRENT is read from and the candidate published to
    redis_url: str  # the event stream, the lock, and where the new version's keys are loaded
    run_root: Path  # a directory per run (checkpoints, the candidate bundle, the report)
    store_root: Path  # the interaction store (Parquet partitioned by day)
    data_dir: Path  # dataset cache: seeds an empty store with CURRENT's training dataset
    mode: Annotated[Mode, Doc("embed: fresh user vectors from CURRENT's towers; train: warm-start the towers "
                              "too (see offline.refresh)")] = "embed"
    engine: Annotated[Engine, Doc("ray: the embedding and batch-scoring steps on a local Ray (the [ray] "
                                  "extra)")] = "local"
    prefix: str = DEFAULT_PREFIX  # Redis key prefix (the server's)
    group: str = REFRESH_GROUP  # consumer group on the event stream
    consumer: str = "refresh"  # one name: a later run finds a crashed run's pending entries
    holdout_s: Annotated[int, Field(gt=0)] = 86_400  # the gate's window: the newest events within this many seconds
    max_drop: Annotated[float, Field(ge=0, lt=1), Doc("gate: refuse a candidate whose Recall@20 is measurably "
                                                      "(95%) lower than CURRENT's by more than this fraction")] = 0.01
    gate: bool = True  # False: publish whatever the evaluation says (it is still measured and reported)
    max_targets: Annotated[int, Field(ge=1)] = 20_000  # holdout events scored (a deterministic sample beyond this)
    gate_min_targets: NonNeg = 20  # below: measured and reported, but too few to refuse on
    # Train mode: a retrained model passes only on at least this many holdout events (the
    # window reaches back, never into what CURRENT trained on); fewer: CURRENT stays tonight.
    train_min_targets: Annotated[NonNeg, Doc("train mode: holdout events a retrained model must be scored on to "
                                             "be published")] = 1_000
    train_min_users: Annotated[NonNeg, Doc("train mode: ... and the distinct users they come from")] = 100
    train_epochs: Annotated[int, Field(ge=1), Doc("train mode: warm-start epochs (an epoch is kept only if it beats "
                                                  "the start)")] = 3
    # Train mode: the published towers are ``blend`` x the warm start's + (1 - blend) x CURRENT's
    # (weight averaging; 1.0: the warm start's alone).
    train_blend: Annotated[float, Field(gt=0, le=1),
                           Doc("train mode: publish this share of the warm start's weights averaged with "
                               "CURRENT's (1: the warm start's alone)")] = 1.0
    # Train mode: a refused retrained candidate is followed by an embed run (see ``refresh``).
    train_fallback: bool = True
    batch_k: Annotated[int, Field(ge=1)] = 100  # precomputed recs per user
    grace_s: NonNeg = 3_600  # keep a retired version's Redis keys this long (servers still swapping)
    flags: Path | None = None  # versions a running or paused experiment pins keep their keys and directories
    keep_versions: Annotated[NonNeg, Doc("registry retention: keep the newest N versions beside CURRENT and "
                                         "pinned ones (rollbacks)")] = 2
    # Interaction store retention: days of history kept before the newest event (0: all). A
    # train-mode refresh trains on what is kept; embed mode re-embeds from it.
    store_retention_days: Annotated[NonNeg, Doc("interaction store: keep this many days of history before the "
                                                "newest event (0: all)")] = 0
    # Entries one run takes from the log (pending first); the rest wait for the next run. Bounds
    # the run's memory: measured ~1 GB + ~0.7 KB per event taken (bench/refresh_backlog.py), so
    # 5M fits the CronJob's 8Gi; at 100 events/s (8.6M a day) schedule it twice a day.
    max_events: Annotated[int, Field(ge=1), Doc("take at most N log entries this run (pending ones first); the "
                                                "rest wait for the next run")] = 5_000_000
    lock_ttl_ms: Annotated[int, Field(ge=1)] = 60_000
    seed: int = 0
    # A catalog feed in the spec's item schema (the items table's id, feature and title columns,
    # any table format; ``offline.loading.read_item_feed``): how items that first appear in
    # events get the features the item tower embeds them from (known items keep theirs).
    item_features: Path | None = None
    # torch threads of the train mode (1: a shared machine's OpenMP spin costs more)
    threads: Annotated[int, Field(ge=1)] = 1

    def __post_init__(self) -> None:
        """Each field against its declared type and bounds (pydantic), errors naming the flag."""
        if not _CHECKS:
            hints = typing.get_type_hints(RefreshConfig, include_extras=True)
            _CHECKS.update({f.name: TypeAdapter(hints[f.name]) for f in fields(RefreshConfig)
                            if hints[f.name] not in (Path, str, bool, Path | None)})
        for name, adapter in _CHECKS.items():
            value = getattr(self, name)
            try:
                adapter.validate_python(value, strict=True)
            except ValidationError as e:
                flag = _FLAG.get(name, "--" + name.replace("_", "-"))
                raise ConfigError(flag, f"{value!r}: {e.errors()[0]['msg']}") from None
        if self.engine == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("--engine", "ray: Ray is not installed; install the [ray] extra (twotower[ray])")
