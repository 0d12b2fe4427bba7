"""The nightly refresh (offline/refresh.py) against a real Redis (a throwaway server), a real
registry and a real (short) training run on a slice of ML-100k: events in the stream become
a new published version; crashes at every step boundary resume to the same end state; the
gate and the lock keep bad or concurrent candidates out."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from offline.datasets import Dataset, Interactions, write_grouplens
from offline.interactions import InteractionStore
from offline.publish import publish
from offline.refresh import STEPS, RefreshConfig, collect_garbage, refresh
from offline.train import TrainConfig, train
from towers import bundle as bundle_mod
from towers import registry as registry_mod
from towers.errors import ConfigError, FeatureStoreError, LockHeld, LockLost
from towers.model import ModelConfig
from towers.store_format import Event, RedisKeys, event_fields

pytestmark = pytest.mark.slow


class World:
    """A base bundle trained on events before a cut, and the events after it."""

    def __init__(self, root: Path, ds: Dataset) -> None:
        i = ds.interactions
        users = sorted(set(i.user.tolist()), key=int)[:300]
        sub = i.take(np.flatnonzero(np.isin(i.user, users)))
        cut = int(np.quantile(sub.timestamp, 0.9))
        before = sub.take(np.flatnonzero(sub.timestamp < cut))
        after = sub.take(np.flatnonzero(sub.timestamp >= cut))
        after = after.take(np.argsort(after.timestamp, kind="stable")[:400])
        self.dataset_dir = write_grouplens(replace(ds, interactions=before), root / "ml-slice",
                                           keep_users=set(before.user.tolist()))
        self.bundle = root / "base"
        from offline.datasets import load_dataset

        train(dataset=load_dataset(str(self.dataset_dir), cache_dir=root), dataset_spec=str(self.dataset_dir),
              out=self.bundle, model_cfg=ModelConfig(history_len=20),
              train_cfg=TrainConfig(epochs=2, patience=2, threads=1), progress=False)
        from offline.batch_score import batch_score_bundle, seen_rows

        batch_score_bundle(self.bundle, k=100, seen=seen_rows(self.bundle, cache_dir=root), progress=False)
        self.events = [Event(u, it, "click", int(t)) for u, it, t in
                       zip(after.user.tolist(), after.item.tolist(), after.timestamp.tolist(), strict=True)]
        self.new_users = {e.user_id for e in self.events} - set(before.user.tolist())
        self.after: Interactions = after
        self.n_before = len(before)
        self.genres = {i: str(g).split() for i, g in zip(ds.items.ids.tolist(), ds.items.column("class"), strict=True)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ml100k: Dataset) -> World:
    return World(tmp_path_factory.mktemp("refresh-world"), ml100k)


class Setup:
    def __init__(self, root: Path, world: World, url: str, prefix: str) -> None:
        self.registry = root / "registry"
        self.url, self.prefix, self.world = url, prefix, world
        publish(world.bundle, registry=self.registry, redis_url=url, redis_prefix=prefix)
        self.r = redis.Redis.from_url(url)
        self.keys = RedisKeys(prefix)
        self.cfg = RefreshConfig(registry=self.registry, redis_url=url, run_root=root / "runs",
                                 store_root=root / "store", data_dir=root, prefix=prefix, grace_s=0,
                                 holdout_s=30 * 86_400, gate=False)
        # ^ these tests are about the pipeline; the gate's own test turns it on.

    def send(self, events: list[Event]) -> None:
        for e in events:
            self.r.xadd(self.keys.events(), event_fields(e))  # type: ignore[arg-type]

    def state(self) -> dict[str, Any]:
        """What a refresh leaves behind, with version ids replaced by content (ids carry a time)."""
        cur = registry_mod.current_version(self.registry)
        assert cur is not None
        man = bundle_mod.read_manifest(self.registry / cur)
        files = {n: f["sha256"] for n, f in man["files"].items()}
        keys = sorted(k.decode().replace(cur, "CUR").removeprefix(self.prefix)
                      for k in self.r.scan_iter(match=f"{self.prefix}:v:*"))
        groups = self.r.xinfo_groups(self.keys.events())
        return {"files": files, "keys": keys, "pending": [g["pending"] for g in groups],
                "store": len(InteractionStore(self.cfg.store_root)),
                "values": {k: self.r.get(self.prefix + k.replace("CUR", cur)) for k in keys if ":ue:" in k}}


@pytest.fixture
def setup(tmp_path: Path, world: World, redis_proc: Any) -> Setup:
    return Setup(tmp_path, world, redis_proc.url, "rt")


def test_an_embed_refresh_publishes_fresh_user_embeddings_and_acknowledges_the_events(setup: Setup) -> None:
    s, w = setup, setup.world
    base = registry_mod.current_version(s.registry)
    s.send(w.events)
    s.send(w.events[:50])  # a retried batch: the same events again
    report = refresh(s.cfg, progress=False, log=lambda _m: None)
    steps = {st["name"]: st["result"] for st in report["steps"]}
    assert [st["name"] for st in report["steps"]] == list(STEPS)
    assert steps["read"]["events"] == len(set(w.events))
    assert steps["merge"]["stored"] == len(set(w.events))  # the retry stored nothing twice
    assert steps["publish"]["published"], steps["evaluate"]["why"]
    # Gate off: still measured on every holdout event, published, and said so.
    assert not steps["evaluate"]["gated"] and "gate off" in steps["evaluate"]["why"]
    assert steps["evaluate"]["targets"] == len(set(w.events)) and "recall@20" in steps["evaluate"]["candidate"]
    assert steps["evaluate"]["stored_rows_ok"]  # the published rows re-embed to themselves
    cur = registry_mod.current_version(s.registry)
    assert cur != base and cur == steps["publish"]["version"]
    old, new = bundle_mod.load(s.registry / str(base)), bundle_mod.load(s.registry / str(cur))
    touched = {e.user_id for e in w.events}
    # Every new user has an embedding (in the bundle and in Redis); users without events keep theirs.
    for u in w.new_users:
        assert new.features.user_vocab.known(u) >= 0
        assert s.r.get(s.keys.user_embedding(str(cur), u)) is not None
    quiet = [u for u in old.features.user_vocab.values if u not in touched]
    rows_old, rows_new = old.features.user_vocab.positions(quiet), new.features.user_vocab.positions(quiet)
    np.testing.assert_array_equal(np.asarray(new.user_emb)[rows_new], np.asarray(old.user_emb)[rows_old])
    active = [u for u in touched if old.features.user_vocab.known(u) >= 0]
    diff = np.abs(np.asarray(new.user_emb)[new.features.user_vocab.positions(active)]
                  - np.asarray(old.user_emb)[old.features.user_vocab.positions(active)]).max(axis=1)
    assert (diff > 1e-6).mean() > 0.9  # their history grew, so their embedding moved
    np.testing.assert_array_equal(new.item_emb, old.item_emb)  # same towers, same items
    # Precomputed recs: quiet users keep theirs; every re-embedded or new user was re-scored.
    assert new.recs_items is not None and old.recs_items is not None
    np.testing.assert_array_equal(np.asarray(new.recs_items)[rows_new], np.asarray(old.recs_items)[rows_old])
    fresh = new.features.user_vocab.positions(sorted(w.new_users))
    assert (np.asarray(new.recs_items)[fresh, 0] >= 0).all()
    assert s.state()["pending"] == [0]
    # Nothing new: says so, publishes nothing.
    again = refresh(s.cfg, progress=False, log=lambda _m: None)
    assert [st["name"] for st in again["steps"]] == ["read"]
    assert registry_mod.current_version(s.registry) == cur


def test_a_crash_at_every_step_boundary_resumes_to_the_uninterrupted_end_state(tmp_path: Path, world: World,
                                                                               redis_proc: Any) -> None:
    ref = Setup(tmp_path / "ref", world, redis_proc.url, "ref")
    ref.send(world.events)
    refresh(ref.cfg, progress=False, log=lambda _m: None)
    expected = ref.state()
    # Counted: every event stored once (none lost, none twice), none left pending.
    assert expected["store"] == world.n_before + len(set(world.events)) and expected["pending"] == [0]
    for n, step in enumerate(STEPS[:-1]):
        s = Setup(tmp_path / f"crash{n}", world, redis_proc.url, f"c{n}")
        s.send(world.events)

        def crash(point: str, at: str = f"after:{step}") -> None:
            if point == at:
                raise KeyboardInterrupt(point)

        with pytest.raises(KeyboardInterrupt):
            refresh(s.cfg, fault=crash, progress=False, log=lambda _m: None)
        (run,) = list(s.cfg.run_root.iterdir())
        refresh(s.cfg, resume=run, progress=False, log=lambda _m: None)
        got = s.state()
        assert got == expected, f"crash after {step}"


def test_the_gate_refuses_a_worse_candidate_and_nothing_changes(setup: Setup) -> None:
    s, w = setup, setup.world
    base = registry_mod.current_version(s.registry)
    s.send(w.events)

    def sabotage(point: str) -> None:
        if point == "after:candidate":  # turn the candidate's user vectors around
            run = next(s.cfg.run_root.iterdir())
            with np.load(run / "candidate" / "towers.npz") as z:
                arrays = {k: z[k] for k in z.files}
            for k in ("user_tower.mlp.3.weight", "user_tower.mlp.3.bias"):
                arrays[k] = -arrays[k]
            bundle_mod.update_bundle(run / "candidate", {"towers.npz": arrays}, {})

    report = refresh(replace(s.cfg, gate=True), fault=sabotage, progress=False, log=lambda _m: None)
    steps = {st["name"]: st["result"] for st in report["steps"]}
    assert steps["evaluate"]["gated"] and not steps["evaluate"]["passed"], steps["evaluate"]
    ev = steps["evaluate"]
    assert ev["upper95"] < ev["floor"] < 0 and ev["candidate"]["recall@20"] < ev["current"]["recall@20"]
    assert "Recall@20" in steps["publish"]["why"] and not steps["publish"]["published"]
    assert registry_mod.current_version(s.registry) == base
    # The rows were written by the towers before the sabotage: the spot check sees they differ.
    assert not steps["evaluate"]["stored_rows_ok"]
    # Refused: nothing acknowledged, so the next run reads the same events again (pending).
    assert s.state()["pending"] == [len(w.events)]
    again = refresh(replace(s.cfg, gate=False), progress=False, log=lambda _m: None)
    steps = {st["name"]: st["result"] for st in again["steps"]}
    assert steps["read"]["events"] == len(set(w.events)) and steps["publish"]["published"]
    assert s.state()["pending"] == [0]


def test_two_refreshes_never_overlap_and_a_lost_lock_never_publishes(setup: Setup) -> None:
    from offline.refresh.run_lock import RefreshLock

    s, w = setup, setup.world
    base = registry_mod.current_version(s.registry)
    s.send(w.events)
    other = RefreshLock(redis_url=s.url, key=f"{s.prefix}:refresh:lock")
    other.acquire()
    with pytest.raises(LockHeld):
        refresh(s.cfg, progress=False, log=lambda _m: None)
    assert not s.cfg.run_root.exists()  # refused before it started: no run directory left behind
    other.release()
    assert registry_mod.current_version(s.registry) == base

    def steal(point: str) -> None:
        if point == "after:evaluate":  # the lease expired and another job took it
            s.r.set(f"{s.prefix}:refresh:lock", "someone-else")

    with pytest.raises(LockLost):
        refresh(s.cfg, fault=steal, progress=False, log=lambda _m: None)
    assert registry_mod.current_version(s.registry) == base
    assert s.state()["pending"] == [len(w.events)]  # nothing acknowledged
    s.r.delete(f"{s.prefix}:refresh:lock")
    runs = sorted(p for p in s.cfg.run_root.iterdir() if p.is_dir())
    report = refresh(s.cfg, resume=runs[-1], progress=False, log=lambda _m: None)
    assert {st["name"]: st["result"] for st in report["steps"]}["publish"]["published"]
    assert s.state()["pending"] == [0]


def test_old_versions_lose_their_keys_after_the_grace_never_current_or_pinned(setup: Setup, tmp_path: Path) -> None:
    s, w = setup, setup.world
    base = str(registry_mod.current_version(s.registry))
    s.send(w.events[:200])
    refresh(replace(s.cfg, grace_s=10_000), progress=False, log=lambda _m: None)
    first = str(registry_mod.current_version(s.registry))
    assert s.r.exists(s.keys.ready(base))  # within its grace: kept
    flags = tmp_path / "flags.yaml"
    flags.write_text(f"""experiments:
  - name: keep
    salt: s
    status: running
    allocation: 1.0
    variants:
      - {{name: control, weight: 0.5, version: CURRENT}}
      - {{name: old, weight: 0.5, version: {base}}}
