"""``twotower refresh``: the nightly loop that keeps a model alive.

One run, each step checkpointed in the run directory (``offline.run_steps``), so that
``--resume RUN`` continues after a crash and never repeats a step whose effect is out:

1. ``read``      new events from the event stream (consumer group; pending entries of an
                 earlier, crashed run first), saved in the run dir;
2. ``merge``     into the interaction store (Parquet by day; repeats by event identity are
                 stored once, so a replay stores nothing twice). The bundle's dataset spec
                 maps the events (``interactions.event_type``): only the ``positives`` types
                 are interactions (the others are consumed, not stored), and ``weights`` are
                 the per-type training weights of the ``train`` mode; a spec without event
                 types takes every event at weight 1;
3. ``candidate`` a new bundle from CURRENT's towers. Modes:
                 - ``embed``: re-embed the users with new events and every new user from their
                   history (the user tower reads it), append new items that have features;
                 - ``train``: warm-start the towers on the store's interactions before the
                   holdout window for a few epochs, then re-embed every user and item;
4. ``index``     rebuild the FAISS index (same type and search settings as CURRENT) when the
                 item embeddings changed;
5. ``batch_score`` the precomputed top-K per user (past items excluded or not, as the spec's
                 ``policies.exclude_seen`` says; the gate below follows the same policy);
6. ``evaluate``  candidate vs CURRENT on the holdout window (every new event in the most
                 recent ``holdout_s`` is a target, with what came before it as known), and the
                 gate: refused when measurably (95%, paired) worse than CURRENT by more than
                 ``max_drop`` of its Recall@20;
7. ``publish``   (gate passed, lock still ours) install, load the version's keys into Redis,
                 flip CURRENT;
8. ``ack``       ``XACK`` the consumed entries: after publish, so a crash replays them;
9. ``gc``        retention (``offline.retention``): delete Redis keys of versions retired
                 more than ``grace_s`` ago, and registry directories beyond the newest
                 ``keep_versions``; never CURRENT's nor a version a flags file pins.

A run that ends removes its directory and keeps its report (``RUNS/reports/RUN.json``).

Two refreshes never overlap: the run holds a Redis lock (``offline.run_lock``) and checks it
right before publishing. A run with no new events says so and publishes nothing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from offline.event_log import EventLog, ReadBatch
from offline.event_types import interactions_of, seed_types, training_interactions
from offline.interactions import InteractionRows, InteractionStore
from offline.loading import read_item_feed, take_rows
from offline.refresh_gate import GateRule, decide, embed_prefixes, hits, holdout_start
from offline.retention import collect_garbage, mark_retired, prune_registry
from offline.run_events import EventPages
from offline.run_lock import RefreshLock
from offline.run_steps import RunDir, write_json_atomic
from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers import registry as registry_mod
from towers.errors import ConfigError, DataError, FeatureStoreError, RegistryError
from towers.features import FeaturePipeline
from towers.spec import DatasetSpec
from towers.store_format import REFRESH_GROUP, redact_url

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
    prefix: str = "tt"  # Redis key prefix (the server's)
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
        if not 0 < self.train_blend <= 1:
            raise ConfigError("--train-blend", f"{self.train_blend}: must be in (0, 1]")
        if self.train_min_targets < 0:
            raise ConfigError("--train-min-targets", f"{self.train_min_targets}: must be >= 0")
        if self.train_min_users < 0:
            raise ConfigError("--train-min-users", f"{self.train_min_users}: must be >= 0")


Fault = Callable[[str], None]


def _no_fault(_: str) -> None:
    pass


def refresh(cfg: RefreshConfig, *, resume: Path | None = None, fault: Fault = _no_fault,
            progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) one refresh; returns its report (also ``RUNS/reports/RUN.json``).

    Train mode with ``train_fallback``: when the gate refuses the retrained candidate, an embed
    run follows on the same (unacknowledged) events, so the night still publishes fresh user
    vectors from CURRENT's towers; its report carries the refused one as ``fallback_from``.
    ``fault(point)`` is a test hook called after each step's checkpoint (``after:<step>``)."""
    report = _refresh_once(cfg, resume=resume, fault=fault, progress=progress, log=log)
    steps = {s["name"]: s["result"] for s in report["steps"]}
    if cfg.mode == "train" and cfg.train_fallback and steps.get("evaluate", {}).get("passed") is False:
        log("refresh: the retrained candidate was refused; re-embedding with CURRENT's towers instead")
        report = {**_refresh_once(replace(cfg, mode="embed"), resume=None, fault=fault, progress=progress, log=log),
                  "fallback_from": report}
    return report


