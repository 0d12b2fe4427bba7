"""One repeat policy everywhere (``policies.exclude_seen``), on a small generated shop whose
customers buy the same staples order after order (DESIGN §6, repeat-aware variant).

With ``exclude_seen: false`` past items stay candidates in evaluate, batch scoring, the server
and the refresh gate; only the basket so far (the session), the cart and explicit exclusions
are removed. With ``true`` (MovieLens' policy) nothing the user interacted with comes back."""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from offline.datasets import Dataset, load_dataset, temporal_split
from offline.evaluate import (
    MAX_K,
    EvalSet,
    eval_set,
    evaluate_model,
    format_table,
    item_counts,
    metrics_from_ranks,
    model_ranks,
    personal_frequency_ranks,
    popularity_ranks,
    user_item_counts,
)
from towers import bundle as bundle_mod
from towers.features import FeaturePipeline
from towers.ranking import RankModel, rank

N_USERS, N_ITEMS, ORDERS, BASKET, STAPLES = 60, 80, 6, 3, 5
DAY = 86_400


def write_shop(root: Path, *, seed: int = 0, exclude_seen: bool = False, group: bool = True,
               event_types: bool = True) -> Path:
    """A repeat-heavy shop: each customer has ``STAPLES`` favourite items and places ``ORDERS``
    orders of ``BASKET`` distinct items, 85% of them staples, the rest by popularity; each order
    is a purchase or cart events (the positives) and a view or two (not an interaction).
    Writes ``inter.csv`` (user_id, item_id, ts, event, order_id), ``items.csv`` (item_id,
    category, price) and ``shop.yaml``; returns the spec's path."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items = [f"p{j}" for j in range(N_ITEMS)]
    pop = 1.0 / np.arange(1, N_ITEMS + 1)
    pop /= pop.sum()
    lines = ["user_id,item_id,ts,event,order_id"]
    for u in range(N_USERS):
        staples = rng.choice(N_ITEMS, STAPLES, replace=False).tolist()
        t = 1_700_000_000 + int(rng.integers(0, DAY))
        for o in range(ORDERS):
            order = f"o{u}-{o}"
            basket: list[int] = []
            while len(basket) < BASKET:
                left = [s for s in staples if s not in basket]
                pick = int(rng.choice(left)) if left and rng.random() < 0.85 else int(rng.choice(N_ITEMS, p=pop))
                if pick not in basket:
                    basket.append(pick)
            for j in rng.choice(N_ITEMS, 2, replace=False).tolist():  # browsing: views, not interactions
                lines.append(f"u{u},{items[j]},{t},view,{order}")
                t += 5
            for j in basket:
                lines.append(f"u{u},{items[j]},{t},{'purchase' if rng.random() < 0.7 else 'cart'},{order}")
                t += 10
            t += 3 * DAY
    (root / "inter.csv").write_text("\n".join(lines) + "\n")
    (root / "items.csv").write_text("item_id,category,price\n" + "".join(
        f"{it},c{j % 8},{1.5 + j % 13}\n" for j, it in enumerate(items)))
    group_line = "  group: order_id\n" if group else ""
    event_lines = ("  event_type: {column: event, positives: [cart, purchase], weights: {purchase: 3.0}}\n"
                   if event_types else "")
    spec = root / "shop.yaml"
    spec.write_text(f"""name: shop
interactions:
  path: inter.csv
  user: user_id
  item: item_id
  time: ts
{group_line}{event_lines}items:
  path: items.csv
  id: item_id
  features:
    - {{column: category, kind: categorical}}
    - {{column: price, kind: numeric, log: true}}
policies:
  exclude_seen: {str(exclude_seen).lower()}