""")
    s.send(w.events[200:])
    refresh(replace(s.cfg, flags=flags), progress=False, log=lambda _m: None)
    second = str(registry_mod.current_version(s.registry))
    assert second not in (base, first)
    assert s.r.exists(s.keys.ready(base))  # pinned by a running experiment
    assert not s.r.exists(s.keys.ready(first)) and not list(s.r.scan_iter(match=f"{s.prefix}:v:{first}:*"))
    assert s.r.exists(s.keys.ready(second))
    assert collect_garbage(registry=s.registry, redis_url=s.url, prefix=s.prefix, grace_s=0) == [base]
    assert s.r.exists(s.keys.ready(second))


def test_a_train_refresh_warm_starts_the_towers_and_rebuilds_the_index(setup: Setup) -> None:
    s, w = setup, setup.world
    base = registry_mod.current_version(s.registry)
    s.send(w.events)
    report = refresh(replace(s.cfg, mode="train", train_epochs=1), progress=False,
                     log=lambda _m: None)
    steps = {st["name"]: st["result"] for st in report["steps"]}
    assert steps["index"]["rebuilt"] and steps["candidate"]["users_embedded"] > 0
    assert steps["publish"]["published"], steps["evaluate"]["why"]
    old = bundle_mod.load(s.registry / str(base))
    new = bundle_mod.load(s.registry / str(registry_mod.current_version(s.registry)))
    assert not np.allclose(new.item_emb, old.item_emb)
    assert json.loads((new.path / "history.json").read_text())  # the warm start's epochs


def test_a_refused_retrain_falls_back_to_re_embedding_with_currents_towers(setup: Setup) -> None:
    """Train mode's bad night (item 8 of issue 22): the gate refuses the retrained candidate,
    and an embed run on the same events publishes fresh user vectors from CURRENT's towers."""
    s, w = setup, setup.world
    base = registry_mod.current_version(s.registry)
    s.send(w.events)
    sabotaged: list[str] = []

    def sabotage(point: str) -> None:
        if point == "after:candidate" and not sabotaged:  # the retrained towers only
            run = next(p for p in s.cfg.run_root.iterdir() if p.name != "reports")
            with np.load(run / "candidate" / "towers.npz") as z:
                arrays = {k: z[k] for k in z.files}
            for k in ("user_tower.mlp.3.weight", "user_tower.mlp.3.bias"):
                arrays[k] = -arrays[k]
            bundle_mod.update_bundle(run / "candidate", {"towers.npz": arrays}, {})
            sabotaged.append(run.name)

    report = refresh(replace(s.cfg, mode="train", train_epochs=1, gate=True, train_min_targets=0,
                             train_min_users=0), fault=sabotage,
                     progress=False, log=lambda _m: None)
    refused = {st["name"]: st["result"] for st in report["fallback_from"]["steps"]}
    assert not refused["evaluate"]["passed"] and refused["evaluate"]["upper95"] < refused["evaluate"]["floor"]
    steps = {st["name"]: st["result"] for st in report["steps"]}
    assert report["mode"] == "embed" and steps["publish"]["published"], steps["evaluate"]["why"]
    new = registry_mod.current_version(s.registry)
    assert new != base
    old_b, new_b = bundle_mod.load(s.registry / str(base)), bundle_mod.load(s.registry / str(new))
    assert new_b.manifest["files"]["towers.npz"]["sha256"] == old_b.manifest["files"]["towers.npz"]["sha256"]
    assert s.state()["pending"] == [0]  # the embed run acknowledged the events the refused one left
    with pytest.raises(ConfigError, match="--train-blend"):
        replace(s.cfg, train_blend=0.0)