def _refresh_once(cfg: RefreshConfig, *, resume: Path | None, fault: Fault, progress: bool,
                  log: Callable[[str], None]) -> dict[str, Any]:
    from tqdm import tqdm

    current = registry_mod.current_version(cfg.registry)
    if current is None:
        raise RegistryError(f"{cfg.registry}: no CURRENT version to refresh")
    lock = RefreshLock(redis_url=cfg.redis_url, key=f"{cfg.prefix}:refresh:lock", ttl_ms=cfg.lock_ttl_ms)
    lock.acquire()  # before any run directory exists: a refused start leaves nothing behind
    results: dict[str, dict[str, Any]] = {}
    try:
        run = RunDir.open(resume) if resume is not None else RunDir.create(
            cfg.run_root, params={**{k: str(v) for k, v in asdict(cfg).items()}, "parent": current,
                                  "redis_url": redact_url(cfg.redis_url)})  # run.json is on a shared volume
        parent = str(run.params.get("parent", current))
        if resume is not None:
            for name, flag in (("mode", "--mode"), ("engine", "--engine")):
                if str(run.params.get(name, getattr(cfg, name))) != str(getattr(cfg, name)):
                    raise ConfigError(flag, f"run {run.run_id} was started with {flag} {run.params.get(name)}; "
                                            f"resume it with the same")
        job = _Job(cfg, run, parent, lock, log)
        bar = tqdm(STEPS, desc=f"refresh {run.run_id}", unit="step", disable=not progress)
        for step in bar:
            bar.set_postfix_str(step)
            result = results[step] = run.run_step(step, getattr(job, step))
            fault(f"after:{step}")
            if step == "read" and result["events"] == 0 and result["entries"] == 0:
                log("refresh: no new events; nothing to publish")
                break
    finally:
        lock.release()
        lock.close()
        _record_run(cfg, results, log)
    # The run ended (published, refused, or nothing to do): its directory (the events read,
    # the candidate bundle) is no longer needed for a resume. Only its report is kept.
    report_path = cfg.run_root / "reports" / f"{run.run_id}.json"
    report = {**run.report(), "run_dir": str(run.path), "report": str(report_path), "mode": cfg.mode,
              "parent": parent}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report_path, report)
    shutil.rmtree(run.path)
    return report


def _record_run(cfg: RefreshConfig, results: dict[str, dict[str, Any]], log: Callable[[str], None]) -> None:
    """The run's outcome in Redis for the servers' metrics (``EventLog.record_run``); a run
    that raised is "failed". Best effort: a Redis that is down must not hide the run's error."""
    pub = results.get("publish")
    if "gc" in results:
        outcome = "published" if pub and pub.get("published") else "refused"
    elif "read" in results and not results["read"]["entries"] and not results["read"]["events"]:
        outcome = "unchanged"
    else:
        outcome = "failed"
    try:
        ev = EventLog(redis_url=cfg.redis_url, prefix=cfg.prefix)
        try:
            ev.record_run(outcome=outcome, lost=results.get("read", {}).get("lost", 0), now=time.time(),
                          version=str(pub.get("version", "")) if pub else "")
        finally:
            ev.close()
    except FeatureStoreError as e:
        log(f"refresh: could not record the run's outcome ({outcome}) in Redis: {e}")