""")
    return spec


def with_policy(fp: FeaturePipeline, exclude_seen: bool) -> FeaturePipeline:
    """The same fitted pipeline under the other repeat policy."""
    return replace(fp, spec={**fp.spec, "policies": {**fp.spec.get("policies", {}), "exclude_seen": exclude_seen}})


def positives(spec: Path) -> list[tuple[str, str, int, str]]:
    """(user, item, ts, order) of the positive events, in file order (= time order per user)."""
    rows = [line.split(",") for line in (spec.parent / "inter.csv").read_text().splitlines()[1:]]
    return [(u, i, int(t), g) for u, i, t, e, g in rows if e != "view"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shop(tmp_path_factory.mktemp("shop") / "data")


@pytest.fixture(scope="module")
def ds(shop: Path) -> Dataset:
    return load_dataset(str(shop), cache_dir=shop.parent)


@pytest.fixture(scope="module")
def fp(ds: Dataset) -> FeaturePipeline:
    from offline.train import fit_pipeline

    return fit_pipeline(ds, temporal_split(ds.interactions).train)


# --------------------------------------------------------------------------- the protocol


def test_the_repeat_aware_session_is_the_basket_so_far_and_only_it_is_removed(shop: Path, ds: Dataset,
                                                                             fp: FeaturePipeline) -> None:
    assert not fp.exclude_seen and ds.report["repeated_pairs"] > 0
    split = temporal_split(ds.interactions)
    es = eval_set(split, fp, max_session=10, which="test")
    ids = fp.item_vocab.values
    by_user: dict[str, list[tuple[str, str, int, str]]] = {}
    for row in positives(shop):
        by_user.setdefault(row[0], []).append(row)
    repeats = 0
    for j, u in enumerate(es.users.tolist()):
        *before, (_, target, _, order) = by_user[u]  # the last positive event is the test target
        basket = [i for (_, i, _, g) in reversed(before) if g == order]
        assert ids[es.targets[j]] == target
        assert [ids[r] for r in es.sessions[j]] == basket  # most recent first
        assert [ids[r] for r in es.excludes[j]] == basket  # and nothing else is removed
        repeats += target in {i for (_, i, _, _) in before} - set(basket)
    assert repeats > len(es) // 2  # most targets are repeats, and they stay candidates
    # Validation: the basket of the validation target (its order's earlier items in train).
    ev = eval_set(split, fp, max_session=10, which="valid")
    for j, u in enumerate(ev.users.tolist()):
        *before, (_, target, _, order) = by_user[u][:-1]
        assert [ids[r] for r in ev.excludes[j]] == [i for (_, i, _, g) in reversed(before) if g == order]


def test_without_a_group_column_the_session_is_the_most_recent_items(tmp_path: Path) -> None:
    from offline.train import fit_pipeline

    spec = write_shop(tmp_path, group=False)
    d = load_dataset(str(spec), cache_dir=tmp_path)
    split = temporal_split(d.interactions)
    f = fit_pipeline(d, split.train)
    es = eval_set(split, f, max_session=4, which="test")
    ids = f.item_vocab.values
    for j, u in enumerate(es.users.tolist()):
        before = [i for (uu, i, _, _) in positives(spec) if uu == u][:-1]
        recent = list(dict.fromkeys(before[::-1]))[:4]
        assert [ids[r] for r in es.sessions[j]] == recent and [ids[r] for r in es.excludes[j]] == recent


def test_exclude_seen_true_removes_all_history_as_before(ds: Dataset, fp: FeaturePipeline) -> None:
    split = temporal_split(ds.interactions)
    strict = with_policy(fp, True)
    es = eval_set(split, strict, max_session=10, which="test")
    ids = strict.item_vocab.values
    for j, u in enumerate(es.users.tolist()):
        seen = [*split.train.item[split.train.user == u].tolist(), *split.valid.item[split.valid.user == u].tolist()]
        assert [ids[r] for r in es.excludes[j]] == seen
        assert [ids[r] for r in es.sessions[j]] == list(dict.fromkeys(seen[::-1]))[:10]
    # A repeat target is excluded, so no baseline can find it: personal frequency is popularity.
    counts = item_counts([split.train, split.valid], strict)
    own = user_item_counts([split.train, split.valid], strict)
    np.testing.assert_array_equal(personal_frequency_ranks(counts, own, es), popularity_ranks(counts, es))


def test_personal_frequency_beats_popularity_on_repeat_heavy_data(ds: Dataset, fp: FeaturePipeline) -> None:
    split = temporal_split(ds.interactions)
    es = eval_set(split, fp, max_session=10, which="test")
    counts = item_counts([split.train, split.valid], fp)
    own = user_item_counts([split.train, split.valid], fp)
    freq = metrics_from_ranks(personal_frequency_ranks(counts, own, es))
    pop = metrics_from_ranks(popularity_ranks(counts, es))
    assert freq["recall@10"] > pop["recall@10"] + 0.3, (freq, pop)


def test_the_count_baselines_match_a_plain_reference() -> None:
    """Popularity and personal frequency ranks against a full scoring of the catalog:
    score = own count, then popularity; pessimistic ties; excluded items not counted."""
    rng = np.random.default_rng(3)
    n = 40
    counts = rng.integers(0, 6, n)  # many ties
    users = [f"u{j}" for j in range(200)]
    own = {u: {int(r): int(rng.integers(1, 4)) for r in rng.choice(n, rng.integers(0, 8), replace=False)}
           for u in users}
    excludes = [rng.choice(n, rng.integers(0, 5)).tolist() for _ in users]  # duplicates too
    targets = rng.integers(-1, n, len(users))
    es = EvalSet(np.array(users), np.full(len(users), -1), [[] for _ in users], excludes, targets,
                 np.ones(len(users), bool))

    def reference(with_own: bool) -> list[int]:
        out = []
        for u, excl, t in zip(users, excludes, targets.tolist(), strict=True):
            if t < 0 or t in excl:
                out.append(MAX_K)
                continue
            mine = own[u] if with_own else {}
            score = np.array([mine.get(r, 0) * 100 + counts[r] for r in range(n)])
            ok = np.ones(n, bool)
            ok[excl] = False
            out.append(int(np.sum((score >= score[t]) & ok)) - 1)
        return out

    assert popularity_ranks(counts, es).tolist() == reference(False)
    assert personal_frequency_ranks(counts, own, es).tolist() == reference(True)


# --------------------------------------------------------------------------- a trained model


@dataclass
class Trained:
    bundle: Path  # exclude_seen: false, batch-scored
    strict: Path  # the same towers under exclude_seen: true, batch-scored
    printed: str  # what ``twotower train`` printed


@pytest.fixture(scope="module")
def trained(shop: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from offline.batch_score import batch_score_bundle, seen_rows
    from offline.cli import register

    root = tmp_path_factory.mktemp("shop-bundles")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--dataset", str(shop), "--out", str(root / "bundle"), "--epochs", "2",
                              "--data-dir", str(root)])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    strict = root / "strict"
    shutil.copytree(root / "bundle", strict)
    fp = bundle_mod.load(strict).features
    bundle_mod.update_bundle(strict, {"features.json": with_policy(fp, True).dumps()}, {})
    for b in (root / "bundle", strict):
        batch_score_bundle(b, k=10, seen=seen_rows(b, cache_dir=root), progress=False)
    return Trained(root / "bundle", strict, out.getvalue())


def test_train_says_how_many_pairs_repeat_and_which_policy_is_in_force(trained: Trained, ds: Dataset) -> None:
    n = ds.report["repeated_pairs"]
    assert f"{n:,} of {len(ds.interactions):,} interactions repeat a (user, item) pair" in trained.printed
    assert "policies.exclude_seen is false: past items stay candidates" in trained.printed
    # The metrics it prints are the repeat-aware protocol's, with both baselines.
    assert "protocol: repeat-aware" in trained.printed and "personal frequency test" in trained.printed


def test_evaluate_keeps_past_items_as_candidates_and_reports_both_baselines(trained: Trained, ds: Dataset) -> None:
    b = bundle_mod.load(trained.bundle)
    split = temporal_split(ds.interactions)
    m = evaluate_model(RankModel.from_bundle(b), b.features, split, max_session=b.combiner.max_session)
    assert m["protocol"] == "repeat_aware" == b.manifest["metrics"]["protocol"]
    for part in (m, m["validation"], m["later"]):
        assert {"popularity", "personal_frequency"} <= part.keys()
    assert "personal frequency valid" in format_table(m)
    es = eval_set(split, b.features, max_session=b.combiner.max_session)
    ranks = model_ranks(RankModel.from_bundle(b), es)
    history = [set(split.train.item[split.train.user == u].tolist()) for u in es.users.tolist()]
    repeat = np.array([b.item_ids[t] in h for t, h in zip(es.targets.tolist(), history, strict=True)])
    assert (ranks[repeat] < MAX_K).sum() > 0  # a repeat is found as a target
    # Under exclude_seen: true the same towers can never find one.
    s = bundle_mod.load(trained.strict)
    strict = model_ranks(RankModel.from_bundle(s), eval_set(split, s.features, max_session=s.combiner.max_session))
    assert (strict[repeat] == MAX_K).all()


def test_batch_scoring_follows_the_policy(trained: Trained, ds: Dataset) -> None:
    split = temporal_split(ds.interactions)
    for path, policy in ((trained.bundle, False), (trained.strict, True)):
        b = bundle_mod.load(path)
        assert b.recs_items is not None and b.features.exclude_seen is policy
        recommended_seen = 0
        for u in b.features.user_vocab.values:
            row = b.features.user_vocab.known(u)
            seen = set(split.train.item[split.train.user == u].tolist())
            recommended_seen += len(seen & {b.item_ids[r] for r in b.recs_items[row].tolist() if r >= 0})
        if policy:
            assert recommended_seen == 0  # nothing seen is recommended
        else:
            assert recommended_seen > 0  # past items are recommended again


def test_the_server_removes_only_the_session_the_cart_and_exclusions(trained: Trained, ds: Dataset,
                                                                      tmp_path: Path) -> None:
    from online.client import RecommenderClient
    from online.config import load_config
    from online.server import ServerThread
    from towers import registry
    from towers.ranking import QueryBatch

    reg = tmp_path / "registry"
    registry.publish(trained.bundle, reg)
    b = bundle_mod.load(trained.bundle)
    split = temporal_split(ds.interactions)
    user = str(split.train.user[0])
    history = list(dict.fromkeys(split.train.item[split.train.user == user].tolist()))
    assert len(history) >= 5
    recent, cart, exclude, carted = history[:1], history[1:2], history[2:3], history[3]
    removed = {*recent, *cart, *exclude, carted}
    srv = ServerThread(load_config(port=0, max_k=100), registry=reg)
    try:
        with RecommenderClient(srv.target, timeout=5.0) as c:
            assert c.record_events([(user, carted, "cart", 1)]) == 1  # in the stored session's cart
            r = c.recommend(user, k=N_ITEMS, recent=recent, cart=cart, exclude=exclude)
            assert set(r.item_ids) == set(b.item_ids) - removed  # every other past item is a candidate
            assert set(history) - removed <= set(r.item_ids)
            # The ranking the offline path gives with those inputs (session: the request's, then
            # the stored one; exclusions: cart and exclude only): parity, past items included.
            model, rows = RankModel.from_bundle(b), b.features.item_vocab.positions
            want = rank(model, QueryBatch.from_lists(
                model, user_rows=[b.features.user_vocab.known(user)], sessions=[rows([*recent, carted]).tolist()],
                excludes=[rows([*cart, *exclude]).tolist()], k=N_ITEMS))
            assert list(r.item_ids) == [b.item_ids[x] for x in want.items(0)[0].tolist()]
            # Batch mode: the precomputed list (past items kept), minus the exclusions.
            assert b.recs_items is not None
            rb = c.recommend(user, k=5, mode="batch", exclude=exclude)
            pre = [b.item_ids[x] for x in np.asarray(b.recs_items)[b.features.user_vocab.known(user)].tolist()]
            assert list(rb.item_ids) == [i for i in pre if i not in exclude][:5]
    finally:
        srv.stop()


def test_the_refresh_gate_follows_the_policy(trained: Trained, ds: Dataset) -> None:
    """The gate's targets are served as the server would: under ``exclude_seen: false`` a past
    item (outside the session) can be a hit; under ``true`` it never is; a session item never."""
    from offline.refresh.gate import hits as _hits

    split = temporal_split(ds.interactions)
    catalog = bundle_mod.load(trained.bundle).item_ids
    users, prefixes, targets = [], [], []
    for u in sorted(set(split.train.user.tolist())):
        known = split.train.item[split.train.user == u].tolist()
        target = max(set(known), key=known.count)  # the user's staple
        others = [i for i in catalog if i != target][:12]  # 12 later items: the session is the last 10
        users.append(u)
        prefixes.append([target, *others])
        targets.append(target)
    loose = _hits(bundle_mod.load(trained.bundle), users, prefixes, targets, vectors=None)
    strict = _hits(bundle_mod.load(trained.strict), users, prefixes, targets, vectors=None)
    assert loose.sum() > 0 and not strict.any()
    in_session = [[*p[1:], t] for p, t in zip(prefixes, targets, strict=True)]  # bought again just now
    assert not _hits(bundle_mod.load(trained.bundle), users, in_session, targets, vectors=None).any()


# --------------------------------------------------------------------------- weights


def test_the_training_loss_weighs_examples_and_all_ones_is_the_plain_loss(ds: Dataset, fp: FeaturePipeline) -> None:
    from offline.train import TrainConfig, batch_loss, example_columns, loss_setup
    from towers.model import ModelConfig, TwoTower

    split = temporal_split(ds.interactions)
    cfg = ModelConfig(dim=16, id_dim=16, hidden=32, history_len=5, history_staleness=0)
    assert split.train.weight is not None and set(np.unique(split.train.weight).tolist()) == {1.0, 3.0}
    cols = example_columns(split, fp, cfg)
    np.testing.assert_array_equal(cols["weight"], split.train.weight)  # purchase 3, cart 1
    ones = example_columns(replace(split, train=replace(split.train, weight=np.ones(len(split.train),
                                                                                    np.float32))), fp, cfg)
    assert "weight" not in ones  # unweighted: exactly the plain loss path
    torch.manual_seed(0)
    model = TwoTower(cfg, fp).eval()
    setup = loss_setup(cfg, TrainConfig(), fp, split)
    idx = torch.arange(32)
    batch = {"idx": idx, **{k: torch.from_numpy(v)[idx] for k, v in cols.items() if k != "weight"}}

    def loss(w: np.ndarray | None) -> float:
        extra = {} if w is None else {"weight": torch.from_numpy(np.asarray(w, np.float32))}
        with torch.no_grad():
            return float(batch_loss(model, setup, {**batch, **extra}, torch.Generator().manual_seed(0)))

    plain = loss(None)
    assert loss(np.full(32, 2.0)) == pytest.approx(plain, rel=1e-6)  # normalised by the batch's weights
    per_example = np.array([loss(np.eye(32)[j]) for j in range(32)])  # one-hot: that example's CE
    assert per_example.mean() == pytest.approx(plain, rel=1e-5)
    w = np.random.default_rng(0).uniform(0, 3, 32)
    assert loss(w) == pytest.approx(float((w * per_example).sum() / w.sum()), rel=1e-5)