def test_bad_input_is_a_clear_error_and_publishes_nothing(setup: Setup, tmp_path: Path) -> None:
    s = setup
    base = registry_mod.current_version(s.registry)
    with pytest.raises(ConfigError, match="--mode"):
        replace(s.cfg, mode="nightly")
    with pytest.raises(ConfigError, match="--engine"):
        replace(s.cfg, engine="spark")
    with pytest.raises(FeatureStoreError):
        refresh(replace(s.cfg, redis_url="redis://127.0.0.1:1/0"), progress=False, log=lambda _m: None)
    empty = tmp_path / "empty-registry"
    empty.mkdir()
    with pytest.raises(Exception, match="no CURRENT"):
        refresh(replace(s.cfg, registry=empty), progress=False, log=lambda _m: None)
    assert registry_mod.current_version(s.registry) == base
    shutil.rmtree(empty)


def test_a_run_never_replaces_a_version_published_since_it_started(setup: Setup, tmp_path: Path) -> None:
    from towers.errors import RegistryError

    s, w = setup, setup.world
    s.send(w.events)

    def crash(point: str) -> None:
        if point == "after:evaluate":
            raise KeyboardInterrupt(point)

    with pytest.raises(KeyboardInterrupt):
        refresh(s.cfg, fault=crash, progress=False, log=lambda _m: None)
    # Meanwhile an operator publishes another version by hand.
    other = tmp_path / "other"
    shutil.copytree(w.bundle, other)
    man = bundle_mod.read_manifest(other)
    bundle_mod.update_bundle(other, {}, {"index": {**man["index"], "spec": {**man["index"]["spec"], "nprobe": 7}}})
    manual = publish(other, registry=s.registry, redis_url=s.url, redis_prefix=s.prefix)
    (run,) = list(s.cfg.run_root.iterdir())
    with pytest.raises(RegistryError, match="another version was published since"):
        refresh(s.cfg, resume=run, progress=False, log=lambda _m: None)
    assert registry_mod.current_version(s.registry) == manual
    assert s.state()["pending"] == [len(w.events)]  # nothing acknowledged: the next run takes them
    with pytest.raises(ConfigError, match="--mode"):
        refresh(replace(s.cfg, mode="train"), resume=run, progress=False, log=lambda _m: None)