class _Job:
    """The steps of one run; each returns a JSON-able dict (its checkpoint)."""

    def __init__(self, cfg: RefreshConfig, run: RunDir, parent: str, lock: RefreshLock,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.run, self.parent, self.lock, self.log = cfg, run, parent, lock, log
        self.store = InteractionStore(cfg.store_root)
        self.cand_dir = run.path / "candidate"
        self._rows: InteractionRows | None = None
        self._spec: DatasetSpec | None = None
        self._spec_read = False

    def spec(self) -> DatasetSpec | None:
        """The parent's dataset spec (saved in its feature pipeline): how events map to
        interactions and the repeat policy. None for a bundle without one."""
        if not self._spec_read:
            d = json.loads((self.cfg.registry / self.parent / "features.json").read_text()).get("spec")
            self._spec, self._spec_read = (DatasetSpec.from_json(d) if d else None), True
        return self._spec

    def _log(self) -> InteractionRows:
        """The interaction store as the steps after ``merge`` need it, read once per process:
        in ``embed`` mode only the users with new events (their history: every other user
        keeps their embedding and recs, so a run's memory follows its events, not the whole
        history); in ``train`` mode all of it."""
        if self._rows is None:
            users = None if self.cfg.mode == "train" else set(self._new_events().user.tolist())
            self._rows = self.store.read(users=users)
        return self._rows

    def _result(self, step: str) -> dict[str, Any]:
        got = self.run.result(step)
        if got is None:
            raise DataError(f"{self.run.path}: step {step!r} has no checkpoint")
        return got

    # -- 1-2: events in -------------------------------------------------------------------------

    def _events_log(self) -> EventLog:
        return EventLog(redis_url=self.cfg.redis_url, prefix=self.cfg.prefix)

    def _pages(self) -> EventPages:
        return EventPages(self.run.path / "events")

    def read(self) -> dict[str, Any]:
        # Page by page into Parquet (offline.run_events): a backlog costs disk, not memory, and
        # at most ``max_events`` entries are taken per run (pending ones first); the rest wait.
        pages = self._pages()
        pages.reset()  # a read that died half way starts over: its entries are still pending
        budget, page = self.cfg.max_events, 10_000
        entries = dead = lost_pending = 0
        ev = self._events_log()
        try:
            ev.ensure_group(self.cfg.group)
            # Before reading: reading past a gap moves the group's delivered point over it.
            lost_new = ev.lost_undelivered(group=self.cfg.group)

            def take(batch: ReadBatch) -> None:
                nonlocal entries, dead, lost_pending
                if batch.ids:
                    pages.write(batch.ids, batch.events)
                entries, dead, lost_pending = entries + len(batch.ids), dead + batch.dead, lost_pending + batch.lost

            # A crashed or refused run's delivered-unacknowledged entries first, then new ones.
            for batch in ev.pending_pages(group=self.cfg.group, consumer=self.cfg.consumer,
                                          count=min(page, budget)):
                take(batch)
                if entries >= budget:
                    break
            while entries < budget:
                batch = ev.read(group=self.cfg.group, consumer=self.cfg.consumer, count=min(page, budget - entries))
                take(batch)
                if not batch.ids and not batch.dead and not batch.lost:
                    break
            left = ev.backlog(group=self.cfg.group) if entries >= budget else 0
            overflow = ev.overflow_total()
        finally:
            ev.close()
        unique = len(self._read_events())
        lost = None if lost_new is None else lost_new + lost_pending
        if lost != 0:
            self.log(f"refresh: EVENTS LOST: {'an unknown number of' if lost is None else f'{lost:,}'} event log "
                     f"entries were trimmed by the log's byte cap before this consumer read them "
                     f"({lost_pending:,} of them delivered to an earlier run and never acknowledged); "
                     f"the cap has trimmed {overflow:,} unread entries in all (redis.events_max_bytes)")
        if left:
            self.log(f"refresh: read {entries:,} entries (--max-events {budget:,}); {left:,} wait for the next run")
        return {"entries": entries, "events": unique, "dead": dead, "lost": lost, "lost_pending": lost_pending,
                "overflow_total": overflow, "capped": entries >= budget, "left": left}

    def _read_events(self) -> InteractionRows:
        """This run's events, each identity once (the log is at least once), in log order."""
        rows = self._pages().rows()
        if not len(rows):
            return rows
        key = np.rec.fromarrays([rows.user, rows.item, rows.type, rows.timestamp])
        _, first = np.unique(key, return_index=True)
        return rows.take(np.sort(first))

    def _new_events(self) -> InteractionRows:
        """This run's new interactions: the events of a type the spec counts (every step reads
        them through here, so what is stored, embedded and scored is the same set)."""
        return interactions_of(self._read_events(), self.spec())

    def merge(self) -> dict[str, Any]:
        seeded = 0
        marker = self.cfg.store_root / ".seeded"
        self.cfg.store_root.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            # A new store starts from what CURRENT was trained on (its history at training time).
            # The marker is written after the whole seed: a crash half way seeds again (appends
            # are idempotent by event identity), never leaving the store partly seeded.
            from offline.datasets import load_dataset

            man = bundle_mod.read_manifest(self.cfg.registry / self.parent)
            ds = load_dataset(str(man["dataset"]), cache_dir=self.cfg.data_dir)
            seed = InteractionRows.from_interactions(ds.interactions)
            if ds.spec.interactions.event_type is not None and ds.interactions.weight is not None:
                seed = replace(seed, type=seed_types(ds.spec, ds.interactions.weight))
            seeded = self.store.append(seed)
            write_json_atomic(marker, {"dataset": str(man["dataset"]), "version": self.parent, "rows": seeded})
        events = self._new_events()
        new = self.store.append(events)
        return {"seeded": seeded, "stored": new, "store_rows": len(self.store),
                "not_interactions": len(self._read_events()) - len(events)}

    # -- 3-5: the candidate bundle --------------------------------------------------------------

    def _holdout_start(self) -> int:
        """Embed mode: the newest ``holdout_s`` of this run's events. Train mode: of the whole
        store's, reaching back for ``train_min_targets`` (see ``refresh_gate.holdout_start``)."""
        if self.cfg.mode == "embed":
            return holdout_start(self._new_events().timestamp, window_s=self.cfg.holdout_s, min_targets=0,
                                 not_before=None)
        man = bundle_mod.read_manifest(self.cfg.registry / self.parent)
        log_rows = self._log()
        return holdout_start(log_rows.timestamp, window_s=self.cfg.holdout_s, min_targets=self.cfg.train_min_targets,
                             not_before=man.get("trained_until"), users=log_rows.user,
                             min_users=self.cfg.train_min_users)

    def candidate(self) -> dict[str, Any]:
        from offline.histories import user_histories
        from towers.model import ModelConfig, embed_items, embed_users, model_from_arrays

        parent = bundle_mod.load(self.cfg.registry / self.parent)
        man = parent.manifest
        if "towers.npz" not in man["files"]:
            raise DataError(f"{self.parent}: no towers (a synthetic bundle cannot be refreshed)")
        cfg_m = ModelConfig.from_dict(man["model_config"])
        if cfg_m.history_len == 0 and self.cfg.mode == "embed":
            raise DataError(f"{self.parent}: its user tower reads no history, so re-embedding changes nothing; "
                            "retrain it (twotower train) or refresh with --mode train")
        log_rows = self._log()
        new = self._new_events()
        fp0 = parent.features
        feed_titles: dict[str, str] = {}
        if self.cfg.item_features is not None:  # the catalog feed: features of items new or known
            spec = fp0.dataset_spec
            if spec is None:
                raise DataError(f"{self.parent}: its feature pipeline has no dataset spec to read a feed with")
            ids, columns, feed_titles = read_item_feed(self.cfg.item_features, spec)
            # Rows the bundle already has win: a feed never re-features an item that is served.
            fresh = np.flatnonzero(fp0.item_table.ids.positions(ids) < 0)
            fp0 = fp0.with_rows("item", ids[fresh].tolist(), {c: take_rows(v, fresh) for c, v in columns.items()})
        # New items join the catalog only when the item tower can embed them (they have features).
        new_items = [i for i in dict.fromkeys(new.item.tolist())
                     if fp0.item_vocab.known(i) < 0 and fp0.item_table.ids.known(i) >= 0]
        waiting = len({i for i in new.item.tolist() if fp0.item_vocab.known(i) < 0}) - len(new_items)
        new_users = [u for u in dict.fromkeys(new.user.tolist()) if fp0.user_vocab.known(u) < 0]
        fp = fp0.extended(user_ids=new_users, item_ids=new_items)
        with np.load(parent.path / "towers.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        history: list[dict[str, float]] = []
        if self.cfg.mode == "train":
            model, history = self._warm_start(fp, cfg_m, arrays, log_rows)
            if self.cfg.train_blend < 1:
                from offline.train_loop import blend_arrays

                model.load_arrays(blend_arrays(model.state_arrays(), arrays, self.cfg.train_blend))
            arrays = model.state_arrays()
        else:
            model = model_from_arrays(cfg_m, fp, arrays)
        embed: Callable[..., np.ndarray] = embed_users
        if self.cfg.engine == "ray":
            from offline.ray_engine import embed_users_ray

            embed = partial(embed_users_ray, work_dir=self.run.path / "ray")
        if self.cfg.mode == "train":
            item_emb = embed_items(model, fp)
            affected = np.arange(fp.n_users)
            hist = user_histories(fp, log_rows.to_interactions(), cfg_m.history_len)
            user_emb = embed(model, fp, hist, item_emb=item_emb)
        else:
            # The towers did not change: old items and untouched users keep their rows bit for
            # bit, and only new items and users with new events go through the towers (at a
            # million users a refresh touches a few percent of them).
            item_emb = np.empty((fp.n_items, cfg_m.dim), np.float32)
            item_emb[:fp0.n_items] = parent.item_emb
            item_emb[fp0.n_items:] = embed_items(model, fp, ids=new_items)
            touched = {fp.user_vocab.known(u) for u in new.user.tolist()}
            affected = np.array(sorted(touched), dtype=np.int64)
            user_emb = np.empty((fp.n_users, cfg_m.dim), np.float32)
            user_emb[:fp0.n_users] = parent.user_emb
            if len(affected):
                mine = np.isin(log_rows.user, np.array(sorted(set(new.user.tolist()))))
                hist = user_histories(fp, log_rows.take(np.flatnonzero(mine)).to_interactions(), cfg_m.history_len,
                                      users=affected)
                user_emb[affected] = embed(model, fp, hist, rows=affected, item_emb=item_emb)
        stored = self.store.item_counts()  # every user's interactions, one column at a time
        pos = fp.item_vocab.positions(np.array(list(stored), dtype=str)) if stored else np.zeros(0, np.int64)
        counts = np.zeros(fp.n_items, np.int64)
        np.add.at(counts, pos[pos >= 0], np.fromiter(stored.values(), np.int64, len(stored))[pos >= 0])
        popularity = np.argsort(-counts, kind="stable").astype(np.int64)
        files: dict[str, Any] = {
            "features.json": fp.dumps(), "combiner.npz": parent.combiner.arrays() if self.cfg.mode == "embed"
            else model.combiner.export().arrays(), "towers.npz": arrays, "item_embeddings.npy": item_emb,
            "user_embeddings.npy": user_emb, "popularity.npy": popularity,
            "index.faiss": (parent.path / "index.faiss").read_bytes(),
        }
        if "titles.json" in man["files"] or feed_titles:
            files["titles.json"] = {**feed_titles, **parent.titles}
        if history:
            files["history.json"] = history
        # Embed mode keeps the towers and the items, so the parent's index and its measured
        # quantization (user-embedding dtype and scale, the end-to-end check the publish gate
        # reads) still hold; train mode changes both and drops them (float32 users).
        keep = ("dataset", "model_config", "train_config", "index", "trained_until",
                *(("quant",) if self.cfg.mode == "embed" and not new_items else ()))
        manifest = {k: man[k] for k in keep if k in man}
        manifest["shapes"] = {"n_items": fp.n_items, "n_users": fp.n_users, "dim": cfg_m.dim}
        if self.cfg.mode == "train":
            manifest["trained_until"] = self._holdout_start()
        manifest["refresh"] = {"run_id": self.run.run_id, "mode": self.cfg.mode, "parent": self.parent,
                               "new_users": len(new_users), "new_items": len(new_items),
                               "items_waiting_for_features": waiting, "users_embedded": len(affected)}
        version = bundle_mod.write_bundle(self.cand_dir, files, manifest)
        self.log(f"refresh: candidate {version} ({self.cfg.mode}): {len(affected):,} users embedded, "
                 f"{len(new_users):,} new users, {len(new_items):,} new items ({waiting} without features)")
        write_json_atomic(self.run.path / "affected.json", {"users": affected.tolist()})
        return {"version": version, **manifest["refresh"], "items_changed": self.cfg.mode == "train" or
                bool(new_items)}

    def _warm_start(self, fp: FeaturePipeline, cfg_m: Any, arrays: dict[str, np.ndarray],
                    log_rows: InteractionRows) -> tuple[Any, list[dict[str, float]]]:
        from offline.datasets import Dataset, EntityTable, temporal_split
        from offline.train import TrainConfig, train_model

        spec = fp.dataset_spec
        if spec is None:
            raise DataError(f"{self.parent}: its feature pipeline has no dataset spec to retrain with")
        # Train on what happened before the holdout window, so the gate's figures are honest;
        # each interaction weighs what its event type weighs in the spec.
        before = training_interactions(log_rows.take(np.flatnonzero(log_rows.timestamp < self._holdout_start())),
                                       spec)
        # The pipeline is the parent's (extended): the tables only name the dataset's shape.
        empty = EntityTable(np.array([], dtype=str))
        ds = Dataset("refresh", before, empty, empty, spec)
        tc = TrainConfig(epochs=self.cfg.train_epochs, patience=self.cfg.train_epochs, seed=self.cfg.seed,
                         threads=self.cfg.threads)
        model, _, _, history = train_model(ds, model_cfg=cfg_m, train_cfg=tc, progress=False,
                                           split=temporal_split(before), fp=fp, init=arrays)
        return model, history

    def index(self) -> dict[str, Any]:
        changed = bool(self._result("candidate")["items_changed"])
        if not changed:
            return {"rebuilt": False, "version": bundle_mod.read_manifest(self.cand_dir)["version"]}
        man = bundle_mod.read_manifest(self.cand_dir)
        # The same index type and tuned settings (nlist, nprobe, efSearch, refine) as CURRENT's,
        # trained on the new embeddings; its recall is measured again (the publish gate reads it).
        spec = faiss_index.IndexSpec.from_dict(man["index"]["spec"])
        emb = np.load(self.cand_dir / "item_embeddings.npy", allow_pickle=False)
        index = faiss_index.build(emb, spec, seed=self.cfg.seed)
        recall = faiss_index.ann_recall(index, emb, faiss_index.sample_queries(emb, seed=self.cfg.seed))
        entry = {**man["index"], "ann_recall@100": recall}
        new = bundle_mod.update_bundle(self.cand_dir, {"index.faiss": faiss_index.to_bytes(index)}, {"index": entry})
        return {"rebuilt": True, "ann_recall@100": recall, "version": new["version"]}

    def batch_score(self) -> dict[str, Any]:
        """Top-K per user, excluding what the user interacted with unless the spec keeps past
        items as candidates (``exclude_seen: false``: nothing excluded). ``embed`` re-scores only
        the users it re-embedded when nothing else moved (same items, parent has recs of the
        same K); everyone else's rows are the parent's."""
        from offline.batch_score import batch_topk
        from towers.ranking import RankModel as Model

        b = bundle_mod.load(self.cand_dir, verify_checksums=False)
        parent = bundle_mod.load(self.cfg.registry / self.parent, verify_checksums=False)
        k = min(self.cfg.batch_k, len(b.item_ids))
        only_affected = (self.cfg.mode == "embed" and not self._result("candidate")["items_changed"]
                   and parent.recs_items is not None and parent.recs_items.shape[1] == k)
        users = (np.array(json.loads((self.run.path / "affected.json").read_text())["users"], dtype=np.int64)
                 if only_affected else np.arange(len(b.features.user_vocab)))
        seen: list[list[int]] = [[] for _ in range(len(users))]
        if b.features.exclude_seen:
            rows = self._log() if only_affected else self.store.read()  # new items: everyone is re-scored
            mine = rows.take(np.flatnonzero(np.isin(rows.user, [b.features.user_vocab.values[u]
                                                                for u in users.tolist()])))
            slot = {int(u): j for j, u in enumerate(users.tolist())}
            for u, i in zip(b.features.user_vocab.positions(mine.user).tolist(),
                            b.features.item_vocab.positions(mine.item).tolist(), strict=True):
                if u in slot and i >= 0:
                    seen[slot[u]].append(i)
        model = Model.from_bundle(b)
        if self.cfg.engine == "ray":
            from offline.ray_engine import batch_topk_ray

            # The Ray path ranks a model's every user: give it these users' vectors, in order
            # (the same chunks as the local path over ``users``, so the same results).
            top, scores = batch_topk_ray(replace(model, user_emb=np.asarray(model.user_emb)[users]), k=k, seen=seen,
                                         progress=False, work_dir=self.run.path / "ray")
        else:
            top, scores = batch_topk(model, k=k, seen=seen, users=users, progress=False)
        if only_affected:
            assert parent.recs_items is not None and parent.recs_scores is not None
            n_old = len(parent.features.user_vocab)
            all_top = np.full((len(b.features.user_vocab), k), -1, np.int32)
            all_scores = np.zeros((len(b.features.user_vocab), k), np.float32)
            all_top[:n_old], all_scores[:n_old] = parent.recs_items, parent.recs_scores
            all_top[users], all_scores[users] = top, scores
            top, scores = all_top, all_scores
        man = bundle_mod.update_bundle(self.cand_dir, {"recs_items.npy": top, "recs_scores.npy": scores},
                                       {"batch": {"k": k}})
        return {"version": man["version"], "k": k, "users_scored": len(users)}

    # -- 6-9: gate, publish, acknowledge, clean up ----------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Every event in the holdout window (``_holdout_start``) is a target, with everything
        before it in the user's log as known; the candidate embeds the user from that history
        with its towers. CURRENT: in embed mode it serves the vector it has (none for a user it
        never saw: the targets are this run's events, newer than its vectors), so the gate
        measures what re-embedding adds; in train mode it embeds the same history with its own
        towers, so the gate measures the retraining alone (and CURRENT is never scored on what
        its vectors already saw). Both get the session and exclusions the server would (DESIGN
        §6's rules, by the spec's repeat policy: see ``refresh_gate.hits``). The decision is
        ``refresh_gate.decide``'s paired test."""
        t0 = self._holdout_start()
        cand = bundle_mod.load(self.cand_dir)
        cur = bundle_mod.load(self.cfg.registry / self.parent)
        rows = self._log()  # per user in time order
        if self.cfg.mode == "embed":
            new = {e for e in self._new_events().identities() if e[3] >= t0}
            targets = [j for j, ident in enumerate(rows.identities()) if ident in new]
        else:
            targets = np.flatnonzero(rows.timestamp >= t0).tolist()
        if len(targets) > self.cfg.max_targets:  # a deterministic sample
            keep = np.random.default_rng(self.cfg.seed).choice(len(targets), self.cfg.max_targets, replace=False)
            targets = [targets[i] for i in sorted(keep.tolist())]
        if not targets:
            return {"targets": 0, "passed": True, "why": "no holdout events: nothing to compare"}
        users, items = rows.user.tolist(), rows.item.tolist()
        start: dict[str, int] = {}
        for j, u in enumerate(users):
            start.setdefault(u, j)
        prefixes = [items[start[users[j]]:j] for j in targets]  # what was known before each target
        tusers = [users[j] for j in targets]
        titems = [items[j] for j in targets]
        hits_c = hits(cand, tusers, prefixes, titems, vectors=embed_prefixes(cand, tusers, prefixes))
        hits_p = hits(cur, tusers, prefixes, titems,
                      vectors=embed_prefixes(cur, tusers, prefixes) if self.cfg.mode == "train" else None)
        rule = GateRule(max_drop=self.cfg.max_drop, min_targets=self.cfg.gate_min_targets, gated=self.cfg.gate,
                        min_targets_to_accept=self.cfg.train_min_targets if self.cfg.mode == "train" else 0,
                        min_users_to_accept=self.cfg.train_min_users if self.cfg.mode == "train" else 0)
        result = decide(hits_c, hits_p, tusers, rule, stored_rows_ok=self._stored_rows_ok(cand))
        self.log(f"refresh gate: {'pass' if result['passed'] else 'REFUSED'}: {result['why']}")
        return {**result, "holdout_start": t0}

    def _stored_rows_ok(self, cand: bundle_mod.Bundle, sample: int = 64) -> bool:
        """The published rows, not only the towers: re-embed a sample of the users this run
        embedded from their whole history and compare with ``user_embeddings.npy`` (a row
        misaligned by the candidate step would pass a gate that scores only the towers)."""
        affected = np.array(json.loads((self.run.path / "affected.json").read_text())["users"], dtype=np.int64)
        if len(affected) == 0:
            return True
        rows = np.sort(np.random.default_rng(self.cfg.seed).choice(affected, min(sample, len(affected)),
                                                                    replace=False))
        log = self._log()
        users = [cand.features.user_vocab.values[r] for r in rows.tolist()]
        mine = log.take(np.flatnonzero(np.isin(log.user, users)))
        prefixes = [mine.item[mine.user == u].tolist() for u in users]
        again = embed_prefixes(cand, users, prefixes)
        return bool(np.allclose(again, np.asarray(cand.user_emb)[rows], atol=1e-5))

    def publish(self) -> dict[str, Any]:
        gate = self._result("evaluate")
        if not gate["passed"]:
            return {"published": False, "why": gate["why"]}
        from offline.publish import publish

        self.lock.check()  # a holder that lost the lock never publishes
        mine = str(bundle_mod.read_manifest(self.cand_dir)["version"])
        # Built from the parent: publish only over it (or over itself, when this step runs again
        # after a crash past the flip), never over a version published since (a manual publish,
        # another run).
        version = publish(self.cand_dir, registry=self.cfg.registry, redis_url=self.cfg.redis_url,
                          redis_prefix=self.cfg.prefix, expect_current=(self.parent, mine))
        if version != self.parent:
            mark_retired(self.cfg.registry, self.parent)
        return {"published": True, "version": version, "replaced": self.parent}

    def ack(self) -> dict[str, Any]:
        if not self._result("publish")["published"]:
            # Refused: the events stay pending, so the next run reads them again and re-embeds
            # their users with whatever else happened by then (they are in the store already).
            return {"acked": 0, "why": "not published: the entries stay pending for the next run"}
        ev = self._events_log()
        try:
            n = entries = 0
            for ids in self._pages().id_pages():
                n, entries = n + ev.ack(group=self.cfg.group, ids=ids), entries + len(ids)
            trimmed = ev.trim_acknowledged()  # the log shrinks only here: below what every group acked
        finally:
            ev.close()
        return {"acked": n, "entries": entries, "trimmed": trimmed}

    def gc(self) -> dict[str, Any]:
        return {"deleted": collect_garbage(registry=self.cfg.registry, redis_url=self.cfg.redis_url,
                                           prefix=self.cfg.prefix, grace_s=self.cfg.grace_s, flags=self.cfg.flags),
                "removed_versions": prune_registry(registry=self.cfg.registry, keep_last=self.cfg.keep_versions,
                                                   flags=self.cfg.flags)}
