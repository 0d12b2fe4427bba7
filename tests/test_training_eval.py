"""A short real training run on ML-100k, and evaluate = direct exact recomputation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from offline.datasets import Dataset, temporal_split
from offline.evaluate import MAX_K, eval_set, evaluate_bundle, metrics_from_ranks
from towers import bundle as bundle_mod
from towers.combiner import combine


def test_training_beats_random_and_popularity_on_validation(trained_bundle: Path) -> None:
    man = bundle_mod.verify(trained_bundle)
    val = man["metrics"]["validation"]
    random_recall20 = 20 / 1682
    assert val["recall@20"] > 5 * random_recall20
    assert val["recall@20"] > val["popularity"]["recall@20"] + 0.05
    assert man["metrics"]["recall@20"] > man["metrics"]["popularity"]["recall@20"]
    assert (trained_bundle / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert man["index"]["spec"]["type"] == "flat" and man["index"]["ann_recall@100"] == 1.0


def _exact_ranks(b: bundle_mod.Bundle, ml100k: Dataset) -> np.ndarray:
    """Plain reference: full numpy scoring, exclusions, pessimistic ties."""
    split = temporal_split(ml100k.interactions)
    es = eval_set(split, b.features, max_session=b.combiner.max_session, which="test")
    n = b.combiner.max_session
    ranks = []
    for user_row, session, exclude, t in zip(es.user_rows.tolist(), es.sessions, es.excludes, es.targets.tolist(),
                                             strict=True):
        sess = np.zeros((1, n, b.dim), np.float32)
        mask = np.zeros((1, n), bool)
        sess[0, : len(session)] = b.item_emb[list(session)]
        mask[0, : len(session)] = True
        q = combine(b.combiner, np.asarray(b.user_emb[[user_row]]), np.array([True]), sess, mask)[0]
        s = b.item_emb @ q
        eligible = np.ones(len(s), bool)
        eligible[list(exclude)] = False
        ranks.append(int(np.sum(s[eligible] >= s[t])) - 1)
    return np.minimum(np.array(ranks), MAX_K)


def test_evaluate_equals_direct_exact_recomputation(trained_bundle: Path, ml100k: Dataset, data_dir: Path) -> None:
    m = evaluate_bundle(trained_bundle, cache_dir=data_dir, dataset=ml100k)
    ref = metrics_from_ranks(_exact_ranks(bundle_mod.load(trained_bundle), ml100k))
    for k in ("recall@10", "recall@20", "ndcg@10", "hr@50"):
        # FAISS and numpy round inner products differently (~1e-7): allow one user's near-tie to flip.
        assert abs(m[k] - ref[k]) <= 1.0 / 943 + 1e-9, (k, m[k], ref[k])
    assert m["users"] == 943 and m["split"] == "test"


def test_evaluate_cli_json(trained_bundle: Path, data_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "twotower", "evaluate", "--bundle", str(trained_bundle), "--json",
                          "--data-dir", str(data_dir)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    assert {"recall@10", "recall@20", "ndcg@10", "hr@50", "popularity", "split"} <= m.keys()
    assert m["split"] == "test" and set(m["popularity"]) >= {"recall@10", "recall@20", "ndcg@10", "hr@50"}
    # Another process (other BLAS settings) may round one near-tie the other way: one user's worth.
    assert abs(m["recall@20"] - bundle_mod.read_manifest(trained_bundle)["metrics"]["recall@20"]) <= 1 / 943 + 1e-9


def test_rank_edge_cases_against_hand_counts() -> None:
    from offline.evaluate import EvalSet, pessimistic_ranks, popularity_ranks
    from towers.labels import Source
    from towers.ranking import QueryBatch, Ranked, RankModel

    counts = np.array([5, 9, 5, 5, 1])
    es = EvalSet(np.array(["a", "b"]), np.array([-1, -1]), [[], []], [[1], [2]], np.array([2, 2]),
                 np.array([True, True]))
    # a: item 1 is excluded, items 0, 2, 3 tie at 5 → pessimistic rank 2; b: the target itself is excluded.
    assert popularity_ranks(counts, es).tolist() == [2, MAX_K]

    # 4 items where items 1, 2, 3 tie with the target past the list's end (cut after 2 items)
    item_emb = np.array([[1.0], [0.5], [0.5], [0.5]], np.float32)
    model = RankModel(combiner=None, item_emb=item_emb, user_emb=item_emb, index=None,  # type: ignore[arg-type]
                      popularity=np.arange(4))
    q = np.array([[1.0], [1.0], [1.0]], np.float32)

    def ranked(source: int) -> Ranked:
        return Ranked(rows=np.array([[0, 1]] * 3), scores=np.array([[1.0, 0.5]] * 3, np.float32),
                      counts=np.array([2, 2, 2]), source=np.full(3, source, np.int8), queries=q)

    qb = QueryBatch(user=q, has_user=np.ones(3, bool), session=np.zeros((3, 0), np.int64),
                    banned=np.array([1 * 4 + 3]), n_banned=np.array([0, 1, 0]), k=np.array([2, 2, 2]), n_items=4)
    targets = np.array([1, 1, 3])
    assert pessimistic_ranks(model, qb, ranked(Source.ONLINE), targets).tolist() == [3, 2, MAX_K]
    # the popularity list is not ranked by the query: ties count within the list only
    assert pessimistic_ranks(model, qb, ranked(Source.POPULARITY), targets).tolist() == [1, 1, MAX_K]