def test_a_new_item_with_catalog_features_joins_and_one_without_waits(setup: Setup, tmp_path: Path) -> None:
    s, w = setup, setup.world
    # The feed is in the spec's item schema: ML-100k's items table (id, title, year, genres).
    feed = tmp_path / "items.csv"
    feed.write_text("item_id,movie_title,release_year,class\nnew-film,Scream 3,1998,Horror Thriller\n")
    t = max(e.timestamp for e in w.events) + 60
    fresh = [Event(u, "new-film", "click", t + j) for j, u in enumerate(sorted({e.user_id for e in w.events})[:5])]
    s.send([*w.events, *fresh, Event(w.events[0].user_id, "no-features-film", "click", t + 10)])
    report = refresh(replace(s.cfg, item_features=feed), progress=False, log=lambda _m: None)
    steps = {st["name"]: st["result"] for st in report["steps"]}
    assert steps["candidate"]["new_items"] == 1 and steps["candidate"]["items_waiting_for_features"] == 1
    assert steps["index"]["rebuilt"]  # the catalog grew: the index is rebuilt over it
    new = bundle_mod.load(s.registry / str(registry_mod.current_version(s.registry)))
    row = new.features.item_vocab.known("new-film")
    assert row >= 0 and new.features.item_vocab.known("no-features-film") < 0
    assert new.titles["new-film"] == "Scream 3"
    assert np.isfinite(new.item_emb[row]).all() and np.linalg.norm(new.item_emb[row]) > 0.5
    # Content alone places it: its nearest catalog items share a genre.
    sims = new.item_emb @ new.item_emb[row]
    near = [new.features.item_vocab.values[i] for i in np.argsort(-sims)[1:6]]
    assert any({"Horror", "Thriller"} & set(w.genres.get(i, [])) for i in near)
    assert steps["batch_score"]["users_scored"] == len(new.features.user_vocab)  # everyone re-scored
    assert new.index.ntotal == len(new.features.item_vocab)


