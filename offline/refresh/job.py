"""The steps of one refresh run (``offline.refresh``'s docstring lists them), as methods of
one job over its run directory: each returns the JSON its checkpoint keeps."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from offline.event_log import EventLog, ReadBatch
from offline.exposure_store import copy_exposures
from offline.interactions import InteractionRows, InteractionStore
from offline.loading import read_item_feed, take_rows
from offline.refresh.config import RefreshConfig
from offline.refresh.event_types import interactions_of, seed_types, training_interactions
from offline.refresh.gate import GateRule, decide, embed_prefixes, hits, holdout_start, stored_rows_match
from offline.refresh.retention import collect_garbage, mark_retired, prune_registry
from offline.refresh.run_events import EventPages
from offline.refresh.run_lock import RefreshLock
from offline.refresh.run_steps import RunDir, write_json_atomic
from towers import bundle as bundle_mod
from towers import index as faiss_index
from towers.errors import DataError
from towers.features import FeaturePipeline
from towers.spec import DatasetSpec


class Job:
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
        # Page by page into Parquet (offline.refresh.run_events): a backlog costs disk, not memory, and
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
        exposures = copy_exposures(self._events_log(), self.cfg.store_root, log=self.log)  # beside the events
        return {"seeded": seeded, "stored": new, "store_rows": len(self.store),
                "not_interactions": len(self._read_events()) - len(events), "exposures": exposures}

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
        towers, new users included (what the embed run a refused candidate falls back to would
        serve), so the gate measures the retraining alone (and CURRENT is never scored on what
        its vectors already saw). Both get the session and exclusions the server would (DESIGN
        §6's rules, by the spec's repeat policy: see ``gate.hits``). The decision is
        ``gate.decide``'s paired test."""
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
        # Train mode: CURRENT as an embed run would serve it (its towers, every user embedded
        # from the same history, new users too): the alternative a refused candidate falls back to.
        train = self.cfg.mode == "train"
        hits_p = hits(cur, tusers, prefixes, titems, every_user=train,
                      vectors=embed_prefixes(cur, tusers, prefixes, new_users=True) if train else None)
        rule = GateRule(max_drop=self.cfg.max_drop, min_targets=self.cfg.gate_min_targets, gated=self.cfg.gate,
                        min_targets_to_accept=self.cfg.train_min_targets if self.cfg.mode == "train" else 0,
                        min_users_to_accept=self.cfg.train_min_users if self.cfg.mode == "train" else 0)
        result = decide(hits_c, hits_p, tusers, rule, stored_rows_ok=self._stored_rows_ok(cand))
        self.log(f"refresh gate: {'pass' if result['passed'] else 'REFUSED'}: {result['why']}")
        return {**result, "holdout_start": t0}

    def _stored_rows_ok(self, cand: bundle_mod.Bundle) -> bool:
        affected = np.array(json.loads((self.run.path / "affected.json").read_text())["users"], dtype=np.int64)
        return stored_rows_match(cand, affected, self._log(), seed=self.cfg.seed)

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
        out: dict[str, Any] = {
            "deleted": collect_garbage(registry=self.cfg.registry, redis_url=self.cfg.redis_url,
                                       prefix=self.cfg.prefix, grace_s=self.cfg.grace_s, flags=self.cfg.flags),
            "removed_versions": prune_registry(registry=self.cfg.registry, keep_last=self.cfg.keep_versions,
                                               flags=self.cfg.flags)}
        if self.cfg.store_retention_days:
            newest = self._new_events().timestamp
            if len(newest):  # measured from the data's own clock (a replay's is not today's)
                cutoff = int(newest.max()) - self.cfg.store_retention_days * 86_400
                out["store_dropped"] = self.store.drop_before(cutoff)
        return out