def test_a_bad_catalog_feed_line_is_named(tmp_path: Path) -> None:
    from offline.datasets import movielens_spec
    from offline.loading import read_item_feed
    from towers.errors import DataError

    spec = movielens_spec()
    feed = tmp_path / "items.csv"
    feed.write_text("item_id,movie_title,release_year,class\na,A,1990,Drama\nb,B,nineteen,Drama\n")
    with pytest.raises(DataError, match=r"items.csv: column 'release_year' row 2: 'nineteen' is not a number"):
        read_item_feed(feed, spec)
    feed.write_text("item_id,movie_title,release_year,class\na,A,1990,Drama\na,B,1991,Drama\n")
    with pytest.raises(DataError, match=r"items.csv: column 'item_id' row 2: duplicate item id 'a'"):
        read_item_feed(feed, spec)
    feed.write_text("item_id,movie_title,class\na,A,Drama\n")
    with pytest.raises(DataError, match=r"items.csv: item column 'release_year' not found"):
        read_item_feed(feed, spec)
    feed.write_text("item_id,movie_title,release_year,class\na,A,1990,Drama Crime\n")
    ids, columns, titles = read_item_feed(feed, spec)
    assert ids.tolist() == ["a"] and titles == {"a": "A"} and columns["class"] == ["Drama Crime"]


# --------------------------------------------------------------------------- the spec's events


def test_event_types_map_to_interactions_and_weights_as_the_spec_says() -> None:
    from offline.interactions import InteractionRows
    from offline.refresh.event_types import SEED_TYPE, interactions_of, seed_types, training_interactions
    from towers.spec import parse_spec

    spec = parse_spec({"name": "s", "interactions": {"path": "x.csv", "event_type": {
        "column": "event", "positives": ["cart", "purchase"], "weights": {"purchase": 3.0, "cart": 0.2}}}},
        source="test")
    rows = InteractionRows.build(user=["u"] * 4, item=["a", "b", "c", "d"], type=["view", "cart", "purchase", "click"],
                                 timestamp=[1, 2, 3, 4])
    kept = interactions_of(rows, spec)
    assert kept.item.tolist() == ["b", "c"]  # view and click are not interactions here
    w = training_interactions(kept, spec).weight
    assert w is not None and w.tolist() == pytest.approx([0.2, 3.0])
    # A spec without event types: every event, unweighted (as before).
    plain = parse_spec({"name": "s", "interactions": {"path": "x.csv"}}, source="test")
    assert len(interactions_of(rows, plain)) == 4 and training_interactions(rows, plain).weight is None
    # Seeding from a loaded dataset (weights, no type column): each row gets a type of its weight.
    assert seed_types(spec, np.array([3.0, 0.2, 3.0], np.float32)).tolist() == ["purchase", "cart", "purchase"]
    only_pos = parse_spec({"name": "s", "interactions": {"path": "x.csv", "event_type": {
        "column": "event", "weights": {"purchase": 3.0}}}}, source="test")
    assert seed_types(only_pos, np.array([1.0, 3.0], np.float32)).tolist() == [SEED_TYPE, "purchase"]


def test_a_shop_refresh_follows_its_spec_events_weights_and_repeat_policy(tmp_path: Path, redis_proc: Any) -> None:
    """A spec dataset (event types with weights, order ids, ``exclude_seen: false``): the refresh
    stores only the positive events (views are consumed, not stored), seeds the store with the
    training rows under their own types, embeds a new buyer and not a new browser, batch-scores
    past items again, and its gate scores only interactions."""
    from test_repeats import write_shop

    from offline.batch_score import batch_score_bundle, seen_rows
    from offline.datasets import load_dataset
    from offline.refresh.event_types import training_interactions

    spec_path = write_shop(tmp_path / "shop")
    inter = spec_path.parent / "inter.csv"
    head, *lines = inter.read_text().splitlines()
    rows = [line.split(",") for line in lines]
    cut = int(np.quantile([int(r[2]) for r in rows], 0.85))
    inter.write_text("\n".join([head, *(",".join(r) for r in rows if int(r[2]) < cut)]) + "\n")
    after = [Event(u, i, e, int(t)) for u, i, t, e, _ in rows if int(t) >= cut]
    t_end = max(e.timestamp for e in after)
    after += [Event("newbie-browses", "p1", "view", t_end + 1), Event("newbie-browses", "p2", "view", t_end + 2),
              Event("newbie-buys", "p1", "view", t_end + 3), Event("newbie-buys", "p1", "purchase", t_end + 4)]
    base = tmp_path / "base"
    train(dataset=load_dataset(str(spec_path), cache_dir=tmp_path), dataset_spec=str(spec_path), out=base,
          model_cfg=ModelConfig(dim=16, id_dim=16, hidden=32, history_len=10),
          train_cfg=TrainConfig(epochs=1, patience=1, threads=1), progress=False)
    batch_score_bundle(base, k=10, seen=seen_rows(base, cache_dir=tmp_path), progress=False)
    reg = tmp_path / "registry"
    publish(base, registry=reg, redis_url=redis_proc.url, redis_prefix="shop")
    r = redis.Redis.from_url(redis_proc.url)
    for e in after:
        r.xadd(RedisKeys("shop").events(), event_fields(e))  # type: ignore[arg-type]
    cfg = RefreshConfig(registry=reg, redis_url=redis_proc.url, run_root=tmp_path / "runs",
                        store_root=tmp_path / "store", data_dir=tmp_path, prefix="shop", grace_s=0,
                        holdout_s=2 * 86_400, gate=False, mode="train", train_epochs=1, batch_k=10,
                        train_min_targets=0, train_min_users=0)  # the window alone: what this test checks
    report = refresh(cfg, progress=False, log=lambda _m: None)
    steps = {st["name"]: st["result"] for st in report["steps"]}
    bought = [e for e in after if e.type != "view"]
    assert steps["merge"]["stored"] == len(bought) and steps["merge"]["not_interactions"] == len(after) - len(bought)
    # The warm start trains on what came before the window, which never reaches into what the
    # base trained on (its manifest's trained_until).
    t0 = max(max(e.timestamp for e in bought) - cfg.holdout_s + 1, bundle_mod.read_manifest(base)["trained_until"])
    assert steps["evaluate"]["targets"] == len([e for e in bought if e.timestamp >= t0]) > 0  # interactions only
    assert steps["evaluate"]["holdout_start"] == t0 and min(int(r[2]) for r in rows) < t0
    assert steps["publish"]["published"] and steps["ack"]["acked"] == len(after)  # views consumed too
    store = InteractionStore(cfg.store_root).read()
    assert "view" not in set(store.type.tolist())
    # The seeded training rows kept their own types (the loader keeps weights, not types).
    kept = {(u, i, e, int(t)) for u, i, t, e, _ in rows if int(t) < cut and e != "view"}
    assert {x for x in store.identities() if x[3] < cut} == kept
    w = training_interactions(store, bundle_mod.load(base).features.dataset_spec).weight
    assert w is not None
    assert set(w[store.type == "purchase"].tolist()) == {3.0} and set(w[store.type == "cart"].tolist()) == {1.0}
    new = bundle_mod.load(reg / str(registry_mod.current_version(reg)))
    assert new.features.user_vocab.known("newbie-buys") >= 0 and new.features.user_vocab.known("newbie-browses") < 0
    # exclude_seen: false: the nightly lists recommend past purchases again.
    assert new.recs_items is not None
    again = 0
    for u in ("u0", "u1", "u2", "u3", "u4", "u5"):
        history = set(store.item[store.user == u].tolist())
        again += len(history & {new.item_ids[x] for x in np.asarray(new.recs_items)[new.features.user_vocab.known(u)]
                                .tolist() if x >= 0})
    assert again > 0


def test_a_redis_password_reaches_no_file_and_no_error_message(tmp_path: Path, world: World, redis_proc: Any,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    """Issue 22 item 5: a refresh against ``redis://u:SECRET@...`` that fails at publish (its
    keys refused by an ACL) and, resumed, at GC leaves no ``SECRET`` in the registry, the run
    directory, the interaction store, the errors or the output."""
    admin = redis.Redis(port=redis_proc.port)
    admin.acl_setuser("u", enabled=True, passwords=["+SECRET"], keys=["*"], channels=["*"], commands=["+@all"])
    url = f"redis://u:SECRET@127.0.0.1:{redis_proc.port}/0"
    s = Setup(tmp_path, world, url, "sec")
    s.send(world.events[:150])

    def deny_version_keys(point: str, at: str) -> None:
        if point == at:  # the lock and the event log stay writable; the version keys do not
            admin.acl_setuser("u", enabled=True, reset_keys=True, keys=["~sec:refresh:*", "~sec:events*"])

    with pytest.raises(FeatureStoreError) as publish_failed:
        refresh(s.cfg, fault=lambda p: deny_version_keys(p, "after:evaluate"), progress=True)
    admin.acl_setuser("u", enabled=True, reset_keys=True, keys=["*"])
    (run,) = list(s.cfg.run_root.iterdir())
    with pytest.raises(FeatureStoreError) as gc_failed:  # the base version's keys, past their grace
        refresh(s.cfg, resume=run, fault=lambda p: deny_version_keys(p, "after:ack"), progress=True)
    for err in (publish_failed.value, gc_failed.value):  # each names the Redis it failed on
        assert "SECRET" not in str(err) and f"redis://u:***@127.0.0.1:{redis_proc.port}" in str(err), str(err)
    assert json.loads((run / "run.json").read_text())["params"]["redis_url"] == \
        f"redis://u:***@127.0.0.1:{redis_proc.port}/0"
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"SECRET" in p.read_bytes()]
    assert leaked == []
    out, err = capfd.readouterr()
    assert "SECRET" not in out + err


def test_entries_the_byte_cap_trimmed_unread_are_reported_and_fail_the_exit_status(
        setup: Setup, capfd: pytest.CaptureFixture[str]) -> None:
    """Issue 22 item 1: the server's byte cap trimmed 30 entries before the refresh read them
    (simulated here with the same XTRIM and counter the record script uses); the run still
    publishes what it has, reports the 30 in its read step, and exits with status 3. After its
    ack the log is trimmed to what the group still needs: nothing."""
    from twotower.cli import main

    s, w = setup, setup.world
    s.send(w.events[:200])
    stream = s.keys.events()
    assert s.r.xtrim(stream, maxlen=170, approximate=False) == 30
    s.r.incrby(RedisKeys.overflow(stream), 30)
    rc = main(["refresh", "--registry", str(s.registry), "--redis-url", s.url, "--prefix", s.prefix,
               "--run-dir", str(s.cfg.run_root), "--store", str(s.cfg.store_root), "--data-dir", str(s.cfg.data_dir),
               "--no-gate", "--grace-s", "0", "--json"])
    out, err = capfd.readouterr()
    report = json.loads(out.strip().splitlines()[-1])
    steps = {st["name"]: st["result"] for st in report["steps"]}
    assert rc == 3 and "were lost before this run read them: 30" in err
    assert (steps["read"]["lost"], steps["read"]["lost_pending"], steps["read"]["overflow_total"]) == (30, 0, 30)
    assert steps["read"]["entries"] == 170 and steps["publish"]["published"]
    assert steps["ack"]["trimmed"] == 170 and s.r.xlen(stream) == 0
    s.send(w.events[200:210])
    assert main(["refresh", "--registry", str(s.registry), "--redis-url", s.url, "--prefix", s.prefix,
                 "--run-dir", str(s.cfg.run_root), "--store", str(s.cfg.store_root), "--data-dir",
                 str(s.cfg.data_dir), "--no-gate", "--grace-s", "0", "--json"]) == 0  # no new loss


def test_twenty_nights_keep_the_registry_the_runs_and_redis_flat(setup: Setup, tmp_path: Path) -> None:
    """Issue 22 item 4: twenty nightly refreshes, each publishing a version. Retention keeps
    CURRENT, a paused experiment's version and the newest ``keep_versions`` others; ended
    runs leave only their reports; Redis holds CURRENT's keys (grace 0) and an emptied log."""
    s, w = setup, setup.world
    base = str(registry_mod.current_version(s.registry))
    flags = tmp_path / "flags.yaml"  # paused: resumes with the same arms, so `base` is kept
    flags.write_text(f"""experiments:
  - name: held
    salt: s
    status: paused
    allocation: 1.0
    variants:
      - {{name: control, weight: 0.5, version: CURRENT}}
      - {{name: old, weight: 0.5, version: {base}}}
""")
    cfg = replace(s.cfg, keep_versions=2, flags=flags, store_retention_days=2)

    def size(root: Path) -> int:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    nights = []
    for night in range(20):
        s.send(w.events[night * 20:(night + 1) * 20])
        report = refresh(cfg, progress=False, log=lambda _m: None)
        assert {st["name"]: st["result"] for st in report["steps"]}["publish"]["published"], night
        nights.append({"versions": registry_mod.versions(s.registry), "registry": size(s.registry),
                       "runs": [p.name for p in cfg.run_root.iterdir()], "reports": size(cfg.run_root),
                       "ready": len(list(s.r.scan_iter(match=f"{s.prefix}:v:*:ready"))),
                       "keys": s.r.dbsize(), "stream": s.r.xlen(s.keys.events()),
                       "store_days": InteractionStore(cfg.store_root).days(), "dropped": {st["name"]: st["result"]
                       for st in report["steps"]}["gc"].get("store_dropped")})
    last = nights[-1]
    assert base in last["versions"] and len(last["versions"]) == 4  # CURRENT, two newest others, the paused arm's
    assert all(len(n["versions"]) <= 4 for n in nights)
    assert all(n["runs"] == ["reports"] for n in nights)  # no run directory outlives its run
    assert all(n["stream"] == 0 for n in nights)  # acknowledged, then trimmed
    assert all(n["ready"] == 2 for n in nights)  # CURRENT's keys and the paused arm's
    # Flat: the last night holds no more than the fourth (users gained from the events aside: 2%).
    assert last["registry"] <= nights[3]["registry"] * 1.02 and last["keys"] <= nights[3]["keys"] * 1.02
    assert last["reports"] < 20 * 64 * 1024  # reports only: a few KB a night
    # The interaction store keeps two days before each night's newest event (whole days: <= 3).
    assert all(len(n["store_days"]) <= 3 for n in nights) and nights[0]["dropped"]["rows"] > 0


def test_max_events_takes_a_bounded_share_and_leaves_the_rest_for_the_next_run(setup: Setup) -> None:
    """Issue 22 item 2: ``--max-events`` bounds what one run reads (pending entries first);
    the run says how many wait, and the next run takes them: nothing lost, nothing twice."""
    s, w = setup, setup.world
    events = list(dict.fromkeys(w.events))[:200]
    s.send(events)
    cfg = replace(s.cfg, max_events=120)
    first = {st["name"]: st["result"] for st in refresh(cfg, progress=False, log=lambda _m: None)["steps"]}
    assert (first["read"]["entries"], first["read"]["capped"], first["read"]["left"]) == (120, True, 80)
    assert first["publish"]["published"] and first["ack"]["acked"] == 120
    second = {st["name"]: st["result"] for st in refresh(cfg, progress=False, log=lambda _m: None)["steps"]}
    assert (second["read"]["entries"], second["read"]["capped"], second["read"]["left"]) == (80, False, 0)
    assert first["merge"]["stored"] + second["merge"]["stored"] == len(events)
    assert s.state()["pending"] == [0] and s.r.xlen(s.keys.events()) == 0
